"""wsi_screen.synthetic.tiff: the one pyramid-TIFF writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import tifffile

from wsi_screen.synthetic.tiff import tiles_of, write_pyramid


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_arrays_and_tile_streams_give_the_same_file(tmp_path: Path) -> None:
    img = _image(600, 520)
    half = img[::2, ::2].copy()
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    dims = write_pyramid(a, [img, half], mpp=0.5, compression="zlib")
    write_pyramid(b, [(img.shape, tiles_of(img)), (half.shape, tiles_of(half))], mpp=0.5, compression="zlib")
    assert dims == [(520, 600), (260, 300)]
    assert a.read_bytes() == b.read_bytes()
    with tifffile.TiffFile(a) as tf:
        assert [p.shape for p in tf.pages] == [(600, 520, 3), (300, 260, 3)]
        assert np.array_equal(tf.pages[0].asarray(), img)  # lossless: every pixel back
        assert 254 not in tf.pages[0].tags and tf.pages[1].tags[254].value == 1  # reduced levels marked


def test_openslide_reads_levels_and_resolution(tmp_path: Path) -> None:
    img = _image(1024, 768)
    path = tmp_path / "s.tif"
    write_pyramid(path, [img, img[::2, ::2].copy()], mpp=0.25, description="a test slide",
                  compressionargs={"level": 90})
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == ((768, 1024), (384, 512))
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.25
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].description == "a test slide"
