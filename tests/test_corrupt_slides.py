"""Damaged slides the first fuzzing found: each fails alone, on one line, and never passes as white glass."""

from __future__ import annotations

import csv
import shutil
import struct
from pathlib import Path

import pytest
import tifffile

from tests.conftest import run_cli
from tests.corpus import can_drop_privileges, is_root, unprivileged_cli
from wsi_screen.errors import SlideOpenError, SlideReadError
from wsi_screen.slide.discovery import discover
from wsi_screen.slide.slide import Slide
from wsi_screen.tiling.store import PatchStore

ERROR = "wsi-screen: error: "


def _dicom_files(slides_dir: Path) -> list[Path]:
    return sorted((slides_dir / "CMU-1-Small-Region dicom").glob("*.dcm"), key=lambda p: p.stat().st_size)


def _series_copy(slides_dir: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of the DICOM series; returns it and its level-0 (largest) file."""
    shutil.copytree(slides_dir / "CMU-1-Small-Region dicom", folder)
    return folder, max(folder.glob("*.dcm"), key=lambda p: p.stat().st_size)


def _zero_level0_bytecounts(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        tag = page.tags["TileByteCounts"]
        width = {3: 2, 4: 4, 16: 8}[int(tag.dtype)]
        at = tag.valueoffset  # where the values are (in the entry or out of line)
        data[at:at + tag.count * width] = bytes(tag.count * width)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "CMU-1-Small-Region.pyramid.tif"])
def test_level0_without_pixel_data_is_refused_not_white(tmp_path: Path, slides_dir: Path, name: str) -> None:
    bad = _zero_level0_bytecounts(slides_dir / name, tmp_path / f"empty-{name}")
    with pytest.raises(SlideOpenError, match=r"of its 2220 x 2967 px level 0 hold no pixel data \(byte count 0\)"):
        Slide(bad)
    res = run_cli("tile", bad, "-o", tmp_path / "out", "--quiet")
    assert res.code == 1 and len(res.err_lines) == 1 and "hold no pixel data" in res.err_lines[0], res
    assert not (tmp_path / "out" / f"{bad.stem}.zarr").exists()


def test_a_zero_byte_tile_is_a_read_error(tmp_path: Path, slides_dir: Path) -> None:
    """Beyond level 0 (where the open check does not look), a tile with no data fails the read."""
    src = slides_dir / "CMU-1-Small-Region.pyramid.tif"
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[1]
        tag = page.tags["TileByteCounts"]
        width = {3: 2, 4: 4, 16: 8}[int(tag.dtype)]
        data[tag.valueoffset:tag.valueoffset + width] = bytes(width)  # tile 0 of level 1
        ds = tif.series[0].levels[1].keyframe.imagewidth
    bad = tmp_path / "sparse.tif"
    bad.write_bytes(bytes(data))
    with Slide(bad) as slide:
        assert slide.level_dimensions[1][0] == ds
        with pytest.raises(SlideReadError, match=r"tile 0 at level 1 holds no pixel data"):
            slide.read_region(1, (0, 0), (64, 64))


def test_dicom_series_with_a_broken_file_stays_one_slide(tmp_path: Path, slides_dir: Path) -> None:
    _, level0 = _series_copy(slides_dir, tmp_path / "in" / "cut")
    level0.write_bytes(level0.read_bytes()[:8])
    _, level0 = _series_copy(slides_dir, tmp_path / "in" / "half")
    level0.write_bytes(level0.read_bytes()[: level0.stat().st_size // 2])
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", tmp_path / "in" / "good.svs")
    sources, problems = discover([tmp_path / "in"])
    assert sorted(s.name for s in sources) == ["cut", "good", "half"] and not problems
    res = run_cli("infer", tmp_path / "in", "-o", tmp_path / "run", "--quiet")
    assert res.code == 1
    errors = [line for line in res.err_lines if line.startswith(ERROR)]
    assert len(errors) == 2, res.err
    assert any("/cut/" in line and "unreadable DICOM header" in line for line in errors), errors
    assert any("/half/" in line and "frame offset table points past the end" in line for line in errors), errors
    with (tmp_path / "run" / "results.csv").open() as fh:
        status = {row["slide"]: row["status"] for row in csv.DictReader(fh)}
    assert status == {"cut": "error", "good": "ok", "half": "error"}  # one row per slide, never one per file


def test_dicom_offset_table_past_the_end_is_refused(tmp_path: Path, slides_dir: Path) -> None:
    """Used to segfault OpenSlide (exit 139, nothing printed)."""
    folder, level0 = _series_copy(slides_dir, tmp_path / "bot")
    data = bytearray(level0.read_bytes())
    at = data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    length = struct.unpack("<I", data[at + 4:at + 8])[0]
    data[at + 8:at + 8 + length] = struct.pack(f"<{length // 4}I", *([len(data) * 2] * (length // 4)))
    level0.write_bytes(bytes(data))
    with pytest.raises(SlideOpenError, match="frame offset table points past the end of the file"):
        Slide(folder)


def test_dicom_absurd_columns_fail_fast(tmp_path: Path, slides_dir: Path) -> None:
    """A DICOM declaring a million columns used to take 37 s and 4.5 GB before failing."""
    import time

    import pydicom

    src = slides_dir / "camelyon-lowres.dcm"
    ds = pydicom.dcmread(src)
    ds.TotalPixelMatrixColumns = 1_000_000
    bad = tmp_path / "wide.dcm"
    ds.save_as(bad)
    started = time.perf_counter()
    with pytest.raises(SlideOpenError, match=r"1000000 x 700 px in 256 x 256 px tiles needs 11721 frames"):
        Slide(bad)
    assert time.perf_counter() - started < 1.0


def test_two_links_to_one_folder_are_not_a_loop(tmp_path: Path, slides_dir: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", real / "a.svs")
    root = tmp_path / "root"
    root.mkdir()
    (root / "one").symlink_to(real, target_is_directory=True)
    (root / "two").symlink_to(real, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    sources, problems = discover([root])
    assert [s.path for s in sources] == [root / "one" / "a.svs"]
    assert [(p.path.name, p.reason) for p in problems] == [("loop", "symbolic link loop; not followed")]


@pytest.mark.skipif(not is_root() or not can_drop_privileges(), reason="needs root able to drop capabilities")
def test_listable_but_not_searchable_folder_fails_per_file(tmp_path: Path, slides_dir: Path) -> None:
    """Used to stop everything with a PermissionError during discovery (nothing tiled)."""
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", root / "locked" / "hidden.svs")
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", root / "good.svs")
    (root / "locked").chmod(0o644)  # r--: names can be listed, files cannot be reached
    try:
        res = unprivileged_cli(["tile", str(root), "-o", str(tmp_path / "out"), "--quiet"])
    finally:
        (root / "locked").chmod(0o755)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, res
    assert lines == [f"{ERROR}{root / 'locked' / 'hidden.svs'}: cannot read: Permission denied"], lines
    assert len(PatchStore.open(tmp_path / "out" / "good.zarr")) > 30
