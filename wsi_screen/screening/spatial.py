"""Patch scores on their grid: connected regions, smoothed maxima and focus sizes (pure numpy/scipy).

Patches of a slide sit on a regular grid (stride ``stride_l0`` level-0 pixels). :func:`patch_grid` puts their
positive-class probabilities back on it (NaN where no patch was scored), and the measures below read it:

* :func:`regions`: the connected regions (8-neighbourhood) of patches with ``p >= threshold``, each with its
  patch count, area in mm^2 and longest axis in mm;
* :func:`smoothed_max`: the highest mean probability of a ``(2r+1)^2`` neighbourhood of tissue patches
  (:func:`smoothed_max_patches`: the patches of that neighbourhood);
* :func:`focus`: a region the slide call counts, with its patches and its outline (:func:`outline_l0`: the union of
  its grid cells as a GeoJSON Polygon or MultiPolygon in level-0 pixels, holes kept).

Tumour is contiguous and false positives of a patch classifier are scattered, so these grow with the size of
a focus, not with the area of the slide (which the top-k mean does).

Sizes are measured at the resolution of one patch (96 px at 0.972 um/px: ~93 um). A region's **longest axis**
is the largest distance between the centres of two of its patches plus one patch side: one patch measures
0.093 mm, two side by side 0.187 mm, three in a row 0.28 mm. A region's **area** is its patch count times the
area of one grid cell. Below ~0.2 mm (isolated tumour cells) this is coarser than the thing measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

#: metastasis size classes (none, itc, micro, macro) by largest diameter in mm (AJCC): upper bounds, exclusive
ITC_MAX_MM = 0.2
MICRO_MAX_MM = 2.0


def mm_words(diameter_mm: float) -> str:
    """A focus's size as every output writes it: two decimals of a millimetre (``1.70``), finer than the ~0.09 mm
    patch grid it is measured on (the heatmap's labels and title, the GeoJSON's names, `infer`'s table, the
    report)."""
    return f"{diameter_mm:.2f}"


def size_class(diameter_mm: float | None) -> str:
    """``none`` (no focus), ``itc`` (< 0.2 mm), ``micro`` (0.2-2 mm) or ``macro`` (> 2 mm)."""
    if diameter_mm is None or diameter_mm <= 0:
        return "none"
    if diameter_mm < ITC_MAX_MM:
        return "itc"
    return "micro" if diameter_mm <= MICRO_MAX_MM else "macro"


#: 8-connectivity: diagonal neighbours join a region (a focus cut by the grid stays one region)
_STRUCTURE = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ScoreGrid:
    """Probabilities on the patch grid (:class:`wsi_screen.tiling.grid.PatchGrid`'s cells, in its (row, col)
    order): ``probs[row, col]`` (NaN: no patch), ``origin_l0`` the level-0 top-left corner of the patch in cell
    (0, 0), ``stride_l0`` the grid step, ``cell_mm`` that step in mm.

    Cell ``(row, col)`` is the ``stride_l0`` square centred on its patch: it starts ``offset_l0`` (half the
    overlap of overlapping patches, else 0) right of and below the patch's top-left corner."""

    probs: np.ndarray
    origin_l0: tuple[int, int]
    stride_l0: int
    cell_mm: float
    index: np.ndarray  # (rows, cols) int64: the patch index in the input order, -1 where none
    offset_l0: int = 0

    def cell_corner_l0(self, row: float, col: float) -> tuple[float, float]:
        """Level-0 (x, y) of the top-left corner of cell (row, col) (fractions give points inside it)."""
        return (self.origin_l0[0] + self.offset_l0 + col * self.stride_l0,
                self.origin_l0[1] + self.offset_l0 + row * self.stride_l0)

    @property
    def tissue(self) -> np.ndarray:
        return ~np.isnan(self.probs)


def patch_grid(coords_l0: np.ndarray, probs: np.ndarray, stride_l0: int, mpp: float,
               tile_size_l0: int | None = None) -> ScoreGrid:
    """Place patch probabilities (N,) at level-0 top-left corners ``coords_l0`` (N, 2) on their grid
    (``tile_size_l0``, when patches overlap, centres each cell on its patch)."""
    xy = np.asarray(coords_l0, dtype=np.int64).reshape(-1, 2)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    stride = max(1, int(stride_l0))
    cell_mm = stride * float(mpp) / 1000.0
    offset = max(0, (int(tile_size_l0) - stride) // 2) if tile_size_l0 else 0
    if xy.shape[0] == 0:
        return ScoreGrid(np.full((0, 0), np.nan), (0, 0), stride, cell_mm, np.full((0, 0), -1, np.int64), offset)
    x0, y0 = int(xy[:, 0].min()), int(xy[:, 1].min())
    cols = np.rint((xy[:, 0] - x0) / stride).astype(np.int64)
    rows = np.rint((xy[:, 1] - y0) / stride).astype(np.int64)
    grid = np.full((int(rows.max()) + 1, int(cols.max()) + 1), np.nan)
    index = np.full(grid.shape, -1, dtype=np.int64)
    grid[rows, cols] = p
    index[rows, cols] = np.arange(p.size)
    return ScoreGrid(grid, (x0, y0), stride, cell_mm, index, offset)


@dataclass(frozen=True)
class Region:
    """One connected region of patches above a threshold."""

    n_patches: int
    area_mm2: float
    longest_axis_mm: float
    max_prob: float
    centre_l0: tuple[int, int]
    cells: np.ndarray  # (n, 2) int (row, col)
    mean_prob: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cells")
        return d


def longest_axis_cells(cells: np.ndarray) -> float:
    """Largest centre-to-centre distance of (row, col) cells, plus one cell (in cells)."""
    c = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    if c.shape[0] <= 1:
        return float(c.shape[0])
    if c.shape[0] > 3:  # the farthest pair lies on the convex hull
        try:
            from scipy.spatial import ConvexHull, QhullError

            c = c[ConvexHull(c).vertices]
        except (QhullError, ValueError):  # collinear cells: the extremes of the line
            pass
    d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d2.max())) + 1.0


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of a boolean grid."""
    labels, n = ndimage.label(mask, structure=_STRUCTURE)
    return labels, int(n)


def regions(grid: ScoreGrid, threshold: float) -> list[Region]:
    """Connected regions of patches with ``p >= threshold``, largest first (ties: higher max probability)."""
    p = grid.probs
    if p.size == 0:
        return []
    mask = np.nan_to_num(p, nan=-1.0) >= threshold
    labels, n = label_regions(mask)
    if n == 0:
        return []
    out = []
    cell_area = grid.cell_mm ** 2
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        rr, cc = np.nonzero(labels[sl] == i)
        rr, cc = rr + sl[0].start, cc + sl[1].start
        cells = np.stack([rr, cc], axis=1)
        vals = p[rr, cc]
        cx, cy = grid.cell_corner_l0(float(rr.mean()) + 0.5, float(cc.mean()) + 0.5)
        out.append(Region(n_patches=int(rr.size), area_mm2=rr.size * cell_area,
                          longest_axis_mm=longest_axis_cells(cells) * grid.cell_mm, max_prob=float(vals.max()),
                          centre_l0=(round(cx), round(cy)), cells=cells, mean_prob=float(vals.mean())))
    out.sort(key=lambda r: (-r.n_patches, -r.max_prob, r.centre_l0[1], r.centre_l0[0]))
    return out


def smoothed(grid: ScoreGrid, radius: int = 1) -> np.ndarray:
    """Mean probability over each patch's ``(2r+1)^2`` neighbourhood (NaN off tissue).

    The sum over the tissue patches of the window is divided by their count, but by at least half the window:
    a patch whose neighbours are mostly glass or unscored (a tissue edge, a lone patch among pale ones) does not
    stand for a whole neighbourhood on its own."""
    p = grid.probs
    if p.size == 0:
        return p.copy()
    present = ~np.isnan(p)
    size = 2 * int(radius) + 1
    total = ndimage.uniform_filter(np.where(present, p, 0.0), size=size, mode="constant") * size * size
    count = ndimage.uniform_filter(present.astype(np.float64), size=size, mode="constant") * size * size
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / np.maximum(np.rint(count), math.ceil(size * size / 2))
    out[~present] = np.nan
    return np.clip(out, 0.0, 1.0)


def smoothed_max(grid: ScoreGrid, radius: int = 1) -> float:
    """The highest neighbourhood mean (see :func:`smoothed`); 0 for an empty grid."""
    s = smoothed(grid, radius)
    return float(np.nanmax(s)) if s.size and not np.isnan(s).all() else 0.0


def smoothed_max_patches(grid: ScoreGrid, radius: int = 1) -> tuple[int, ...]:
    """The patch indices (ascending) of the neighbourhood :func:`smoothed_max` reads: the tissue patches of the
    ``(2r+1)^2`` window around the first cell (row-major) with the highest neighbourhood mean; () for an empty
    grid."""
    s = smoothed(grid, radius)
    if not s.size or np.isnan(s).all():
        return ()
    row, col = np.unravel_index(int(np.nanargmax(s)), s.shape)
    r = int(radius)
    window = grid.index[max(0, row - r):row + r + 1, max(0, col - r):col + r + 1]
    return tuple(sorted(int(i) for i in window[window >= 0]))


@dataclass(frozen=True)
class Focus:
    """A focus the slide call counts (see :func:`wsi_screen.screening.aggregate.foci`): ``rank`` 1 is the largest;
    ``indices`` are its patches (input order, ascending); ``outline_l0`` is the union of its grid cells as a
    GeoJSON geometry in level-0 pixels (:func:`outline_l0`)."""

    rank: int
    n_patches: int
    area_mm2: float
    longest_axis_mm: float
    mean_prob: float
    max_prob: float
    category: str
    centre_l0: tuple[int, int]
    indices: tuple[int, ...] = field(repr=False)  # the repr gives the measurements; these are attributes
    outline_l0: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """Its measurements and outline (not the patch indices)."""
        return {k: v for k, v in asdict(self).items() if k != "indices"}


def focus(region: Region, grid: ScoreGrid, rank: int) -> Focus:
    """A counted region as a :class:`Focus`: its patches, size class and outline."""
    rows, cols = region.cells[:, 0], region.cells[:, 1]
    return Focus(rank=rank, n_patches=region.n_patches, area_mm2=region.area_mm2,
                 longest_axis_mm=region.longest_axis_mm, mean_prob=region.mean_prob, max_prob=region.max_prob,
                 category=size_class(region.longest_axis_mm), centre_l0=region.centre_l0,
                 indices=tuple(sorted(int(i) for i in grid.index[rows, cols])),
                 outline_l0=outline_l0(region.cells, grid))


def outline_l0(cells: np.ndarray, grid: ScoreGrid) -> dict[str, Any]:
    """The outline of grid ``cells`` (n, 2) (row, col) as a GeoJSON geometry in level-0 pixels.

    The union of the cells' squares (:meth:`ScoreGrid.cell_corner_l0`): a ``Polygon`` (exterior ring, then one
    ring per hole) or, where cells touch only at corners or lie apart, a ``MultiPolygon``. Coordinates are integers;
    rings are closed, without repeated or collinear points, and oriented as RFC 7946 asks (exterior
    counter-clockwise, holes clockwise, with x to the right and y up); the geometry is valid (OGC simple features).
    """
    import shapely

    c = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if c.shape[0] == 0:
        return {"type": "Polygon", "coordinates": []}
    x0, y0 = grid.cell_corner_l0(0, 0)
    s = grid.stride_l0
    xs, ys = x0 + c[:, 1] * s, y0 + c[:, 0] * s
    squares = shapely.box(xs, ys, xs + s, ys + s)
    merged = shapely.simplify(shapely.coverage_union_all(squares), 0)  # simplify 0: drops collinear corners
    merged = shapely.orient_polygons(merged, exterior_cw=False)

    def ring(r: Any) -> list[list[int]]:
        return [[round(float(x)), round(float(y))] for x, y in np.asarray(r.coords)]

    def rings(poly: Any) -> list[list[list[int]]]:
        return [ring(poly.exterior), *(ring(h) for h in poly.interiors)]

    if merged.geom_type == "Polygon":
        return {"type": "Polygon", "coordinates": rings(merged)}
    return {"type": "MultiPolygon", "coordinates": [rings(p) for p in merged.geoms]}
