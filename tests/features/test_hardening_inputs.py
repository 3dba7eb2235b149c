"""Bad input: the generated corpus (tests/corpus.py) beside good slides, through `tile` and `infer` and one by one.

Every bad entry must give exactly one error line naming it, the exit status is 1, nothing prints a traceback,
and every good slide beside them finishes (a complete store; an ``ok`` row with its folder).
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import run_cli
from tests.corpus import (
    Entry,
    build_corpus,
    can_drop_privileges,
    is_root,
    restore_permissions,
    unprivileged_cli,
)
from tests.factory import block_image, write_tiled_tiff
from wsi_screen.errors import SlideOpenError
from wsi_screen.slide.discovery import discover
from wsi_screen.slide.readers.tiff_reader import NDPI_FORMAT_FLAG, is_ndpi
from wsi_screen.slide.slide import Slide
from wsi_screen.tiling.grid import tile_size_l0
from wsi_screen.tiling.store import PatchStore

ERROR = "wsi-screen: error: "


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Iterator[tuple[Path, list[Entry]]]:
    root = tmp_path_factory.mktemp("corpus") / "slides"
    entries = build_corpus(root, slides_dir)
    yield root, entries
    restore_permissions(root)


@pytest.fixture
def permissions_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, ``chmod 000`` does not stop reads. Make ``os.access`` (the check wsi-screen makes before opening)
    honour the permission bits, as it does for every other user; test_unreadable_for_real checks the real thing.
    The patch lives in this process, so slides are read here too (not in the slide reader's child process)."""
    if not is_root():
        return
    monkeypatch.setenv("WSI_SCREEN_IN_PROCESS", "1")
    real = os.access

    def access(path: str | os.PathLike[str], mode: int, **kwargs: object) -> bool:
        if mode & os.R_OK and not stat.S_IMODE(Path(path).stat().st_mode) & 0o444:
            return False
        return real(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)


def _lines_for(entry: Entry, lines: list[str]) -> list[str]:
    return [line for line in lines if f"/{entry.name}:" in line]


def test_corpus_through_tile(corpus: tuple[Path, list[Entry]], tmp_path: Path, permissions_apply: None) -> None:
    root, entries = corpus
    out = tmp_path / "stores"
    res = run_cli("tile", root, "-o", out, "--quiet")
    assert res.code == 1, res
    assert "Traceback" not in res.err
    # --quiet: stderr holds the error lines and nothing else (no library noise, no warnings from tifffile)
    assert all(line.startswith(ERROR) for line in res.err_lines), res.err
    bad = [e for e in entries if e.bad]
    good = [e for e in entries if not e.bad]
    assert len(res.err_lines) == len(bad), "\n".join(res.err_lines)
    for e in bad:
        assert len(_lines_for(e, res.err_lines)) == 1, (e.name, res.err_lines)
    # every good slide, awkward names included, has its finished store under its own name
    stores = sorted(p.name for p in out.iterdir() if p.suffix == ".zarr")
    assert stores == sorted(f"{e.slide_name}.zarr" for e in good)
    for e in good:
        store = PatchStore.open(out / f"{e.slide_name}.zarr")
        assert len(store) > 0 and store.name == e.slide_name
    assert not list(out.glob("*.partial"))


def test_corpus_through_infer(corpus: tuple[Path, list[Entry]], tmp_path: Path, permissions_apply: None) -> None:
    root, entries = corpus
    run = tmp_path / "run"
    res = run_cli("infer", root, "-o", run, "--quiet", "--workers", "0")
    assert res.code == 1, res
    assert "Traceback" not in res.err and "internal error" not in res.err
    noise = [line for line in res.err_lines if not line.startswith(("wsi-screen: error: ", "wsi-screen: warning: "))]
    assert not noise, noise
    errors = [line for line in res.err_lines if line.startswith(ERROR)]
    for e in entries:
        n = len(_lines_for(e, errors))
        if e.discovery:  # screening.run_infer reports discovery problems in results.csv only (see the report)
            assert n <= 1, (e.name, errors)
        else:
            assert n == (1 if e.bad else 0), (e.name, errors)
    with (run / "results.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    bad = [e for e in entries if e.bad]
    assert len(rows) == len(entries)
    failed = [r for r in rows if r["status"] == "error"]
    assert len(failed) == len(bad)
    for e in bad:
        assert sum(f"/{e.name}:" in r["error"] for r in failed) == 1, e.name
    by_name = {r["slide"]: r for r in rows}
    for e in (e for e in entries if not e.bad):
        row = by_name[str(e.slide_name)]
        assert row["status"] == "ok" and int(row["n_patches"]) > 0, row
        folder = run / str(e.slide_name)
        assert {p.name for p in folder.iterdir()} == {"scores.csv", "heatmap.png", "patches.geojson", "slide.json"}
    assert not list(run.glob("*.partial"))
    assert (run / "report.html").stat().st_size > 0


def exercise(path: Path) -> None:
    """Open a slide and read everything tiling would: the thumbnail and every patch of a 224-px grid at 0.5 um/px."""
    with Slide(path) as s:
        s.thumbnail(8.0)
        t = tile_size_l0(0.5, 224, s.mpp) if s.mpp <= 0.5 else 224
        w, h = s.dimensions
        for y in range(0, max(1, h - t + 1), t):
            for x in range(0, max(1, w - t + 1), t):
                s.read((x, y), t, 224)


def test_each_entry_raises_its_exception(corpus: tuple[Path, list[Entry]], permissions_apply: None) -> None:
    root, entries = corpus
    wrong = []
    for e in entries:
        if e.discovery:
            continue
        try:
            exercise(root / e.name)
            got, message = None, ""
        except Exception as exc:
            got, message = type(exc), str(exc)
        if got is not e.error or (e.error and (e.match not in message or e.name.split("/")[-1] not in message)):
            wrong.append(f"{e.name}: expected {e.error and e.error.__name__} ({e.match!r}), got "
                         f"{got and got.__name__}: {message}")
    assert not wrong, "\n".join(wrong)


def test_discovery_reports_links_once(corpus: tuple[Path, list[Entry]]) -> None:
    root, entries = corpus
    sources, problems = discover([root])
    reported = sorted(str(p.path.relative_to(root)) for p in problems)
    assert reported == sorted(e.name for e in entries if e.discovery)
    assert len({s.name for s in sources}) == len(sources)  # unique names


def test_wrong_extension_is_decided_by_content(slides_dir: Path, tmp_path: Path) -> None:
    """An SVS named .ndpi is an SVS: OpenSlide detects by content, and tifffile must not parse it as NDPI."""
    named = tmp_path / "scan.ndpi"
    named.write_bytes((slides_dir / "CMU-1-Small-Region.svs").read_bytes())
    assert not is_ndpi(named)
    with Slide(named) as s, Slide(slides_dir / "CMU-1-Small-Region.svs") as ref:
        assert s.vendor == "aperio" and s.reader_name == ref.reader_name == "tifffile"
        assert s.dimensions == ref.dimensions and s.mpp == ref.mpp
        assert np.array_equal(s.read((500, 700), 224, 224), ref.read((500, 700), 224, 224))
    # a file carrying Hamamatsu's NDPI tag is recognised whatever its name
    flagged = tmp_path / "flagged.tif"
    tifffile.imwrite(flagged, np.zeros((16, 16, 3), np.uint8), extratags=[(NDPI_FORMAT_FLAG, 4, 1, 1, True)])
    assert is_ndpi(flagged)


def test_same_stem_in_one_folder_keeps_extensions(tmp_path: Path) -> None:
    img = block_image((512, 512), [(0, 0, 512, 512)])
    for name in ("a.svs", "a.tif", "b.tif"):
        write_tiled_tiff(tmp_path / name, img, mpp=0.5)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_tiled_tiff(tmp_path / "x" / "c.tif", img, mpp=0.5)
    write_tiled_tiff(tmp_path / "y" / "c.tif", img, mpp=0.5)
    names = sorted(s.name for s in discover([tmp_path])[0])
    assert names == ["a.svs", "a.tif", "b", "x__c", "y__c"]  # only the clashing names change


def test_non_utf8_file_name(tmp_path: Path) -> None:
    """A Latin-1 file name (old Windows share) is not valid UTF-8: it is shown with \\xNN escapes, and works."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_tiled_tiff(folder / "tmp.tif", block_image((1024, 768), [(64, 64, 960, 704)]), mpp=0.5)
    (folder / "tmp.tif").rename(folder / os.fsdecode(b"caf\xe9.tif"))  # surrogate escape: the raw byte 0xE9
    res = run_cli("tile", folder, "-o", tmp_path / "out", "--quiet")
    assert res.code == 0, res
    assert PatchStore.open(tmp_path / "out" / "caf\\xe9.zarr").name == "caf\\xe9"
    res = run_cli("infer", folder, "-o", tmp_path / "run", "--quiet", "--workers", "0")
    assert res.code == 0, res
    text = (tmp_path / "run" / "results.csv").read_text(encoding="utf-8")
    assert "caf\\xe9,ok," in text
    res = run_cli("infer", folder, "-o", tmp_path / "run", "--quiet", "--workers", "0")  # resume: reused
    assert res.code == 0, res


def test_unreadable_for_real(tmp_path: Path, cmu_svs: Path) -> None:
    """chmod 000 on a slide and on a sub-folder, in a process where permissions apply (root: capabilities
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped): one line each, the good slide still tiled."""
    if not can_drop_privileges():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to apply")
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    (folder / "good.svs").write_bytes(cmu_svs.read_bytes())
    (folder / "unreadable.svs").write_bytes(cmu_svs.read_bytes())
    (folder / "locked" / "inside.svs").write_bytes(cmu_svs.read_bytes())
    (folder / "unreadable.svs").chmod(0)
    (folder / "locked").chmod(0)
    try:
        proc = unprivileged_cli(["tile", str(folder), "-o", str(tmp_path / "out"), "--quiet"])
    finally:
        restore_permissions(folder)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 2 and all(line.startswith(ERROR) for line in lines), lines
    assert any("unreadable.svs: permission denied" in line for line in lines)
    assert any("/locked: cannot" in line and "Permission denied" in line for line in lines)
    assert PatchStore.open(tmp_path / "out" / "good.zarr").attrs["complete"] is True


def test_permission_check_names_the_file(tmp_path: Path, cmu_svs: Path, permissions_apply: None) -> None:
    path = tmp_path / "locked.svs"
    path.write_bytes(cmu_svs.read_bytes())
    path.chmod(0)
    try:
        with pytest.raises(SlideOpenError, match=r"locked\.svs: permission denied"):
            Slide(path)
    finally:
        path.chmod(0o644)
