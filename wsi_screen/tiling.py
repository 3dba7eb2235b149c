"""Patch grids (pure): tissue mask + slide size + tile spec -> level-0 integer coordinates.

``tile_size_l0`` is derived here and nowhere else: ``round(size_px * mpp / slide_mpp)``. A grid covers the
slide from (0, 0) with step ``stride_l0`` and keeps only patches lying wholly inside the slide, in row-major
order (y, then x). A patch's tissue fraction is the exact area fraction of its footprint covered by tissue
in the mask, computed from the mask's integral image (the integral of a piecewise-constant image is
bilinear inside each pixel, so sampling it at fractional positions is exact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_screen.errors import ConfigError, ResolutionError

#: a requested mpp may be this much finer than level 0 before it counts as upsampling
MPP_TOLERANCE = 0.05


@dataclass(frozen=True, kw_only=True)
class TileSpec:
    """What patches to cut: resolution, size, overlap and tissue threshold."""

    mpp: float = 0.5
    size_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        if not (self.mpp > 0 and np.isfinite(self.mpp)):
            raise ConfigError(f"--mpp must be a positive number, got {self.mpp}")
        if self.size_px < 8:
            raise ConfigError(f"--size must be at least 8 pixels, got {self.size_px}")
        if not (0 <= self.overlap_px < self.size_px):
            raise ConfigError(f"--overlap must be in [0, size), got {self.overlap_px} for size {self.size_px}")
        if not (0.0 <= self.min_tissue <= 1.0):
            raise ConfigError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tile_size_l0(target_mpp: float, size_px: int, slide_mpp: float, *, name: str = "slide") -> int:
    """Level-0 pixels covered by one patch of ``size_px`` at ``target_mpp``.

    Raises :class:`ResolutionError` when ``target_mpp`` is finer than level 0 (beyond
    :data:`MPP_TOLERANCE`): that would need upsampling, which adds no information.
    """
    if target_mpp < slide_mpp * (1.0 - MPP_TOLERANCE):
        raise ResolutionError(
            f"{name}: requested {target_mpp:g} um/px is finer than the slide's level 0 ({slide_mpp:g} um/px); "
            f"use --mpp {slide_mpp:.4g} or coarser, or a higher-resolution scan")
    return max(1, round(size_px * target_mpp / slide_mpp))


def stride_l0(tile_l0: int, size_px: int, overlap_px: int) -> int:
    """Level-0 step between neighbouring patches for an overlap given in output pixels."""
    return max(1, round((size_px - overlap_px) * tile_l0 / size_px))


@dataclass(frozen=True)
class PatchGrid:
    """Patch positions (level-0 top-left corners, (x, y), row-major) and their tissue fractions."""

    coords: np.ndarray  # int64 (N, 2)
    tissue: np.ndarray  # float32 (N,)
    tile_size_l0: int
    stride_l0: int
    shape: tuple[int, int]  # (columns, rows) of the full grid before tissue filtering

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def grid_positions(dimensions: tuple[int, int], tile_l0: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y start positions of every patch lying wholly inside a slide of ``dimensions`` (w, h)."""
    w, h = dimensions
    xs = np.arange(0, w - tile_l0 + 1, stride, dtype=np.int64) if w >= tile_l0 else np.zeros(0, np.int64)
    ys = np.arange(0, h - tile_l0 + 1, stride, dtype=np.int64) if h >= tile_l0 else np.zeros(0, np.int64)
    return xs, ys


def coverage(mask: np.ndarray, dimensions: tuple[int, int], coords: np.ndarray, tile_l0: int) -> np.ndarray:
    """Exact fraction of each square level-0 footprint covered by ``mask`` (which spans the whole slide)."""
    if coords.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    mh, mw = mask.shape
    if mh == 0 or mw == 0:
        return np.zeros(coords.shape[0], dtype=np.float32)
    w, h = dimensions
    sx, sy = mw / w, mh / h  # mask pixels per level-0 pixel
    # summed-area table, in place in int32 (exact: a mask has at most 8192^2 pixels): 4 bytes per mask pixel
    integral = np.zeros((mh + 1, mw + 1), dtype=np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])

    x0 = coords[:, 0] * sx
    y0 = coords[:, 1] * sy
    x1 = (coords[:, 0] + tile_l0) * sx
    y1 = (coords[:, 1] + tile_l0) * sy
    area = _sample(integral, x1, y1) - _sample(integral, x0, y1) - _sample(integral, x1, y0) \
        + _sample(integral, x0, y0)
    frac = area / ((x1 - x0) * (y1 - y0))
    return np.clip(frac, 0.0, 1.0).astype(np.float32)


def _sample(integral: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear sample of an integral image at fractional (x, y) (clamped to its extent)."""
    mh, mw = integral.shape[0] - 1, integral.shape[1] - 1
    x = np.clip(x, 0.0, mw)
    y = np.clip(y, 0.0, mh)
    xi = np.minimum(np.floor(x).astype(np.int64), mw - 1)
    yi = np.minimum(np.floor(y).astype(np.int64), mh - 1)
    fx, fy = x - xi, y - yi
    a = integral[yi, xi]
    b = integral[yi, xi + 1]
    c = integral[yi + 1, xi]
    d = integral[yi + 1, xi + 1]
    return a * (1 - fx) * (1 - fy) + b * fx * (1 - fy) + c * (1 - fx) * fy + d * fx * fy


def make_grid(mask: np.ndarray, dimensions: tuple[int, int], tile_l0: int, stride: int,
              min_tissue: float) -> PatchGrid:
    """Patches of ``tile_l0`` level-0 pixels every ``stride`` whose tissue fraction is >= ``min_tissue``.

    ``mask`` is a boolean tissue mask covering the whole slide of ``dimensions`` (w, h) at any resolution.
    """
    if tile_l0 < 1 or stride < 1:
        raise ValueError(f"tile size and stride must be >= 1, got {tile_l0} and {stride}")
    xs, ys = grid_positions(dimensions, tile_l0, stride)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    frac = coverage(mask, dimensions, coords, tile_l0)
    keep = frac >= np.float32(min_tissue) - np.float32(1e-6)
    if min_tissue <= 0.0:
        keep[:] = True
    return PatchGrid(coords=coords[keep].reshape(-1, 2), tissue=frac[keep], tile_size_l0=tile_l0,
                     stride_l0=stride, shape=(len(xs), len(ys)))
