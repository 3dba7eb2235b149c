"""Slide opening, mpp, reading and failure modes, on the real slides in ../shared/data."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.factory import block_image, write_ome_tiff, write_plain_tiff, write_tiled_tiff
from wsi_screen.errors import (
    ConfigError,
    MissingMppError,
    SlideOpenError,
    SlideReadError,
    UnsupportedFormatError,
    WsiScreenError,
)
from wsi_screen.slide.slide import Slide, slide_name

CMU_FORMATS = ["CMU-1-Small-Region.svs", "CMU-1-Small-Region.pyramid.tif", "CMU-1-Small-Region dicom"]


@pytest.mark.parametrize("name", CMU_FORMATS)
def test_cmu_opens_in_every_container(slides_dir: Path, name: str) -> None:
    with Slide(slides_dir / name) as s:
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "slide"
        # JPEG-tiled SVS and TIFF take the direct-decode fast path; DICOM stays with OpenSlide
        assert s.reader_name == ("openslide" if name.endswith("dicom") else "tifffile")
    expected_levels = 1 if name.endswith(".svs") else 4
    assert len(s.level_dimensions) == expected_levels


def test_dicom_series_folder_name(slides_dir: Path) -> None:
    folder = slides_dir / "CMU-1-Small-Region dicom"
    assert slide_name(folder) == "CMU-1-Small-Region dicom"
    with Slide(folder) as s:
        assert s.vendor == "dicom"
        assert len(s.info.fingerprint) == 32


@pytest.mark.parametrize("index", range(4))
def test_any_one_dicom_file_opens_the_whole_series(slides_dir: Path, index: int) -> None:
    """Three of the four files (not level 0) used to be refused as damaged ("its 1110 x 1483 px level 0
    cannot be read") and were named by their instance UID."""
    folder = slides_dir / "CMU-1-Small-Region dicom"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 4
    with Slide(folder) as whole, Slide(files[index]) as one:
        assert one.name == slide_name(files[index]) == "CMU-1-Small-Region dicom"
        assert one.dimensions == (2220, 2967) and one.level_dimensions == whole.level_dimensions
        assert one.mpp == whole.mpp == pytest.approx(0.499)
        assert one.info.fingerprint == whole.info.fingerprint  # the same slide: its stores are reused
        assert np.array_equal(one.read((896, 1120), 224, 224), whole.read((896, 1120), 224, 224))


def test_a_slide_linked_under_another_name_is_the_file_it_points_to(tmp_path: Path, slides_dir: Path) -> None:
    """A store records the resolved path and reopens it; the fingerprint used to hash the link's name, so a
    slide linked into a cohort folder under another name never matched its own stores."""
    real, folder = slides_dir / "CMU-1-Small-Region.svs", slides_dir / "CMU-1-Small-Region dicom"
    (tmp_path / "patientA.svs").symlink_to(real)
    (tmp_path / "patientB").symlink_to(folder, target_is_directory=True)
    files = sorted(folder.glob("*.dcm"))
    (tmp_path / "patientC.dcm").symlink_to(files[0])  # one file of a series linked alone: a slide of its own
    with Slide(tmp_path / "patientA.svs") as link, Slide(real) as target:
        assert link.name == "patientA" and link.info.path == str(real.resolve())
        assert link.info.fingerprint == target.info.fingerprint
    with Slide(tmp_path / "patientB") as link, Slide(folder) as target:
        assert link.name == "patientB" and link.info.fingerprint == target.info.fingerprint
    with Slide(tmp_path / "patientC.dcm") as link, Slide(link.info.path) as reopened:
        # OpenSlide finds a series' files beside the link, so this slide is the one file; the resolved path opens
        # the whole series, which is another slide, and the store's check refuses it
        assert link.dimensions != reopened.dimensions and link.info.fingerprint != reopened.info.fingerprint
    other = tmp_path / "copy" / "CMU-1-Small-Region.svs"  # the same name, other content: another slide
    other.parent.mkdir()
    shutil.copy(real, other)
    with other.open("r+b") as f:  # tile bytes within the first MiB (the fingerprint reads the first and last MiB)
        f.seek(600_000)
        f.write(b"\0" * 100)
    with Slide(other) as changed, Slide(real) as target:
        assert changed.info.fingerprint != target.info.fingerprint


def test_one_dicom_file_fails_when_its_level0_sibling_is_damaged(tmp_path: Path, slides_dir: Path) -> None:
    """Never the series at a reduced resolution: a damaged level-0 file fails the slide, naming it."""
    folder = tmp_path / "series"
    shutil.copytree(slides_dir / "CMU-1-Small-Region dicom", folder)
    level0 = max(folder.glob("*.dcm"), key=lambda p: p.stat().st_size)
    smallest = min(folder.glob("*.dcm"), key=lambda p: p.stat().st_size)
    level0.write_bytes(level0.read_bytes()[:8])
    with pytest.raises(SlideOpenError, match=rf"{level0.name}: unreadable DICOM header .*the series cannot be read"):
        Slide(smallest)


def test_a_dicom_file_named_by_its_uid_takes_the_series_description(tmp_path: Path, slides_dir: Path) -> None:
    uid_named = tmp_path / "1.2.826.0.1.3680043.8.498.1234.dcm"
    shutil.copy(slides_dir / "camelyon-lowres.dcm", uid_named)
    assert slide_name(uid_named) == "Congo Red-Lung test"  # its SeriesDescription
    (tmp_path / "other").mkdir()
    readable = tmp_path / "other" / "lymph-node-7.dcm"
    shutil.copy(slides_dir / "camelyon-lowres.dcm", readable)
    assert slide_name(readable) == "lymph-node-7"  # a readable file name stays


def test_cmu_containers_give_near_identical_patches(slides_dir: Path) -> None:
    patches = []
    for name in CMU_FORMATS:
        with Slide(slides_dir / name) as s:
            patches.append(s.read((896, 1120), 224, 224).astype(np.int16))
    # the TIFF and DICOM copies were re-encoded from the q30 JPEG SVS: pixel noise, same content, no shift
    def blocks(p: np.ndarray) -> np.ndarray:
        return p.reshape(28, 8, 28, 8, 3).mean(axis=(1, 3))

    for other in patches[1:]:
        assert np.abs(other - patches[0]).mean() < 10.0
        assert np.abs(blocks(other) - blocks(patches[0])).mean() < 1.5
        shifted = np.abs(other[:, 1:] - patches[0][:, :-1]).mean()
        assert shifted > 2 * np.abs(other - patches[0]).mean()
    # the pyramid TIFF and DICOM share their pixels exactly
    assert np.array_equal(patches[1], patches[2])


def test_jpeg2000_svs_without_mpp(slides_dir: Path) -> None:
    path = slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(MissingMppError, match=r"TCGA-CR-7395.*`slide_mpp`"):
        Slide(path)
    with Slide(path, mpp=0.5) as s:
        assert s.mpp_source == "user"
        patch = s.read((2000, 1500), 224, 224)
    assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8
    assert patch.std() > 10  # real tissue pixels were decoded, not a blank


def test_coarse_dicom_reads(slides_dir: Path) -> None:
    with Slide(slides_dir / "camelyon-lowres.dcm") as s:
        assert s.mpp == pytest.approx(28.969, rel=1e-4)
        assert s.thumbnail(28.969).shape == (700, 1152, 3)


def test_unsupported_files_fail_clearly(slides_dir: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="multi-channel"):
        Slide(slides_dir / "unsupported" / "vectra-multiplex.qptiff")
    plain = slides_dir / "unsupported" / "kidney-ihc-plain-strip.tif"
    with pytest.raises(MissingMppError, match="`slide_mpp`"):
        Slide(plain)
    with Slide(plain, mpp=0.5) as s:  # accepted once the user states the mpp
        assert s.reader_name == "tifffile"
        assert s.dimensions == (1493, 901)


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "CMU-1-Small-Region.pyramid.tif",
                                  "TCGA-CR-7395-01A-01-TS1.svs"])
def test_fast_path_matches_openslide(slides_dir: Path, name: str) -> None:
    rng = np.random.default_rng(7)
    with Slide(slides_dir / name, mpp=0.5, reader="openslide") as ref, Slide(slides_dir / name, mpp=0.5) as fast:
        assert fast.reader_name == "tifffile" and ref.reader_name == "openslide"
        assert fast.level_dimensions == ref.level_dimensions and fast.mpp == ref.mpp
        w, h = ref.dimensions
        for tile_l0 in (224, 448, 901):  # level 0, and reduced levels where the pyramid has them
            for x, y in zip(rng.integers(0, w - tile_l0, 12), rng.integers(0, h - tile_l0, 12), strict=True):
                a = ref.read((int(x), int(y)), tile_l0, 224).astype(np.int16)
                b = fast.read((int(x), int(y)), tile_l0, 224).astype(np.int16)
                assert np.abs(a - b).mean() < 0.5
                if ref.best_level(tile_l0 / 224) == 0:
                    assert np.array_equal(a, b)  # level 0: the same decoded pixels


def test_read_is_level0_and_downsampled_from_pyramid(slides_dir: Path) -> None:
    with Slide(slides_dir / "CMU-1-Small-Region.pyramid.tif") as s:
        assert s.best_level(1.0) == 0
        assert s.best_level(1.99) == 0
        assert s.best_level(2.01) == 1
        assert s.best_level(4.1) == 2
        # a 448-px footprint read at 224 px comes from level 1 and matches a level-0 read + resize
        from_l1 = s.read((800, 800), 448, 224).astype(np.int16)
        l0 = s.read_region((800, 800), 0, (448, 448))
    from wsi_screen.slide.slide import resize

    assert np.abs(from_l1 - resize(l0, (224, 224)).astype(np.int16)).mean() < 6.0


def test_ome_tiff_pyramid_is_read_with_all_levels(tmp_path: Path) -> None:
    img = block_image((2048, 1536), [(256, 256, 1280, 1024)])
    path = write_ome_tiff(tmp_path / "qupath-export.ome.tif", img, mpp=0.25)
    with Slide(path) as s:
        assert s.name == "qupath-export"
        assert s.vendor == "ome-tiff"
        assert s.reader_name == "tifffile"
        assert s.level_dimensions == ((2048, 1536), (1024, 768), (512, 384))
        assert s.mpp == pytest.approx(0.25)
        ome = s.read((256, 256), 512, 256)
    twin = write_tiled_tiff(tmp_path / "twin.tif", img, mpp=0.25)
    with Slide(twin) as t:
        assert np.array_equal(t.read((256, 256), 512, 256), ome)


def test_plain_tiff_needs_slide_mpp(tmp_path: Path) -> None:
    path = write_plain_tiff(tmp_path / "strip.tif", block_image((600, 400), [(0, 0, 300, 400)]))
    with pytest.raises(MissingMppError):
        Slide(path)
    with Slide(path, mpp=1.0) as s:
        patch = s.read((250, 100), 100, 100)
    assert patch.shape == (100, 100, 3)
    assert patch[:, :40].mean() < 230 < patch[:, 60:].mean()  # tissue left of x=300, glass right


def test_tifffile_reads_the_resolution_a_tiff_declares(tmp_path: Path, slides_dir: Path) -> None:
    """The tifffile reader used to say "does not declare its resolution" of files that do."""
    with Slide(slides_dir / "CMU-1-Small-Region.svs", reader="tifffile") as s:  # Aperio's "MPP = 0.4990"
        assert (s.reader_name, s.mpp, s.mpp_source) == ("tifffile", pytest.approx(0.499), "slide")
    img = block_image((600, 400), [(0, 0, 300, 400)])
    cm = tmp_path / "cm.tif"  # a strip TIFF (OpenSlide does not open it) at 20,000 px/cm = 0.5 um/px
    tifffile.imwrite(cm, img, photometric="rgb", rowsperstrip=64, resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    with Slide(cm) as s:
        assert (s.mpp, s.mpp_source) == (0.5, "slide")
    inch = tmp_path / "inch.tif"  # 300 dpi is a printer's figure, not a scan's: as OpenSlide, not trusted
    tifffile.imwrite(inch, img, photometric="rgb", rowsperstrip=64, resolution=(300, 300), resolutionunit="INCH")
    with pytest.raises(MissingMppError, match="does not declare its resolution"):
        Slide(inch)


def test_thumbnail_blocks_match_whole_resize(slides_dir: Path) -> None:
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        small = s.thumbnail(2.0)
        thumb = s.thumbnail(0.6)  # 1850 x 2472: read and reduced in 1024-px blocks
        whole = s.read_region((0, 0), 0, s.dimensions)
    from wsi_screen.slide.slide import resize

    assert small.shape == (round(2967 * 0.499 / 2.0), round(2220 * 0.499 / 2.0), 3)
    assert thumb.shape == (round(2967 * 0.499 / 0.6), round(2220 * 0.499 / 0.6), 3)
    f = 0.6 / 0.499  # isotropic: level-0 pixels per thumbnail pixel on both axes
    padded = np.full((2980, 2230, 3), 255, dtype=np.uint8)  # readers pad past the edge with white
    padded[:2967, :2220] = whole
    ref = resize(padded, (thumb.shape[1], thumb.shape[0]), box=(0, 0, thumb.shape[1] * f, thumb.shape[0] * f))
    assert np.abs(thumb.astype(np.int16) - ref).mean() < 0.5
    # no seams at block edges: the row across the first block boundary is as close as any other
    assert np.abs(thumb[1023:1025].astype(np.int16) - ref[1023:1025]).mean() < 2.0


@pytest.mark.parametrize("content", [b"", b"this is not a slide\n" * 50, bytes(range(256)) * 64])
def test_junk_with_slide_extension(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.svs"
    path.write_bytes(content)
    with pytest.raises(SlideOpenError, match=r"junk\.svs"):
        Slide(path)


def test_truncated_svs_fails_cleanly(tmp_path: Path, cmu_svs: Path) -> None:
    data = cmu_svs.read_bytes()
    for cut in (100, len(data) // 3, len(data) // 2, len(data) - 1000):
        path = tmp_path / f"cut{cut}.svs"
        path.write_bytes(data[:cut])
        with pytest.raises(WsiScreenError, match=re.escape(path.name)), Slide(path) as s:
            for y in range(0, 2967 - 224, 224):
                for x in range(0, 2220 - 224, 224):
                    s.read((x, y), 224, 224)


def _corrupt_tile(src: Path, dst: Path, index: int) -> None:
    shutil.copy(src, dst)
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with dst.open("r+b") as fh:
        fh.seek(offset + count // 4)
        fh.write(b"\xff\xd9" + bytes(range(256)) * (count // 512))


def test_corrupt_tile_data_raises_read_error(tmp_path: Path, cmu_svs: Path) -> None:
    path = tmp_path / "corrupt.svs"
    _corrupt_tile(cmu_svs, path, index=60)
    with Slide(path) as s, pytest.raises(SlideReadError, match=r"corrupt\.svs"):
        for y in range(0, 2967 - 240, 240):
            for x in range(0, 2220 - 240, 240):
                s.read((x, y), 240, 240)


def test_slide_pickles_by_path(cmu_svs: Path) -> None:
    with Slide(cmu_svs) as s:
        clone = pickle.loads(pickle.dumps(s))
        assert clone.path == s.path and clone.dimensions == s.dimensions
        assert np.array_equal(clone.read((0, 0), 64, 64), s.read((0, 0), 64, 64))
        clone.close()


def test_missing_path() -> None:
    with pytest.raises(SlideOpenError, match="no such file"):
        Slide("/nonexistent/slide.svs")


def test_threads_decode_each_tile_once(slides_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reader threads streaming neighbouring patches (as the tiler does) decode every JPEG tile once: a
    tile asked for while another thread decodes it is waited for, not decoded again."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_screen.slide.readers.tiff_reader import TiffReader

    decoded: list[tuple[int, int]] = []
    original = TiffReader._decode

    def counting(self: TiffReader, page: object, index: int, level: int) -> np.ndarray:
        decoded.append((level, index))
        return original(self, page, index, level)

    monkeypatch.setattr(TiffReader, "_decode", counting)
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as s:
        assert s.reader_name == "tifffile"
        w, h = s.dimensions
        coords = [(x, y) for y in range(0, h - 224, 112) for x in range(0, w - 224, 112)]  # overlapping
        with ThreadPoolExecutor(max_workers=4) as pool:
            reads = list(pool.map(lambda xy: s.read(xy, 224, 224), coords))
    threaded = list(decoded)
    # every 240-px tile of level 0 under a patch (10 tiles a row; all fit the 32 MB cache) decoded exactly once
    needed = {(0, ty * 10 + tx) for x, y in coords
              for ty in range(y // 240, (y + 223) // 240 + 1) for tx in range(x // 240, (x + 223) // 240 + 1)}
    assert sorted(threaded) == sorted(needed)
    with Slide(slides_dir / "CMU-1-Small-Region.svs") as single:  # and the pixels are a lone reader's
        for xy, img in zip(coords[::17], reads[::17], strict=True):
            assert np.array_equal(img, single.read(xy, 224, 224))


@pytest.mark.parametrize(("scan", "ok"), [
    (b"\x12\xff\x00\x34", True),  # stuffed 0xFF
    (b"\x12\xff\xd3\x34\xff\xd7", True),  # restart markers
    (b"", True),
    (b"\x12\xff\x12\x34", False),  # a stray marker inside the entropy-coded data
    (b"\x12\x34\xff", False),  # 0xFF right before EOI
    (b"\xff\xff\x00", False),  # only the second 0xFF is stuffed
])
def test_jpeg_stream_check(scan: bytes, ok: bool) -> None:
    """The structural check behind "corrupt JPEG data in tile ...": every 0xFF after the scan header is a
    stuffed byte or a restart marker, and the stream ends with EOI."""
    import imagecodecs

    from wsi_screen.slide.readers.tiff_reader import jpeg_stream_ok

    assert jpeg_stream_ok(b"\xff\xd8\xff\xda\x00\x02" + scan + b"\xff\xd9") is ok
    assert not jpeg_stream_ok(b"\xff\xd8\xff\xda\x00\x02" + scan)  # no EOI
    real = imagecodecs.jpeg8_encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert jpeg_stream_ok(real)
    assert not jpeg_stream_ok(real[:len(real) // 2] + b"\x00\xff\x42" + real[len(real) // 2:])


@pytest.mark.parametrize(("level", "size", "why"), [
    (0, (-10, 10), "`size` must be a positive (w, h) in pixels, got (-10, 10)"),
    (0, (0, 5), "`size` must be a positive (w, h) in pixels, got (0, 5)"),
    (0, ("a", 5), "`size` must be a positive (w, h) in pixels, got ('a', 5)"),
    (0, (5,), "`size` must be a positive (w, h) in pixels, got (5,)"),
    (9, (5, 5), "`level` 9 does not exist (the slide has levels 0-3)"),
    (-1, (5, 5), "`level` -1 does not exist (the slide has levels 0-3)"),
    (1.5, (5, 5), "`level` 1.5 does not exist (the slide has levels 0-3)"),
    ("0", (5, 5), "`level` '0' does not exist (the slide has levels 0-3)"),
])
def test_read_region_refuses_a_bad_size_or_level_in_one_error(slides_dir: Path, level: object, size: object,
                                                              why: str) -> None:
    """read_region((0, 0), 0, (-10, 10)) raised numpy's 'negative dimensions are not allowed'."""
    with Slide(slides_dir / "CMU-1-Small-Region.pyramid.tif") as s:
        with pytest.raises(ConfigError) as caught:
            s.read_region((0, 0), level, size)  # type: ignore[arg-type]
        assert str(caught.value).endswith(why)
        assert isinstance(caught.value, WsiScreenError)
        assert s.read_region((0, 0), 0.0, (4.0, 3)).shape == (3, 4, 3)  # type: ignore[arg-type]  # as before


@pytest.mark.parametrize("location", [5, None, "00", (1.5, 2), ("a", 0), (1, 2, 3), (True, 0)])
def test_read_region_and_read_at_refuse_a_bad_location_in_one_error(slides_dir: Path, location: object) -> None:
    """A scalar or None was a TypeError ('int' object is not subscriptable), ('a', 0) a ValueError, and "00",
    (1.5, 2) and (1, 2, 3) were read as some other place."""
    with Slide(slides_dir / "CMU-1-Small-Region.pyramid.tif") as s:
        with pytest.raises(ConfigError) as region:
            s.read_region(location, 0, (8, 8))  # type: ignore[arg-type]
        assert str(region.value) == f"`location` must be a level-0 (x, y) of whole pixels, got {location!r}"
        with pytest.raises(ConfigError) as at:
            s.read_at(location, (8, 8), 1.0)  # type: ignore[arg-type]
        assert str(at.value) == f"`location_l0` must be a level-0 (x, y) of whole pixels, got {location!r}"
        whole = s.read_region((100, 200), 0, (8, 8))
        assert np.array_equal(s.read_region((100.0, np.int64(200)), 0, (8, 8)), whole)  # type: ignore[arg-type]
        assert np.array_equal(s.read_at(np.array([100, 200]), (8, 8), s.mpp), whole)  # type: ignore[arg-type]

@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd (Linux)")
@pytest.mark.parametrize("name", CMU_FORMATS)
def test_a_slide_nobody_closed_frees_its_files_when_collected(slides_dir: Path, name: str) -> None:
    """A notebook cell `slide = open_slide(...)` run again and again, never closed: each slide's files are freed
    with the slide (the tifffile reader held one descriptor per slide until the process ended)."""
    import gc

    def open_fds() -> int:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())

    with Slide(slides_dir / name) as s:  # the first open loads the readers' libraries, which may keep files
        s.thumbnail(8.0)
    gc.collect()
    before = open_fds()
    for _ in range(20):
        s = Slide(slides_dir / name)
        assert s.thumbnail(8.0).shape == (185, 138, 3)
        del s
    gc.collect()
    assert open_fds() == before
