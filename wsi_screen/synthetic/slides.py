"""Synthetic whole-slide images with known truth, assembled from labelled patches (PCam by default).

A synthetic slide is glass (RGB ~ (242, 242, 242) with slight noise) around a rectangular tissue region of
``grid = (cols, rows)`` patches. Every tissue cell holds one source patch, copied pixel for pixel; positive
slides hold a compact tumour blob (the ``round(tumour_fraction * cols * rows)`` cells nearest a random
centre, i.e. a digital disc) filled with tumour patches, and normal patches everywhere else.

Geometry: the margin is a whole number of patches and the tissue starts at ``(margin_px, margin_px)``, so
the cells sit on the level-0 grid ``x = i * patch_px, y = j * patch_px``. A tiler working at the slide's mpp
with patches of ``patch_px`` (``tile_size_l0 == patch_px``, stride == size) sees exactly the source patches.
Cell indices in :class:`SyntheticTruth` (``tumour_cells``) are indices on that slide-wide grid,
``(x // patch_px, y // patch_px)``, so ``coords_l0 // patch_px`` of a tiler's output can be compared
directly.

The file is a tiled pyramidal TIFF (256-px JPEG tiles, quality 90, no chroma subsampling; each reduced level
halves the previous one until it fits in one tile; ``XResolution``/``YResolution`` in pixels per centimetre)
that OpenSlide reads as ``generic-tiff`` with ``openslide.mpp-x == mpp``. Level 0 is composed and written one
band of 256 rows at a time, so peak memory is level 1 (a quarter of level 0) plus one band: large grids never
hold the full-resolution image. Everything random derives from ``seed``: the same call gives the same bytes.

Only the ``valid`` split is used by default; split names containing "test" are refused so held-out test
data can never leak into synthetic cohorts.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_screen._safe_write import atomic_path, atomic_write_text
from wsi_screen.errors import ConfigError, DatasetError
from wsi_screen.synthetic.tiff import Level, tiles_of, write_pyramid

logger = logging.getLogger(__name__)

#: level-0 resolution of PCam patches (10x, from Camelyon16 at 0.243 um/px downsampled 4x)
PCAM_MPP = 0.972
#: the class names in PCam's labels.csv; also the slide labels written to ``slides.csv``
POSITIVE = "tumour"
NEGATIVE = "normal"
GLASS_RGB = 242
#: glass noise amplitude: uniform integers in [-GLASS_NOISE, GLASS_NOISE] per channel
GLASS_NOISE = 3
TILE_PX = 256
JPEG_QUALITY = 90
DEFAULT_SPLIT = "valid"


@dataclass(frozen=True, kw_only=True)
class SyntheticTruth:
    """What a synthetic slide holds, in level-0 pixels.

    ``tumour_cells`` are ``(col, row)`` indices on the slide-wide patch grid (``x // patch_px``);
    ``tumour_boxes_l0`` are disjoint ``(x0, y0, x1, y1)`` boxes (one per row run of tumour cells, end
    exclusive) whose union is exactly the tumour region; ``sources`` are the patch files (relative to the
    patch folder) of the tissue cells in row-major order.
    """

    name: str
    label: str
    dimensions_l0: tuple[int, int]
    mpp: float
    patch_px: int
    grid: tuple[int, int]
    tissue_box_l0: tuple[int, int, int, int]
    tumour_cells: tuple[tuple[int, int], ...]
    tumour_boxes_l0: tuple[tuple[int, int, int, int], ...]
    sources: tuple[str, ...]
    seed: int
    split: str
    tumour_fraction: float

    @property
    def positive(self) -> bool:
        return self.label == POSITIVE

    def source_at(self, col: int, row: int) -> str:
        """The patch file placed at slide grid cell ``(col, row)`` (a tissue cell)."""
        cols, rows = self.grid
        m = self.tissue_box_l0[0] // self.patch_px
        c, r = col - m, row - m
        if not (0 <= c < cols and 0 <= r < rows):
            raise ConfigError(f"{self.name}: cell ({col}, {row}) is not a tissue cell")
        return self.sources[r * cols + c]

    def tumour_overlap(self, coords_l0: np.ndarray, tile_size_l0: int) -> np.ndarray:
        """Fraction of each square footprint (top-left corners ``coords_l0`` (N, 2)) inside the tumour."""
        xy = np.asarray(coords_l0, dtype=np.int64).reshape(-1, 2)
        area = np.zeros(xy.shape[0], dtype=np.float64)
        for x0, y0, x1, y1 in self.tumour_boxes_l0:  # disjoint boxes: overlaps add up
            w = np.clip(np.minimum(xy[:, 0] + tile_size_l0, x1) - np.maximum(xy[:, 0], x0), 0, None)
            h = np.clip(np.minimum(xy[:, 1] + tile_size_l0, y1) - np.maximum(xy[:, 1], y0), 0, None)
            area += w * h
        return area / float(tile_size_l0 * tile_size_l0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label, "dimensions_l0": list(self.dimensions_l0),
            "mpp": self.mpp, "patch_px": self.patch_px, "grid": list(self.grid),
            "tissue_box_l0": list(self.tissue_box_l0),
            "tumour_cells": [list(c) for c in self.tumour_cells],
            "tumour_boxes_l0": [list(b) for b in self.tumour_boxes_l0],
            "sources": list(self.sources), "seed": self.seed, "split": self.split,
            "tumour_fraction": self.tumour_fraction,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyntheticTruth:
        def pair(v: Sequence[int]) -> tuple[int, int]:
            return int(v[0]), int(v[1])

        def box(v: Sequence[int]) -> tuple[int, int, int, int]:
            return int(v[0]), int(v[1]), int(v[2]), int(v[3])

        return cls(
            name=str(data["name"]), label=str(data["label"]), dimensions_l0=pair(data["dimensions_l0"]),
            mpp=float(data["mpp"]), patch_px=int(data["patch_px"]), grid=pair(data["grid"]),
            tissue_box_l0=box(data["tissue_box_l0"]),
            tumour_cells=tuple(pair(c) for c in data["tumour_cells"]),
            tumour_boxes_l0=tuple(box(b) for b in data["tumour_boxes_l0"]),
            sources=tuple(str(s) for s in data["sources"]), seed=int(data["seed"]), split=str(data["split"]),
            tumour_fraction=float(data["tumour_fraction"]))


# ------------------------------------------------------------------------------------------ patch pool
def check_split(split: str) -> None:
    """Refuse split names that look like held-out test data."""
    if "test" in split.lower():
        raise ConfigError(f"split {split!r}: synthetic slides never use test data; use 'valid' or 'train'")


def load_pool(patches_dir: Path, split: str) -> dict[str, list[str]]:
    """Relative patch paths per class (``normal``, ``tumour``) of ``split`` from ``labels.csv``, sorted."""
    check_split(split)
    labels = patches_dir / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"{labels}: no labels.csv (columns path,label,split) in the patch folder")
    pool: dict[str, list[str]] = {NEGATIVE: [], POSITIVE: []}
    with labels.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "split"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{labels}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            if row["split"] == split and row["label"] in pool:
                pool[row["label"]].append(row["path"])
    for cls, paths in pool.items():
        if not paths:
            raise DatasetError(f"{labels}: no {cls!r} patches in split {split!r}")
        paths.sort()
    return pool


def _draw(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    """``n`` items of ``pool``: whole random permutations, concatenated, so repeats are as rare as can be."""
    out: list[str] = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool)))
    return out[:n]


def _read_patch(path: Path, patch_px: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read patch image: {exc}") from exc
    if arr.shape != (patch_px, patch_px, 3):
        raise DatasetError(f"{path}: patch is {arr.shape[1]}x{arr.shape[0]} px, expected "
                           f"{patch_px}x{patch_px}")
    return arr


def _patch_size(path: Path) -> int:
    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read patch image: {exc}") from exc
    if w != h:
        raise DatasetError(f"{path}: patches must be square, got {w}x{h} px")
    return int(w)


# ---------------------------------------------------------------------------------------------- layout
def tumour_cells(rng: np.random.Generator, grid: tuple[int, int], n: int) -> list[tuple[int, int]]:
    """The ``n`` tissue cells (col, row) nearest a random centre: a compact, disc-like blob."""
    cols, rows = grid
    r = math.sqrt(n / math.pi)
    cx = rng.uniform(min(r, cols / 2), max(cols - r, cols / 2))
    cy = rng.uniform(min(r, rows / 2), max(rows - r, rows / 2))
    gy, gx = np.mgrid[0:rows, 0:cols]
    d2 = (gx + 0.5 - cx) ** 2 + (gy + 0.5 - cy) ** 2
    order = np.lexsort((gx.ravel(), gy.ravel(), d2.ravel()))[:n]  # nearest first, ties row-major
    chosen = sorted((int(gy.ravel()[i]), int(gx.ravel()[i])) for i in order)
    return [(c, rr) for rr, c in chosen]


def row_boxes(cells: Sequence[tuple[int, int]], patch_px: int) -> list[tuple[int, int, int, int]]:
    """Disjoint level-0 boxes, one per horizontal run of cells (slide grid indices)."""
    boxes: list[tuple[int, int, int, int]] = []
    for c, r in sorted(cells, key=lambda t: (t[1], t[0])):
        if boxes and boxes[-1][1] == r * patch_px and boxes[-1][2] == c * patch_px:
            x0, y0, _, y1 = boxes[-1]
            boxes[-1] = (x0, y0, (c + 1) * patch_px, y1)
        else:
            boxes.append((c * patch_px, r * patch_px, (c + 1) * patch_px, (r + 1) * patch_px))
    return boxes


# ---------------------------------------------------------------------------------------------- writing
def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 box-filter downsample (rounded), replicating the last row/column of odd-sized arrays."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = a[0::2, 0::2].astype(np.uint16)
    s += a[1::2, 0::2]
    s += a[0::2, 1::2]
    s += a[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


class _Composer:
    """Composes level 0 band by band and fills level 1 as a side effect."""

    def __init__(self, dims: tuple[int, int], margin_px: int, patch_px: int, grid: tuple[int, int],
                 sources: Sequence[str], patches_dir: Path, seed: int) -> None:
        self.w, self.h = dims
        self.margin, self.p = margin_px, patch_px
        self.cols, self.rows = grid
        self.sources, self.patches_dir, self.seed = sources, patches_dir, seed
        self.level1 = np.empty(((self.h + 1) // 2, (self.w + 1) // 2, 3), dtype=np.uint8)
        self._strips: dict[int, np.ndarray] = {}

    def _strip(self, row: int) -> np.ndarray:
        """The decoded patches of tissue row ``row`` side by side, (patch_px, cols * patch_px, 3)."""
        strip = self._strips.get(row)
        if strip is None:
            strip = np.concatenate([
                _read_patch(self.patches_dir / self.sources[row * self.cols + c], self.p)
                for c in range(self.cols)], axis=1)
            self._strips[row] = strip
        return strip

    def band(self, index: int) -> np.ndarray:
        y0 = index * TILE_PX
        y1 = min(self.h, y0 + TILE_PX)
        top, p = self.margin, self.p
        if top == 0 and self.cols * p == self.w and y1 <= self.rows * p:
            # the tissue rows' strips cover the whole band (a layout slide's do): its glass would be overwritten
            out = np.empty((y1 - y0, self.w, 3), dtype=np.uint8)
        else:
            rng = np.random.default_rng([self.seed, 1, index])  # one stream per band: skipping one moves no other
            noise = rng.integers(-GLASS_NOISE, GLASS_NOISE + 1, size=(y1 - y0, self.w, 3), dtype=np.int16)
            out = (noise + GLASS_RGB).astype(np.uint8)
        first = max(0, (y0 - top) // p)
        last = min(self.rows - 1, (y1 - 1 - top) // p)
        for row in [r for r in self._strips if r < first]:
            del self._strips[row]
        for row in range(first, last + 1):
            ry0 = top + row * p
            a, b = max(y0, ry0), min(y1, ry0 + p)
            if a < b:
                out[a - y0:b - y0, top:top + self.cols * p] = self._strip(row)[a - ry0:b - ry0]
        return out

    def level0_tiles(self) -> Iterator[np.ndarray]:
        for index in range(math.ceil(self.h / TILE_PX)):
            band = self.band(index)
            y0 = index * TILE_PX  # even, so the band halves onto whole level-1 rows
            half = _halve(band)
            self.level1[y0 // 2:y0 // 2 + half.shape[0]] = half
            yield from tiles_of(band, TILE_PX)


def _write_tiff(path: Path, composer: _Composer, mpp: float, description: str) -> list[tuple[int, int]]:
    def levels() -> Iterator[Level]:
        yield (composer.h, composer.w, 3), composer.level0_tiles()
        level = composer.level1  # filled while level 0 was written
        while True:
            yield level.shape, tiles_of(level, TILE_PX)
            if max(level.shape[:2]) <= TILE_PX:
                break
            level = _halve(level)

    return write_pyramid(path, levels(), mpp=mpp, tile=TILE_PX, bigtiff=composer.w * composer.h * 3 > 2**31,
                         description=description, compressionargs={"level": JPEG_QUALITY}, subsampling=(1, 1),
                         software="wsi-screen synthetic")


# ---------------------------------------------------------------------------------------------- API
def default_patches_dir() -> Path:
    """PCam's labelled patches: ``$WSI_SCREEN_DATA/patches/pcam``, or, in a source checkout, the shared data
    folder beside the repository. Installed without either, a one-line error says to set the variable (or
    pass the folder: every builder takes ``patches_dir``)."""
    data = os.environ.get("WSI_SCREEN_DATA")
    if data:
        return Path(data) / "patches" / "pcam"
    checkout = Path(__file__).resolve().parents[2]  # the repository, when running from a source tree
    beside = checkout.parent / "shared" / "data" / "patches" / "pcam"
    if (checkout / "pyproject.toml").is_file() and beside.is_dir():
        return beside
    raise DatasetError("no labelled patches to build synthetic slides from: set WSI_SCREEN_DATA to the data "
                       "folder (holding patches/pcam) or pass the patches folder")


def build_slide(out_path: str | os.PathLike[str], *, patches_dir: str | os.PathLike[str], positive: bool,
                grid: tuple[int, int] = (16, 16), tumour_fraction: float = 0.1, seed: int = 0,
                mpp: float = PCAM_MPP, margin_px: int | None = None, split: str = DEFAULT_SPLIT,
                name: str | None = None) -> SyntheticTruth:
    """Write one synthetic slide to ``out_path`` (atomically) and return its truth.

    ``grid`` is (cols, rows) of tissue patches; ``margin_px`` (default two patches) is the glass border and
    must be a multiple of the patch size. Positive slides get ``max(1, round(tumour_fraction * cols * rows))``
    tumour cells in one compact blob.
    """
    check_split(split)
    cols, rows = (int(grid[0]), int(grid[1]))
    if cols < 1 or rows < 1:
        raise ConfigError(f"grid must be at least 1x1 patches, got {cols}x{rows}")
    if not (0.0 < tumour_fraction <= 1.0):
        raise ConfigError(f"tumour_fraction must be in (0, 1], got {tumour_fraction}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"mpp must be a positive number, got {mpp}")
    pdir = Path(patches_dir)
    pool = load_pool(pdir, split)
    patch_px = _patch_size(pdir / pool[NEGATIVE][0])
    margin = 2 * patch_px if margin_px is None else int(margin_px)
    if margin < 0 or margin % patch_px:
        raise ConfigError(f"margin_px must be a non-negative multiple of the patch size {patch_px}, "
                          f"got {margin}")
    out = Path(out_path)
    name = name or out.stem
    rng = np.random.default_rng([seed, 0])

    n_cells = cols * rows
    cells: list[tuple[int, int]] = []
    if positive:
        n_t = min(n_cells, max(1, round(tumour_fraction * n_cells)))
        cells = tumour_cells(rng, (cols, rows), n_t)
    is_t = np.zeros((rows, cols), dtype=bool)
    for c, r in cells:
        is_t[r, c] = True
    normals = iter(_draw(rng, pool[NEGATIVE], n_cells - len(cells)))
    tumours = iter(_draw(rng, pool[POSITIVE], len(cells)))
    sources = [next(tumours) if t else next(normals) for t in is_t.ravel()]

    m = margin // patch_px
    slide_cells = tuple((c + m, r + m) for c, r in cells)
    dims = (2 * margin + cols * patch_px, 2 * margin + rows * patch_px)
    truth = SyntheticTruth(
        name=name, label=POSITIVE if positive else NEGATIVE, dimensions_l0=dims, mpp=float(mpp),
        patch_px=patch_px, grid=(cols, rows),
        tissue_box_l0=(margin, margin, margin + cols * patch_px, margin + rows * patch_px),
        tumour_cells=slide_cells, tumour_boxes_l0=tuple(row_boxes(slide_cells, patch_px)),
        sources=tuple(sources), seed=int(seed), split=split, tumour_fraction=float(tumour_fraction))

    composer = _Composer(dims, margin, patch_px, (cols, rows), sources, pdir, seed)
    with atomic_path(out) as tmp:
        levels = _write_tiff(tmp, composer, mpp, f"wsi-screen synthetic slide {name}: {truth.label}")
    logger.info("%s: %dx%d px, %d levels, %d tumour cells", out, dims[0], dims[1], len(levels), len(cells))
    return truth


def build_cohort(out_dir: str | os.PathLike[str], *, n_pos: int, n_neg: int, seed: int,
                 patches_dir: str | os.PathLike[str] | None = None, grid: tuple[int, int] = (16, 16),
                 tumour_fraction: float = 0.1, mpp: float = PCAM_MPP, margin_px: int | None = None,
                 split: str = DEFAULT_SPLIT) -> list[SyntheticTruth]:
    """Write ``n_pos + n_neg`` slides ``synth_000.tiff``... (labels in shuffled order, so names do not give
    them away), ``truth.json`` (every slide's :class:`SyntheticTruth`) and ``slides.csv`` (slide,label)."""
    check_split(split)
    if n_pos < 0 or n_neg < 0 or n_pos + n_neg == 0:
        raise ConfigError(f"need at least one slide, got {n_pos} positive and {n_neg} negative")
    pdir = Path(patches_dir) if patches_dir is not None else default_patches_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    n = n_pos + n_neg
    labels = rng.permutation(np.array([True] * n_pos + [False] * n_neg))
    seeds = rng.integers(0, 2**31 - 1, size=n)
    truths = []
    for i in range(n):
        name = f"synth_{i:03d}"
        truths.append(build_slide(out / f"{name}.tiff", patches_dir=pdir, positive=bool(labels[i]),
                                  grid=grid, tumour_fraction=tumour_fraction, seed=int(seeds[i]), mpp=mpp,
                                  margin_px=margin_px, split=split, name=name))
    doc = {"seed": seed, "split": split, "patches_dir": str(pdir), "slides": [t.to_json() for t in truths]}
    atomic_write_text(out / "truth.json", json.dumps(doc, indent=1) + "\n")
    lines = ["slide,label"] + [f"{t.name},{t.label}" for t in truths]
    atomic_write_text(out / "slides.csv", "\n".join(lines) + "\n")
    return truths


def load_truth(path: str | os.PathLike[str]) -> list[SyntheticTruth]:
    """Read a cohort's ``truth.json``."""
    with Path(path).open(encoding="utf-8") as fh:
        doc = json.load(fh)
    return [SyntheticTruth.from_json(d) for d in doc["slides"]]


# ------------------------------------------------------------------------------------ layout slides
def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Element ``k`` (0-7) of the dihedral group on an (H, W, C) image: ``k % 4`` quarter turns, then a
    horizontal flip when ``k >= 4``."""
    out = np.rot90(image, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


class _LayoutComposer(_Composer):
    """Composes a :class:`wsi_screen.synthetic.cohort.SlideLayout`: each tissue cell is its source patch in its
    dihedral orientation, every other cell glass."""

    def __init__(self, layout: Any, pools: dict[str, list[str]], patches_dir: Path, patch_px: int,
                 seed: int) -> None:
        rows, cols = layout.tissue.shape
        super().__init__((cols * patch_px, rows * patch_px), 0, patch_px, (cols, rows), [], patches_dir, seed)
        self.layout, self.pools = layout, pools

    def _strip(self, row: int) -> np.ndarray:
        strip = self._strips.get(row)
        if strip is None:
            lay, p = self.layout, self.p
            rng = np.random.default_rng([self.seed, 3, row])
            strip = (rng.integers(-GLASS_NOISE, GLASS_NOISE + 1, size=(p, self.cols * p, 3), dtype=np.int16)
                     + GLASS_RGB).astype(np.uint8)
            for c in np.flatnonzero(lay.tissue[row]):
                cls = POSITIVE if lay.tumour[row, c] else NEGATIVE
                patch = _read_patch(self.patches_dir / self.pools[cls][int(lay.patch[row, c])], p)
                strip[:, c * p:(c + 1) * p] = dihedral(patch, int(lay.orient[row, c]))
            self._strips[row] = strip
        return strip


def build_layout_slide(out_path: str | os.PathLike[str], layout: Any, *, patches_dir: str | os.PathLike[str],
                       split: str = DEFAULT_SPLIT, mpp: float = PCAM_MPP, seed: int = 0) -> None:
    """Write the pyramidal TIFF of a calibration-cohort layout (:mod:`wsi_screen.synthetic.cohort`), atomically.

    Cell ``(row, col)`` of the layout is the level-0 square at ``(col * patch_px, row * patch_px)``; the
    patch indices refer to :func:`load_pool` of ``split`` (the order a :class:`~wsi_screen.synthetic.cohort.ScoreBank`
    of the same folder uses)."""
    check_split(split)
    pdir = Path(patches_dir)
    pools = load_pool(pdir, split)
    patch_px = _patch_size(pdir / pools[NEGATIVE][0])
    composer = _LayoutComposer(layout, pools, pdir, patch_px, seed)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        _write_tiff(tmp, composer, mpp, f"wsi-screen synthetic slide {out.stem}: "
                                        f"{POSITIVE if layout.positive else NEGATIVE}")
