"""Calibration cohorts: slide layouts that look like lymph-node sections, and their patch scores.

A slide-level rule is chosen on slides with known truth. Building and screening thousands of real pyramidal
TIFFs on a CPU would take hours, but a synthetic slide is nothing but a grid of labelled patches, each in
one of the 8 orientations of the dihedral group. So the model's positive-class probability of every patch of
the source split in every orientation is computed once (a :class:`ScoreBank`, 8 forward passes per patch), and
a slide's patch scores are then a lookup: the same numbers ``infer`` would produce on the slide written by
:func:`wsi_screen.synthetic.slides.build_layout_slide` from the same :class:`SlideLayout` (up to JPEG re-encoding of
the tiles; measured in docs/default-model.md).

Layouts (:func:`make_layout`) have irregular tissue (a thresholded smooth random field, one to three
fragments) of a chosen number of patches, and foci that are irregular too (grown cell by cell from a seed
with a bias towards a random elongation) in four size classes by their longest diameter, as in the AJCC
staging of nodal metastases: ``itc`` (< 0.2 mm, isolated tumour cells), ``micro`` (0.2-2 mm) and ``macro``
(> 2 mm). The resolution is one patch (~93 um at 96 px x 0.972 um/px).

Only the ``valid`` split is used (never test); choices are made on one seed's cohort and reported on another's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen.errors import ConfigError, DatasetError
from wsi_screen.screening.spatial import size_class
from wsi_screen.synthetic.slides import dihedral

log = logging.getLogger(__name__)

BANK_FORMAT = 1
#: patches are kept in the bank box-reduced by this factor (96 px -> 12 px: ~7.8 um/px, the tiler masks at 8)
THUMB_FACTOR = 8
#: the tiler's default minimum tissue fraction of a patch (``min_tissue``)
MIN_TISSUE = 0.5


# -------------------------------------------------------------------------------------------- score bank
@dataclass(frozen=True)
class ScoreBank:
    """P(positive) of every patch of a split in each of the 8 dihedral orientations.

    ``scores[cls]`` is (n_patches, 8) float32, rows aligned with ``paths[cls]`` (sorted, relative to the patch
    folder). ``model_sha256`` ties the bank to the weights it was computed with.
    """

    scores: dict[str, np.ndarray]
    paths: dict[str, list[str]]
    model_sha256: str
    split: str
    thumbs: dict[str, np.ndarray] | None = None  # (n, t, t, 3) uint8: each patch box-reduced THUMB_FACTOR times

    @property
    def thumb_px(self) -> int:
        return int(next(iter(self.thumbs.values())).shape[1]) if self.thumbs else 0

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        from wsi_screen._safe_write import atomic_write_text

        p = Path(path)
        meta = {"format": BANK_FORMAT, "model_sha256": self.model_sha256, "split": self.split,
                "paths": self.paths}
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(self.scores.items())}
        for k, v in sorted((self.thumbs or {}).items()):
            arrays[f"thumb.{k}"] = np.ascontiguousarray(v, dtype=np.uint8)
        save_file(arrays, str(p.with_suffix(".safetensors")))
        atomic_write_text(p.with_suffix(".json"), json.dumps(meta, indent=0, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ScoreBank:
        from safetensors.numpy import load_file

        p = Path(path)
        try:
            meta = json.loads(p.with_suffix(".json").read_text(encoding="utf-8"))
            arrays = load_file(str(p.with_suffix(".safetensors")))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{p}: cannot read the score bank: {exc}") from exc
        paths = {k: list(v) for k, v in meta["paths"].items()}
        scores = {k: arrays[k] for k in paths}
        for k, v in scores.items():
            if v.shape != (len(paths[k]), 8):
                raise DatasetError(f"{p}: bank {k!r} is {v.shape}, expected ({len(paths[k])}, 8)")
        thumbs = {k: arrays[f"thumb.{k}"] for k in paths if f"thumb.{k}" in arrays} or None
        return cls(scores=scores, paths=paths, model_sha256=str(meta["model_sha256"]), split=str(meta["split"]),
                   thumbs=thumbs)


def compute_score_bank(classifier: Any, patches_dir: str | Path, *, model_sha256: str, split: str = "valid",
                       batch_size: int = 256) -> ScoreBank:
    """Score every ``split`` patch of a PCam-style folder (labels.csv) in all 8 orientations."""
    from PIL import Image

    from wsi_screen import progress
    from wsi_screen.synthetic.slides import load_pool

    pdir = Path(patches_dir)
    pool = load_pool(pdir, split)
    pos = classifier.spec.positive_index
    scores: dict[str, np.ndarray] = {}
    thumbs: dict[str, np.ndarray] = {}
    total = sum(len(v) for v in pool.values()) * 8
    with progress.bar(total=total, desc=f"scoring {split} x 8", unit="img") as bar:
        for cls, paths in pool.items():
            out = np.zeros((len(paths), 8), np.float32)
            small: list[np.ndarray] = []
            for start in range(0, len(paths), batch_size // 8 or 1):
                chunk = paths[start:start + batch_size // 8 or 1]
                imgs: list[np.ndarray] = []
                for rel in chunk:
                    with Image.open(pdir / rel) as im:
                        arr = np.asarray(im.convert("RGB"))
                    imgs.extend(dihedral(arr, k) for k in range(8))
                    small.append(np.asarray(Image.fromarray(arr).reduce(THUMB_FACTOR)))
                probs = classifier.predict(np.stack(imgs), batch_size=batch_size)[:, pos]
                out[start:start + len(chunk)] = probs.reshape(len(chunk), 8)
                bar.update(len(imgs))
            scores[cls] = out
            thumbs[cls] = np.stack(small)
    return ScoreBank(scores=scores, paths=pool, model_sha256=model_sha256, split=split, thumbs=thumbs)


# ----------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Focus:
    """One tumour focus of a layout: its cells (row, col) and measured size."""

    cells: np.ndarray
    longest_axis_mm: float
    area_mm2: float

    @property
    def size_class(self) -> str:
        return size_class(self.longest_axis_mm)


@dataclass(frozen=True)
class SlideLayout:
    """A synthetic slide on its patch grid: ``tissue`` (rows, cols) bool, ``tumour`` (rows, cols) bool,
    ``patch`` the source patch index in its class pool and ``orient`` the dihedral element (0-7) of every
    cell (-1 off tissue). ``cell_mm`` is the grid step in mm; the grid includes a glass margin."""

    tissue: np.ndarray
    tumour: np.ndarray
    patch: np.ndarray
    orient: np.ndarray
    foci: tuple[Focus, ...]
    cell_mm: float

    @property
    def n_tissue(self) -> int:
        return int(self.tissue.sum())

    @property
    def positive(self) -> bool:
        return bool(self.tumour.any())

    @property
    def largest_focus_mm(self) -> float:
        return max((f.longest_axis_mm for f in self.foci), default=0.0)

    @property
    def size_class(self) -> str:
        return size_class(self.largest_focus_mm)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(0.5, sigma), mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def tissue_mask(rng: np.random.Generator, n_tissue: int, *, margin: int = 2) -> np.ndarray:
    """An irregular tissue section of exactly ``n_tissue`` cells (a thresholded smooth random field times
    an elliptical envelope, so it reads as a section that may have fragments and holes), glass margin around."""
    aspect = float(rng.uniform(0.6, 1.0))
    fill = 0.5
    h = max(1, math.ceil(math.sqrt(n_tissue / fill * aspect)))
    w = max(1, math.ceil(n_tissue / fill / h))
    yy, xx = np.mgrid[0:h, 0:w]
    envelope = -(((yy + 0.5) / h - 0.5) ** 2 + ((xx + 0.5) / w - 0.5) ** 2) * 8.0
    field = envelope + 0.9 * _smooth_field(rng, (h, w), sigma=max(h, w) / 14.0)
    order = np.argsort(-field.ravel(), kind="stable")[:n_tissue]
    flat = np.zeros(h * w, dtype=bool)
    flat[order] = True
    mask = flat.reshape(h, w)
    rows, cols = np.nonzero(mask)
    mask = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return np.pad(mask, margin)


def grow_focus(rng: np.random.Generator, tissue: np.ndarray, diameter_cells: float,
               taken: np.ndarray | None = None) -> np.ndarray:
    """An irregular focus of about ``diameter_cells`` longest axis inside ``tissue``: a randomly oriented
    ellipse (axis ratio 0.5-1) whose edge is perturbed by smooth noise, cut to tissue; returns (n, 2) cells."""
    from wsi_screen.screening.spatial import label_regions

    free = tissue & ~(taken if taken is not None else np.zeros_like(tissue))
    candidates = np.argwhere(free)
    if candidates.size == 0:
        return np.zeros((0, 2), np.int64)
    if diameter_cells <= 2.0:  # isolated tumour cells: one patch or two neighbours
        r, c = candidates[rng.integers(len(candidates))]
        cells = [(int(r), int(c))]
        if diameter_cells >= 2.0:
            for dr, dc in rng.permutation(np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])):
                rr, cc = r + dr, c + dc
                if 0 <= rr < tissue.shape[0] and 0 <= cc < tissue.shape[1] and free[rr, cc]:
                    cells.append((int(rr), int(cc)))
                    break
        return np.array(cells, dtype=np.int64)
    a = diameter_cells / 2.0
    b = a * float(rng.uniform(0.5, 1.0))
    theta = float(rng.uniform(0, math.pi))
    half = math.ceil(a) + 2
    r0, c0 = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    noise = _smooth_field(rng, radius.shape, sigma=max(1.0, a / 5.0))
    inside = radius <= 1.0 + 0.4 * noise
    rows, cols = np.nonzero(inside)
    rows, cols = rows + r0 - half, cols + c0 - half
    keep = (rows >= 0) & (rows < tissue.shape[0]) & (cols >= 0) & (cols < tissue.shape[1])
    rows, cols = rows[keep], cols[keep]
    keep = free[rows, cols]
    mask = np.zeros_like(tissue)
    mask[rows[keep], cols[keep]] = True
    if not mask.any():
        mask[r0, c0] = True
    labels, n = label_regions(mask)
    if n > 1:  # one focus: the largest piece
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == int(np.argmax(sizes)) + 1
    return np.argwhere(mask)


#: longest-axis ranges (in mm) drawn for each focus class
FOCUS_RANGES_MM = {"itc": (0.09, 0.19), "micro": (0.25, 1.9), "macro": (2.2, 6.0)}


def make_layout(rng: np.random.Generator, n_tissue: int, foci: Sequence[str], *, cell_mm: float,
                pools: dict[str, int]) -> SlideLayout:
    """A slide of ``n_tissue`` tissue patches with one focus per entry of ``foci`` (``itc``, ``micro``,
    ``macro``); every tissue cell gets a patch index of its class pool (sizes in ``pools``, drawn as whole
    permutations so repeats are rare) and a random orientation."""
    from wsi_screen.screening.spatial import longest_axis_cells

    tissue = tissue_mask(rng, n_tissue)
    tumour = np.zeros_like(tissue)
    made = []
    for cls in foci:
        if cls not in FOCUS_RANGES_MM:
            raise ConfigError(f"focus class {cls!r} is not one of {', '.join(FOCUS_RANGES_MM)}")
        lo, hi = FOCUS_RANGES_MM[cls]
        diameter = float(np.exp(rng.uniform(math.log(lo), math.log(hi)))) / cell_mm
        cells = grow_focus(rng, tissue, diameter, tumour)
        if cells.size == 0:
            continue
        tumour[cells[:, 0], cells[:, 1]] = True
        made.append(Focus(cells=cells, longest_axis_mm=longest_axis_cells(cells) * cell_mm,
                          area_mm2=len(cells) * cell_mm ** 2))
    patch = np.full(tissue.shape, -1, dtype=np.int64)
    orient = np.full(tissue.shape, -1, dtype=np.int64)
    for cls_mask, pool_name in ((tissue & ~tumour, "normal"), (tumour, "tumour")):
        n = int(cls_mask.sum())
        size = pools[pool_name]
        if n:
            patch[cls_mask] = np.concatenate([rng.permutation(size) for _ in range(math.ceil(n / size))])[:n]
        orient[cls_mask] = rng.integers(0, 8, size=n)
    return SlideLayout(tissue=tissue, tumour=tumour, patch=patch, orient=orient, foci=tuple(made),
                       cell_mm=cell_mm)


def layout_thumbnail(layout: SlideLayout, bank: ScoreBank, *, positive: str = "tumour",
                     negative: str = "normal") -> np.ndarray:
    """The slide's thumbnail at ``bank.thumb_px`` pixels per cell: each patch's reduced image in its
    orientation, glass (as :mod:`wsi_screen.synthetic.slides` draws it) elsewhere."""
    from wsi_screen.synthetic.slides import GLASS_NOISE, GLASS_RGB

    if not bank.thumbs:
        raise DatasetError("this score bank has no patch thumbnails; recompute it")
    t = bank.thumb_px
    rows, cols = layout.tissue.shape
    rng = np.random.default_rng(0)
    cells = (rng.integers(-GLASS_NOISE, GLASS_NOISE + 1, size=(rows, cols, t, t, 3), dtype=np.int16)
             + GLASS_RGB).astype(np.uint8)
    for mask, cls in ((layout.tissue & ~layout.tumour, negative), (layout.tumour, positive)):
        for k in range(8):
            sel = mask & (layout.orient == k)
            if sel.any():
                small = bank.thumbs[cls][layout.patch[sel]]
                small = np.rot90(small, k % 4, axes=(1, 2))
                cells[sel] = small[:, :, ::-1] if k >= 4 else small
    return np.ascontiguousarray(cells.transpose(0, 2, 1, 3, 4).reshape(rows * t, cols * t, 3))


def kept_cells(layout: SlideLayout, bank: ScoreBank, *, mpp: float, patch_px: int,
               min_tissue: float = MIN_TISSUE) -> np.ndarray:
    """Which tissue cells the tiler would keep: the tissue detector on :func:`layout_thumbnail` and the
    tiler's tissue-fraction cut (pale patches, fat and edges drop out as they do on the written slide)."""
    from wsi_screen.tiling.tissue import detect_tissue

    t = bank.thumb_px
    thumb = layout_thumbnail(layout, bank)
    mask = detect_tissue(thumb, mpp * patch_px / t).tissue
    rows, cols = layout.tissue.shape
    frac = mask.reshape(rows, t, cols, t).mean(axis=(1, 3))
    return layout.tissue & (frac >= min_tissue - 1e-6)


def simulate_probs(layout: SlideLayout, bank: ScoreBank, *, kept: np.ndarray | None = None,
                   positive: str = "tumour", negative: str = "normal") -> np.ndarray:
    """The model's P(positive) of every cell of ``layout`` looked up in ``bank``; NaN off tissue and, with
    ``kept`` (:func:`kept_cells`), where the tiler would not make a patch."""
    out = np.full(layout.tissue.shape, np.nan)
    for mask, cls in ((layout.tissue & ~layout.tumour, negative), (layout.tumour, positive)):
        out[mask] = bank.scores[cls][layout.patch[mask], layout.orient[mask]]
    if kept is not None:
        out[~kept] = np.nan
    return out


# ------------------------------------------------------------------------------------------------ cohorts
@dataclass(frozen=True)
class CohortSlide:
    name: str
    n_tissue: int
    foci: tuple[str, ...]
    seed: int

    @property
    def positive(self) -> bool:
        return bool(self.foci)


def plan_cohort(seed: int, n_slides: int, *, min_patches: int = 500, max_patches: int = 20000,
                positive_share: float = 0.5) -> list[CohortSlide]:
    """Slide sizes log-uniform in [min, max] tissue patches; positives get one focus (a second one in a
    fifth of them) whose class is ``itc``, ``micro`` or ``macro`` in turn (macro only where the tissue
    holds it, else micro); negatives of every size."""
    rng = np.random.default_rng([seed, 7])
    out = []
    classes = ("itc", "micro", "macro")
    n_pos = round(n_slides * positive_share)
    labels = rng.permutation(np.array([True] * n_pos + [False] * (n_slides - n_pos)))
    k = 0
    for i in range(n_slides):
        n = round(math.exp(rng.uniform(math.log(min_patches), math.log(max_patches))))
        foci: tuple[str, ...] = ()
        if labels[i]:
            cls = classes[k % 3]
            k += 1
            if cls == "macro" and n < 1500:
                cls = "micro"
            foci = (cls,) if rng.uniform() > 0.2 else (cls, str(rng.choice(["itc", "micro"])))
        out.append(CohortSlide(name=f"cal{seed}_{i:04d}", n_tissue=n, foci=foci,
                               seed=int(rng.integers(0, 2**31 - 1))))
    return out


def layout_for(slide: CohortSlide, *, cell_mm: float, pools: dict[str, int]) -> SlideLayout:
    return make_layout(np.random.default_rng(slide.seed), slide.n_tissue, slide.foci, cell_mm=cell_mm,
                       pools=pools)

