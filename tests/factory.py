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
    """An H&E-looking texture: pink stroma with purple nuclei, uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    base = np.empty((h, w, 3), dtype=np.float32)
    base[:] = (226, 150, 190)
    noise = ndi.gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), 3)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    nuclei = noise > 0.35
    base[nuclei] = (120, 70, 160)
    base += rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


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
        levels.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
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
