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


def _non_conformant_dicom(src: Path, dst: Path) -> Path:
    """A DICOM WSI as a new user met one: a 65-character SeriesInstanceUID (64 at most) and an Image Type of two
    values, without the third (VOLUME, LABEL, ...) that OpenSlide needs ("Couldn't get image flavor")."""
    import warnings

    import pydicom

    ds = pydicom.dcmread(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the value it is asked to write
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498." + "7" * 39
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.save_as(dst)
    return dst


def test_image_flavor_in_the_tools_words(tmp_path: Path, slides_dir: Path) -> None:
    from wsi_screen.slide.readers.openslide_reader import OpenSlideReader

    bad = _non_conformant_dicom(slides_dir / "camelyon-lowres.dcm", tmp_path / "bad.dcm")
    explained = r"not a conformant DICOM whole-slide image: .*Image Type.*VOLUME.*export the slide again"
    with pytest.warns(UserWarning, match=r"value length \(65\)"), pytest.raises(SlideOpenError, match=explained):
        Slide(bad)  # the header check, before OpenSlide
    with pytest.raises(SlideOpenError, match=explained) as caught:
        OpenSlideReader(bad)  # OpenSlide's own refusal, reworded
    assert "Couldn't get image flavor" not in str(caught.value)


@pytest.mark.filterwarnings("default")  # as a user's run: library warnings are not errors there
def test_library_warnings_reach_the_run_log_not_the_terminal(tmp_path: Path, slides_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's UserWarning about the 65-character UID used to print on the terminal during `infer`."""
    import sys
    import warnings

    from wsi_screen.runlog import LOG_NAME

    monkeypatch.setenv("WSI_SCREEN_IN_PROCESS", "1")  # the slide read here: the warning is the parent's

    def terminal(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", terminal)  # where Python prints a warning (pytest records it)

    (tmp_path / "in").mkdir()
    _non_conformant_dicom(slides_dir / "camelyon-lowres.dcm", tmp_path / "in" / "bad.dcm")
    res = run_cli("infer", tmp_path / "in", "-o", tmp_path / "run", "--quiet")
    assert res.code == 1
    assert len(res.err_lines) == 1, res.err  # the slide's one error line, no warning
    assert res.err_lines[0].startswith(f"{ERROR}{tmp_path / 'in' / 'bad.dcm'}: not a conformant DICOM"), res.err
    log = (tmp_path / "run" / LOG_NAME).read_text()
    assert "UserWarning: The value length (65) exceeds the maximum length of 64" in log


@pytest.mark.parametrize(("tag", "value", "message"), [
    ("ImageLength", 0, "declares 1024 x 0 px"),
    ("TileWidth", 0, "declares tiles of 0 x 256 px"),
    ("ImageWidth", 1_000_000, "(1000000 x 1024 px) needs 15628 tiles or strips but lists 16"),
])
def test_a_damaged_reduced_level_in_subifds_is_refused(tmp_path: Path, tag: str, value: int, message: str) -> None:
    """OME-TIFF reduced levels live in SubIFDs, outside the main directory chain: damaged there, they used to
    fail with `unexpected ZeroDivisionError` or `MemoryError` (the fuzz corpus through `tile` and `infer`)."""
    from tests.factory import block_image, write_ome_tiff

    path = write_ome_tiff(tmp_path / "zero.ome.tif", block_image((2048, 2048), [(100, 100, 1900, 1900)]), 0.5)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.series[0].levels[1].keyframe.tags[tag].overwrite(value)
    with pytest.raises(SlideOpenError) as info:
        Slide(path)
    assert str(info.value) == f"{path}: truncated or corrupt TIFF (image 0 (reduced level 1) {message})"

