"""Damaged slides the first fuzzing found: each fails alone, on one line, and never passes as white glass."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import tifffile

from tests.conftest import dicom_series_copy, run_cli
from wsi_screen.errors import SlideOpenError, SlideReadError
from wsi_screen.slide.slide import Slide

ERROR = "wsi-screen: error: "


def _dicom_files(slides_dir: Path) -> list[Path]:
    return sorted((slides_dir / "CMU-1-Small-Region dicom").glob("*.dcm"), key=lambda p: p.stat().st_size)


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
            slide.read_region((0, 0), 1, (64, 64))


def test_dicom_offset_table_past_the_end_is_refused(tmp_path: Path, slides_dir: Path) -> None:
    """Used to segfault OpenSlide (exit 139, nothing printed)."""
    folder, level0 = dicom_series_copy(slides_dir, tmp_path / "bot")
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
