"""``wsi-screen tile`` end to end: real slides, written slides with exact counts, bad input, resume, kill."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import run_cli, tree_digest
from tests.factory import block_image, write_ome_tiff, write_plain_tiff, write_tiled_tiff
from wsi_screen.tiling.store import PatchStore, read_attrs


@pytest.fixture
def block_slide(tmp_path: Path) -> Path:
    """2048 x 1536 px at 0.5 um/px with tissue exactly on [256, 1280) x [256, 1024)."""
    (tmp_path / "in").mkdir()
    img = block_image((2048, 1536), [(256, 256, 1280, 1024)])
    return write_tiled_tiff(tmp_path / "in" / "block.tif", img, mpp=0.5)


def test_exact_grid_on_written_slide(tmp_path: Path, block_slide: Path) -> None:
    res = run_cli("tile", block_slide, "-o", tmp_path / "out", "--mpp", "0.5", "--size", "256", "--codec", "lz4")
    assert res.code == 0, res
    assert "12 patches written (lz4, lossless)" in res.err  # the summary says how the patches are kept
    store = PatchStore.open(tmp_path / "out" / "block.zarr")
    expected = [[x, y] for y in (256, 512, 768) for x in (256, 512, 768, 1024)]
    assert store.coords.tolist() == expected
    assert np.all(store.tissue > 0.95)
    assert store.attrs["tile_size_l0"] == 256 and store.attrs["patch_size"] == 256
    assert store.attrs["grid"] == {"columns": 8, "rows": 6, "origin_l0": [0, 0]}  # 2048 x 1536 px
    assert store.read(slice(None)).shape == (12, 256, 256, 3)
    # patches are the slide's pixels at those coordinates
    with tifffile.TiffFile(block_slide) as tif:
        level0 = tif.pages[0].asarray()
    assert np.array_equal(store.read(5), level0[512:768, 512:768])
    assert "1 slide(s): 1 tiled, 0 up to date, 0 failed; 12 patches" in res.err


def test_tile_result_times_each_stage(tmp_path: Path, block_slide: Path) -> None:
    from wsi_screen.slide.discovery import SlideSource
    from wsi_screen.tiling.grid import TileSpec
    from wsi_screen.tiling.pipeline import TILE_STAGES, TileConfig, tile_slide

    config = TileConfig(spec=TileSpec(mpp=0.5, size_px=256), stain="macenko")
    source = SlideSource(block_slide, "block")
    result = tile_slide(source, str(tmp_path / "out"), config)
    assert result.status == "done" and result.n_patches == 12
    assert tuple(result.stages) == TILE_STAGES == ("open", "thumbnail", "tissue", "stain_fit", "patches", "commit")
    assert all(v >= 0 for v in result.stages.values()) and result.stages["patches"] > 0
    assert sum(result.stages.values()) == pytest.approx(result.seconds, abs=0.01)
    again = tile_slide(source, str(tmp_path / "out"), config)  # up to date: only opened and checked
    assert again.status == "skipped" and list(again.stages) == ["open"]


def test_overlap_and_coarser_mpp(tmp_path: Path, block_slide: Path) -> None:
    res = run_cli("tile", block_slide, "-o", tmp_path / "o1", "--mpp", "0.5", "--size", "256", "--overlap", "128",
                  "--min-tissue", "0.9", "--quiet")
    assert res.code == 0, res
    coords = PatchStore.open(tmp_path / "o1" / "block.zarr").coords
    # stride 128, wholly inside the tissue box
    expected = [[x, y] for y in range(256, 1024 - 256 + 1, 128) for x in range(256, 1280 - 256 + 1, 128)]
    assert coords.tolist() == expected
    res = run_cli("tile", block_slide, "-o", tmp_path / "o2", "--mpp", "1.0", "--size", "128", "--quiet")
    store = PatchStore.open(tmp_path / "o2" / "block.zarr")
    assert store.attrs["tile_size_l0"] == 256 and store.read(0).shape == (128, 128, 3)
    assert len(store) == 12


def test_resume_skips_and_mismatch_needs_overwrite(tmp_path: Path, block_slide: Path) -> None:
    out = tmp_path / "out"
    res = run_cli("tile", block_slide, "-o", out, "--size", "256")
    assert res.code == 0 and "written (jpeg quality 90, lossy)" in res.err  # the default is lossy, and says so
    before = tree_digest(out / "block.zarr")
    mtime = (out / "block.zarr" / "zarr.json").stat().st_mtime_ns
    res = run_cli("tile", block_slide, "-o", out, "--size", "256")
    assert res.code == 0 and "0 tiled, 1 up to date" in res.err
    assert (out / "block.zarr" / "zarr.json").stat().st_mtime_ns == mtime
    res = run_cli("tile", block_slide, "-o", out, "--size", "128")
    assert res.code == 1
    assert any("--overwrite" in line and "block.zarr" in line and "patch_size" in line for line in res.err_lines)
    assert tree_digest(out / "block.zarr") == before  # refused: nothing touched
    res = run_cli("tile", block_slide, "-o", out, "--size", "128", "--overwrite")
    assert res.code == 0 and PatchStore.open(out / "block.zarr").patch_size == 128


def test_a_slide_touched_since_its_store_keeps_it_and_is_warned_of(tmp_path: Path, block_slide: Path) -> None:
    """A slide whose file time changed but whose fingerprint (name, size, first and last MiB) did not keeps its store
    (a copy without -p, a touch), with the one warning infer gives for its scores (the same rule,
    slide.warn_if_touched), naming the store to delete; re-tiling records the new time. It used to be silent."""
    out = tmp_path / "out"
    args = ("tile", block_slide, "-o", out, "--size", "256", "--pixels", "none")
    assert run_cli(*args).code == 0
    before = tree_digest(out / "block.zarr")
    res = run_cli(*args)
    assert res.code == 0 and not any("modification time" in line for line in res.err_lines)  # unchanged: silent
    later = int(block_slide.stat().st_mtime) + 3600
    os.utime(block_slide, (later, later))
    res = run_cli(*args)
    assert res.code == 0 and "0 tiled, 1 up to date" in res.err, res
    assert tree_digest(out / "block.zarr") == before  # reused as it was
    (line,) = [line for line in res.err_lines if "modification time" in line]
    assert line.startswith("wsi-screen: warning: block: the slide file's modification time changed since its store "
                           "was made")
    assert "only its size and first and last MiB were compared" in line
    assert f"delete {out / 'block.zarr'}" in line and "--overwrite" in line
    res = run_cli(*args, "--overwrite")
    assert res.code == 0 and read_attrs(str(out / "block.zarr"))["slide"]["mtime"] == later
    assert not any("modification time" in line for line in run_cli(*args).err_lines)  # the new time is recorded


def test_a_refusal_writes_the_settings_numbers_to_4_significant_digits(tmp_path: Path) -> None:
    """A folder tiled with another --slide-mpp is refused naming both resolutions as a person writes them
    (it said `thumbnail_mpp 1.084716796875 -> 1.3016601562499999`)."""
    path = write_plain_tiff(tmp_path / "strip.tif", block_image((2345, 1500), [(0, 0, 1200, 1500)]))
    args = ("tile", path, "-o", tmp_path / "out", "--size", "64", "--pixels", "none", "--quiet")
    assert run_cli(*args, "--slide-mpp", "0.3").code == 0
    res = run_cli(*args, "--slide-mpp", "0.3000001")
    assert res.code == 1
    (line,) = [line for line in res.err_lines if "other settings" in line]
    assert "slide_mpp 0.3 -> 0.3000001;" in line  # what 4 digits cannot tell apart is written whole
    res = run_cli(*args, "--slide-mpp", "0.2")
    assert res.code == 1
    (line,) = [line for line in res.err_lines if "other settings" in line]
    thumb = read_attrs(str(tmp_path / "out" / "strip.zarr"))["settings"]["thumbnail_mpp"]
    assert f"slide_mpp 0.3 -> 0.2; thumbnail_mpp {thumb:.4g} -> " in line and repr(thumb) not in line


def test_changed_slide_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_tiled_tiff(src / "s.tif", block_image((1024, 1024), [(0, 0, 1024, 1024)], seed=1), mpp=0.5)
    assert run_cli("tile", src, "-o", tmp_path / "out", "--quiet").code == 0
    write_tiled_tiff(src / "s.tif", block_image((1024, 1024), [(0, 0, 1024, 1024)], seed=2), mpp=0.5)
    res = run_cli("tile", src, "-o", tmp_path / "out", "--quiet")
    assert res.code == 1 and "slide_fingerprint" in res.err and "--overwrite" in res.err


def test_identical_bytes_run_after_run(tmp_path: Path, block_slide: Path) -> None:
    for name in ("a", "b"):
        assert run_cli("tile", block_slide, "-o", tmp_path / name, "--size", "224", "--workers", "3",
                       "--quiet").code == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_no_tissue_gives_empty_complete_store(tmp_path: Path) -> None:
    path = write_tiled_tiff(tmp_path / "glass.tif", block_image((1024, 768), []), mpp=0.5)
    res = run_cli("tile", path, "-o", tmp_path / "out")
    assert res.code == 0
    assert any("no tissue" in line and "glass" in line for line in res.err_lines)
    store = PatchStore.open(tmp_path / "out" / "glass.zarr")
    assert len(store) == 0 and store.read(slice(None)).shape == (0, 224, 224, 3)
    assert store.attrs["complete"] is True


def test_a_slide_smaller_than_one_patch_fails_not_no_tissue(tmp_path: Path) -> None:
    """All tissue, but 200 x 150 px against a 224-px patch: it used to pass as a store with 'no tissue'."""
    tiny = write_tiled_tiff(tmp_path / "tiny.tif", block_image((200, 150), [(0, 0, 200, 150)]), mpp=0.5,
                            pyramid=False)
    fine = write_tiled_tiff(tmp_path / "fine.tif", block_image((1024, 768), [(100, 100, 900, 700)]), mpp=0.5)
    res = run_cli("tile", tiny, fine, "-o", tmp_path / "out")
    assert res.code == 1
    errors = [line for line in res.err_lines if "error" in line]
    assert len(errors) == 1 and "tiny.tif: the slide is 200 x 150 px, smaller than one patch (224" in errors[0]
    assert not any("no tissue" in line for line in res.err_lines)
    assert len(PatchStore.open(tmp_path / "out" / "fine.zarr")) > 0  # the other slide is tiled


def test_cmu_containers_same_grid(tmp_path: Path, slides_dir: Path) -> None:
    names = ["CMU-1-Small-Region.svs", "CMU-1-Small-Region.pyramid.tif", "CMU-1-Small-Region dicom"]
    res = run_cli("tile", *[slides_dir / n for n in names], "-o", tmp_path, "--quiet")
    assert res.code == 0, res
    stores = [PatchStore.open(tmp_path / f"{n.removesuffix('.svs').removesuffix('.tif')}.zarr") for n in names]
    assert len(stores[0]) > 30
    for s in stores[1:]:
        assert np.array_equal(s.coords, stores[0].coords)
        diff = np.abs(s.read(slice(None)).astype(np.int16) - stores[0].read(slice(None))).mean()
        assert diff < 10.0  # same pixels up to the re-encoding's JPEG noise
    assert stores[2].attrs["slide"]["vendor"] == "dicom"


def test_real_folder_with_bad_slides(tmp_path: Path, slides_dir: Path) -> None:
    res = run_cli("tile", slides_dir, "-o", tmp_path / "out")
    assert res.code == 1
    assert "Traceback" not in res.err
    errors = [line for line in res.err_lines if line.startswith("wsi-screen: error:")]
    assert len(errors) == 4, errors
    joined = "\n".join(errors)
    assert "TCGA-CR-7395-01A-01-TS1.svs" in joined and "--slide-mpp" in joined
    assert "camelyon-lowres.dcm" in joined and "finer than the slide's level 0" in joined
    assert "vectra-multiplex.qptiff" in joined and "multi-channel" in joined
    assert "kidney-ihc-plain-strip.tif" in joined
    done = sorted(p.name for p in (tmp_path / "out").glob("*.zarr"))
    assert done == ["CMU-1-Small-Region dicom.zarr", "CMU-1-Small-Region.pyramid.zarr", "CMU-1-Small-Region.zarr"]
    assert "3 tiled, 0 up to date, 4 failed" in res.err


def test_tcga_jpeg2000_with_slide_mpp(tmp_path: Path, slides_dir: Path) -> None:
    res = run_cli("tile", slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", "-o", tmp_path, "--slide-mpp", "0.5",
                  "--quiet")
    assert res.code == 0, res
    store = PatchStore.open(tmp_path / "TCGA-CR-7395-01A-01-TS1.zarr")
    assert len(store) > 50
    assert store.attrs["slide"]["mpp_source"] == "user"
    assert store.read(0).std() > 10


def test_ome_and_plain_tiff(tmp_path: Path) -> None:
    img = block_image((1536, 1024), [(0, 0, 1024, 1024)])
    ome = write_ome_tiff(tmp_path / "exp.ome.tif", img, mpp=0.25)
    plain = write_plain_tiff(tmp_path / "plain.tif", img)
    res = run_cli("tile", ome, "-o", tmp_path / "out", "--mpp", "0.5", "--size", "256", "--quiet")
    assert res.code == 0, res
    store = PatchStore.open(tmp_path / "out" / "exp.zarr")
    assert store.attrs["tile_size_l0"] == 512 and len(store) == 4
    assert store.attrs["slide"]["reader"] == "tifffile"
    res = run_cli("tile", plain, "-o", tmp_path / "out", "--quiet")
    assert res.code == 1 and "plain.tif" in res.err and "--slide-mpp" in res.err
    res = run_cli("tile", plain, "-o", tmp_path / "out", "--slide-mpp", "0.25", "--mpp", "0.5", "--size", "256",
                  "--quiet")
    assert res.code == 0 and len(PatchStore.open(tmp_path / "out" / "plain.zarr")) == 4


def _corrupt(src: Path, dst: Path) -> None:
    shutil.copy(src, dst)
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    with dst.open("r+b") as fh:
        for i in range(40, 80):
            fh.seek(offsets[i] + counts[i] // 3)
            fh.write(os.urandom(counts[i] // 3))


def test_bad_inputs_each_one_line(tmp_path: Path, cmu_svs: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.svs").write_bytes(b"")
    (bad / "text.svs").write_text("not a slide\n" * 100)
    data = cmu_svs.read_bytes()
    (bad / "truncated.svs").write_bytes(data[: len(data) // 2])
    _corrupt(cmu_svs, bad / "corrupt.svs")
    shutil.copy(cmu_svs, bad / "good.svs")
    res = run_cli("tile", bad, "-o", tmp_path / "out")
    assert res.code == 1
    assert "Traceback" not in res.err
    errors = [line for line in res.err_lines if line.startswith("wsi-screen: error:")]
    assert sorted(name for name in ("empty.svs", "text.svs", "truncated.svs", "corrupt.svs")
                  if any(name in e for e in errors)) == ["corrupt.svs", "empty.svs", "text.svs", "truncated.svs"]
    assert len(errors) == 4
    assert [p.name for p in (tmp_path / "out").glob("*.zarr")] == ["good.zarr"]
    assert not list((tmp_path / "out").glob("*.partial"))


def test_debug_shows_traceback(tmp_path: Path) -> None:
    (tmp_path / "x.svs").write_text("junk")
    cmd = [sys.executable, "-m", "wsi_screen.cli", "tile", str(tmp_path / "x.svs"), "-o", str(tmp_path / "out")]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and "x.svs" in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UnsupportedFormatError" in debug.stderr


def _spawn_tile(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "wsi_screen.cli", "tile", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


@pytest.mark.slow
def test_kill9_mid_slide_then_resume(tmp_path: Path) -> None:
    img = block_image((6144, 6144), [(0, 0, 6144, 6144)], seed=3)
    slide = write_tiled_tiff(tmp_path / "big.tif", img, mpp=0.5)
    args = [str(slide), "-o", str(tmp_path / "killed"), "--size", "256", "--quiet", "--workers", "1"]
    proc = _spawn_tile(args)
    partial = tmp_path / "killed" / "big.zarr.partial"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial / "patches" / "c").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = tmp_path / "killed" / "big.zarr"
    assert partial.exists() and not final.exists()  # killed mid-slide, nothing looks finished
    assert read_attrs(partial)["complete"] is False  # type: ignore[index]
    assert run_cli(*["tile", *args]).code == 0
    assert run_cli("tile", slide, "-o", tmp_path / "clean", "--size", "256", "--quiet", "--workers", "1").code == 0
    assert tree_digest(final) == tree_digest(tmp_path / "clean" / "big.zarr")
    assert not partial.exists()


def test_a_read_only_folder_of_current_stores_is_reused(tmp_path: Path, cmu_svs: Path) -> None:
    """A lab's stores, tiled once into a folder then made read-only (an archive, a read-only mount), failed every
    slide of `infer --stores` with `cannot write the store: Permission denied`: the store's lock was taken before
    the store was found up to date, and a lock needs a file in the folder. A complete, current store is now read
    without it; a store that is not current still fails (it would have to be written)."""
    from tests.corpus import can_drop_privileges, restore_permissions, unprivileged_cli_runs

    if not can_drop_privileges():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to apply")
    stores = tmp_path / "stores"
    tiled = run_cli("tile", cmu_svs, "-o", stores, "--mpp", "0.972", "--size", "96", "--codec", "lz4", "--quiet")
    assert tiled.code == 0, tiled
    before = tree_digest(stores)
    for path in [stores, *stores.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        proc, other = unprivileged_cli_runs([
            ["infer", str(cmu_svs), "-o", str(tmp_path / "run"), "--stores", str(stores), "--quiet"],
            ["infer", str(cmu_svs), "-o", str(tmp_path / "run2"), "--stores", str(stores), "--min-tissue", "0.7",
             "--quiet"]])
    finally:
        restore_permissions(stores)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    row = (tmp_path / "run" / "results.csv").read_text(encoding="utf-8").splitlines()[1].split(",")
    assert row[:3] == ["CMU-1-Small-Region", "ok", "66"], row
    assert other.returncode == 1 and "CMU-1-Small-Region.zarr: cannot write the store: Permission denied" \
        in other.stderr, other.stderr
    assert tree_digest(stores) == before
