"""Slides the tests write themselves (tifffile), for exact-count assertions and formats we have no file of."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from wsi_screen.synthetic.tiff import write_pyramid

GLASS = (242, 242, 242)


def he_texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An H&E-looking texture: pink stroma with purple nuclei, uint8 (h, w, 3).

    The random numbers are drawn a band of rows at a time (numpy's Generator draws them in order, so the bands
    together are the same numbers as one draw of the whole image): the float64 draws of a 6144 x 6144 texture
    were ~1.2 GB at once, and their page faults cost as much as the drawing."""
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 20) // max(1, w))  # ~1 M pixels a band
    field = np.empty((h, w), dtype=np.float32)
    for y0 in range(0, h, rows):
        field[y0:y0 + rows] = rng.normal(0, 1, (min(h, y0 + rows) - y0, w))
    noise = ndi.gaussian_filter(field, 3)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    nuclei = noise > 0.35
    stroma, nucleus = np.array((226, 150, 190), np.float32), np.array((120, 70, 160), np.float32)
    out = np.empty((h, w, 3), dtype=np.uint8)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        base = np.where(nuclei[y0:y1, :, None], nucleus, stroma)
        base += rng.normal(0, 6, (y1 - y0, w, 3)).astype(np.float32)
        out[y0:y1] = np.clip(base, 0, 255)
    return out


def block_image(size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]], seed: int = 0) -> np.ndarray:
    """Glass of ``size`` (w, h) with H&E texture inside each (x0, y0, x1, y1) box."""
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = GLASS
    tex = he_texture(h, w, seed)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = tex[y0:y1, x0:x1]
    return img


def _levels(img: np.ndarray, min_side: int = 256) -> list[np.ndarray]:
    levels = [img]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        quad = prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3)
        total = quad[:, 0, :, 0].astype(np.uint16) + quad[:, 0, :, 1] + quad[:, 1, :, 0] + quad[:, 1, :, 1]
        levels.append((total >> 2).astype(np.uint8))  # the 2x2 mean, truncated (sum / 4 is exact)
    return levels


def write_tiled_tiff(path: Path, img: np.ndarray, mpp: float | None, *, tile: int = 256,
                     compression: str = "jpeg", pyramid: bool = True) -> Path:
    """A generic tiled pyramidal TIFF (one IFD per level) that OpenSlide reads as ``generic-tiff``."""
    write_pyramid(path, _levels(img) if pyramid else [img], mpp=mpp, tile=tile, compression=compression)
    return path


def write_ome_tiff(path: Path, img: np.ndarray, mpp: float, *, tile: int = 256) -> Path:
    """An OME-TIFF pyramid with sub-resolutions in SubIFDs (the QuPath / bfconvert layout)."""
    levels = _levels(img)
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        tw.write(levels[0], tile=(tile, tile), compression="jpeg", photometric="rgb",
                 subifds=len(levels) - 1, metadata=meta)
        for lvl in levels[1:]:
            tw.write(lvl, tile=(tile, tile), compression="jpeg", photometric="rgb", subfiletype=1,
                     metadata=None)
    return path


def write_plain_tiff(path: Path, img: np.ndarray) -> Path:
    """A plain strip TIFF without resolution (OpenSlide does not read it)."""
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=64, metadata=None)
    return path
