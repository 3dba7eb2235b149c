"""Patch grids (pure): tissue mask + slide size + tile spec -> level-0 integer coordinates.

``tile_size_l0`` is derived here and nowhere else: ``round(size_px * mpp / slide_mpp)``. A grid covers the
slide from (0, 0) with step ``stride_l0`` and keeps only patches lying wholly inside the slide, in *band
order*: the grid's columns are cut into vertical bands of :data:`BAND_COLUMNS`, taken left to right, and each
band is row-major (y, then x). A reader that streams patches in this order works across a bounded width of the
slide (a band), so the tiles it must keep decoded do not grow with the slide's width; a grid narrower than a
band is plain row-major. A patch's tissue fraction is the exact area fraction of its footprint covered by tissue
in the mask, computed from the mask's integral image (the integral of a piecewise-constant image is
bilinear inside each pixel, so sampling it at fractional positions is exact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_screen.errors import ConfigError, ResolutionError, check_number, check_whole, positive_mpp

#: a requested mpp may be this much finer than level 0 before it counts as upsampling
MPP_TOLERANCE = 0.05
#: grid columns per band of the patch order (32 patches of 224 px at 0.5 um/px: 3.6 mm of slide)
BAND_COLUMNS = 32


@dataclass(frozen=True, kw_only=True)
class TileSpec:
    """What patches to cut: resolution, size, overlap and tissue threshold."""

    mpp: float = 0.5
    size_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        # kept as the plain Python numbers the checks give: a numpy scalar (np.float32(0.5), a DataFrame's int64)
        # is a number too, but the store's settings (JSON) cannot hold it
        plain = {"mpp": positive_mpp(self.mpp),
                 "size_px": check_whole(self.size_px, "size_px", at_least=8, unit="pixels"),
                 "overlap_px": check_whole(self.overlap_px, "overlap_px", at_least=0, unit="pixels"),
                 "min_tissue": check_number(self.min_tissue, "min_tissue", low=0.0, high=1.0)}
        for field, value in plain.items():
            object.__setattr__(self, field, value)
        if self.overlap_px >= self.size_px:
            raise ConfigError(f"`overlap_px` must be in [0, size), got {self.overlap_px} for size {self.size_px}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tile_size_l0(target_mpp: float, size_px: int, slide_mpp: float, *, name: str = "slide",
                 model_mpp: bool = False) -> int:
    """Level-0 pixels covered by one patch of ``size_px`` at ``target_mpp``.

    Raises :class:`ResolutionError` when ``target_mpp`` is finer than level 0 (beyond
    :data:`MPP_TOLERANCE`): that would need upsampling, which adds no information. ``model_mpp``: the target is a
    model's (screening), so the way out is another model or scan, not another ``mpp``.
    """
    if target_mpp < slide_mpp * (1.0 - MPP_TOLERANCE):
        raise ResolutionError(
            f"{name}: requested {target_mpp:g} um/px is finer than the slide's level 0 ({slide_mpp:g} um/px); "
            + (f"the model works at {target_mpp:g} um/px: screen this slide with a model trained at {slide_mpp:.4g} "
               "um/px or coarser, or use a higher-resolution scan (if the declared resolution is wrong, set it with "
               "`slide_mpps`)" if model_mpp else
               f"use `mpp`={slide_mpp:.4g} or coarser, or a higher-resolution scan"))
    return max(1, round(size_px * target_mpp / slide_mpp))


def stride_l0(tile_l0: int, size_px: int, overlap_px: int) -> int:
    """Level-0 step between neighbouring patches for an overlap given in output pixels."""
    return max(1, round((size_px - overlap_px) * tile_l0 / size_px))


@dataclass(frozen=True)
class PatchGrid:
    """Patch positions (level-0 top-left corners, (x, y), in band order) and their tissue fractions."""

    coords: np.ndarray  # int64 (N, 2)
    tissue: np.ndarray  # float32 (N,)
    tile_size_l0: int
    stride_l0: int
    shape: tuple[int, int]  # (rows, columns) of the full grid before tissue filtering, numpy's order

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def grid_positions(dimensions: tuple[int, int], tile_l0: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y start positions of every patch lying wholly inside a slide of ``dimensions`` (w, h)."""
    w, h = dimensions
    xs = np.arange(0, w - tile_l0 + 1, stride, dtype=np.int64) if w >= tile_l0 else np.zeros(0, np.int64)
    ys = np.arange(0, h - tile_l0 + 1, stride, dtype=np.int64) if h >= tile_l0 else np.zeros(0, np.int64)
    return xs, ys


def coverage(mask: np.ndarray, dimensions: tuple[int, int], coords: np.ndarray, tile_l0: int) -> np.ndarray:
    """Exact fraction of each square level-0 footprint covered by ``mask`` (which spans the whole slide).

    Footprints are measured band by band of :data:`_MASK_ROWS` mask rows, each with the summed-area table of
    just the rows its footprints cover (the four-corner difference does not change when a table is rebased
    to start at any row), so memory stays a few MB whatever the mask's size.
    """
    out = np.zeros(coords.shape[0], dtype=np.float32)
    mh, mw = mask.shape
    if coords.shape[0] == 0 or mh == 0 or mw == 0:
        return out
    w, h = dimensions
    sx, sy = mw / w, mh / h  # mask pixels per level-0 pixel
    x0_all = coords[:, 0] * sx
    y0_all = coords[:, 1] * sy
    band = np.minimum(np.floor(y0_all).astype(np.int64), mh - 1) // _MASK_ROWS
    for b in np.unique(band):
        idx = np.flatnonzero(band == b)
        x0, y0 = x0_all[idx], y0_all[idx]
        x1 = (coords[idx, 0] + tile_l0) * sx
        y1 = (coords[idx, 1] + tile_l0) * sy
        r0 = int(b) * _MASK_ROWS
        r1 = min(mh, int(np.floor(y1.max())) + 2)
        local = _integral(mask[r0:r1])  # rows r0..r1 of the whole table, minus row r0
        area = _sample(local, x1, y1 - r0) - _sample(local, x0, y1 - r0) - _sample(local, x1, y0 - r0) \
            + _sample(local, x0, y0 - r0)
        out[idx] = np.clip(area / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)
    return out


#: mask rows per band of :func:`coverage`
_MASK_ROWS = 256
#: mask rows summed at once by :func:`_integral` (bounds its temporaries)
_INTEGRAL_ROWS = 256


def _integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a boolean mask, (h + 1, w + 1) int32 with a zero first row and column.

    Built strip by strip so that, besides the table itself (exact in int32 for any mask up to 2^31 pixels),
    only one strip's temporaries exist.
    """
    mh, mw = mask.shape
    integral = np.zeros((mh + 1, mw + 1), dtype=np.int32)
    for y0 in range(0, mh, _INTEGRAL_ROWS):
        y1 = min(mh, y0 + _INTEGRAL_ROWS)
        strip = np.cumsum(mask[y0:y1], axis=1, dtype=np.int32)  # row sums
        np.cumsum(strip, axis=0, out=strip)  # down the strip
        strip += integral[y0, 1:]  # plus everything above the strip
        integral[y0 + 1:y1 + 1, 1:] = strip
    return integral


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


def band_order(n_columns: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row indices of every grid cell in band order (see the module docstring)."""
    grid_cols, grid_rows = np.meshgrid(np.arange(n_columns, dtype=np.int64), np.arange(n_rows, dtype=np.int64))
    cols, rows = grid_cols.ravel(), grid_rows.ravel()
    order = np.lexsort((cols, rows, cols // BAND_COLUMNS))  # band, then row, then column
    return cols[order], rows[order]


def make_grid(mask: np.ndarray, dimensions: tuple[int, int], tile_l0: int, stride: int,
              min_tissue: float) -> PatchGrid:
    """Patches of ``tile_l0`` level-0 pixels every ``stride`` whose tissue fraction is >= ``min_tissue``.

    ``mask`` is a boolean tissue mask covering the whole slide of ``dimensions`` (w, h) at any resolution.
    """
    if tile_l0 < 1 or stride < 1:
        raise ValueError(f"tile size and stride must be >= 1, got {tile_l0} and {stride}")
    xs, ys = grid_positions(dimensions, tile_l0, stride)
    cols, rows = band_order(len(xs), len(ys))
    coords = np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64).reshape(-1, 2)
    frac = coverage(mask, dimensions, coords, tile_l0)
    keep = frac >= np.float32(min_tissue) - np.float32(1e-6)
    if min_tissue <= 0.0:
        keep[:] = True
    return PatchGrid(coords=coords[keep].reshape(-1, 2), tissue=frac[keep], tile_size_l0=tile_l0,
                     stride_l0=stride, shape=(len(ys), len(xs)))
