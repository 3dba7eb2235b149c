"""Patch grids, connected regions, smoothed maxima and metastasis size classes (wsi_screen.screening.spatial)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_screen.errors import ConfigError
from wsi_screen.screening.aggregate import AggregateConfig, diagnose, slide_score
from wsi_screen.screening.spatial import longest_axis_cells, patch_grid, regions, size_class, smoothed, smoothed_max

STRIDE, MPP = 96, 0.972  # a PCam-resolution grid: one cell is 93.312 um
CELL_MM = STRIDE * MPP / 1000


def grid_of(probs: np.ndarray, origin: tuple[int, int] = (500, 300)):
    """Coordinates (shuffled) and probabilities of every non-NaN cell of a 2-D array."""
    rows, cols = np.nonzero(~np.isnan(probs))
    order = np.random.default_rng(0).permutation(rows.size)
    rows, cols = rows[order], cols[order]
    coords = np.stack([origin[0] + cols * STRIDE, origin[1] + rows * STRIDE], axis=1)
    return coords, probs[rows, cols]


def test_patch_grid_puts_scores_back_in_place() -> None:
    p = np.full((5, 7), np.nan)
    p[1:4, 2:6] = np.linspace(0, 1, 12).reshape(3, 4)
    coords, values = grid_of(p)
    g = patch_grid(coords, values, STRIDE, MPP)
    assert g.probs.shape == (3, 4) and g.origin_l0 == (500 + 2 * STRIDE, 300 + 1 * STRIDE)
    np.testing.assert_array_equal(g.probs, p[1:4, 2:6])
    assert math.isclose(g.cell_mm, 0.093312)
    # index maps every cell back to its patch in the input order
    np.testing.assert_array_equal(values[g.index[g.tissue]], g.probs[g.tissue])


def test_regions_are_8_connected_and_measured_in_mm() -> None:
    p = np.zeros((10, 12))
    p[1:4, 1:4] = 0.9          # a 3x3 block: 9 patches
    p[6, 6] = p[7, 7] = 0.8    # two diagonal neighbours: one region
    p[8, 11] = 0.95            # a single patch
    p[0, 11] = 0.4             # below the threshold
    g = patch_grid(*grid_of(p), STRIDE, MPP)
    found = regions(g, 0.5)
    assert [r.n_patches for r in found] == [9, 2, 1]
    big = found[0]
    assert math.isclose(big.area_mm2, 9 * CELL_MM ** 2)
    assert math.isclose(big.longest_axis_mm, (math.sqrt(8) + 1) * CELL_MM)  # corner to corner + one patch
    assert math.isclose(found[1].longest_axis_mm, (math.sqrt(2) + 1) * CELL_MM)
    assert math.isclose(found[2].longest_axis_mm, CELL_MM) and found[2].max_prob == 0.95
    assert big.centre_l0 == (500 + int(2.5 * STRIDE), 300 + int(2.5 * STRIDE))
    assert regions(g, 0.99) == []


def test_longest_axis_of_a_line_and_a_hull() -> None:
    line = np.array([[0, c] for c in range(10)])
    assert longest_axis_cells(line) == 10.0
    disc = np.argwhere(np.hypot(*np.mgrid[-10:11, -10:11]) <= 10)
    assert longest_axis_cells(disc) == pytest.approx(21.0)


def test_smoothed_max_counts_tissue_neighbours_but_at_least_half_a_window() -> None:
    p = np.full((6, 6), np.nan)
    p[1:5, 1:5] = 0.1
    p[2, 2] = 1.0
    g = patch_grid(*grid_of(p), STRIDE, MPP)
    s = smoothed(g, 1)
    assert np.isnan(s).sum() == 0 and s.shape == (4, 4)  # the grid is cropped to the tissue
    assert s[1, 1] == pytest.approx((1.0 + 8 * 0.1) / 9)
    assert s[0, 0] == pytest.approx((1.0 + 3 * 0.1) / 5)  # corner: 4 tissue neighbours count as at least 5 of 9
    assert s[0, 1] == pytest.approx((1.0 + 5 * 0.1) / 6)  # edge: 6 tissue neighbours, glass ignored
    lone = np.full((5, 5), np.nan)
    lone[2, 2] = 0.99  # one patch among unscored ones stands for no neighbourhood on its own
    assert smoothed_max(patch_grid(*grid_of(lone), STRIDE, MPP)) == pytest.approx(0.99 / 5)
    assert smoothed_max(g, 1) == pytest.approx(s.max())
    # a focus of 9 high patches beats one isolated high patch among low ones
    focus = np.full((20, 20), 0.1)
    focus[5:8, 5:8] = 0.9
    lone = np.full((20, 20), 0.1)
    lone[5, 5] = 1.0
    assert smoothed_max(patch_grid(*grid_of(focus), STRIDE, MPP)) > 0.85
    assert smoothed_max(patch_grid(*grid_of(lone), STRIDE, MPP)) == pytest.approx((1.0 + 8 * 0.1) / 9)


@pytest.mark.parametrize(("mm", "cls"), [(None, "none"), (0.0, "none"), (0.093, "itc"), (0.199, "itc"),
                                         (0.2, "micro"), (2.0, "micro"), (2.01, "macro")])
def test_size_classes(mm: float | None, cls: str) -> None:
    assert size_class(mm) == cls


def test_spatial_rules_in_diagnose() -> None:
    p = np.full((30, 30), 0.05)
    p[10:16, 10:14] = 0.97  # 24 patches: 0.56 x 0.37 mm
    p[25, 3] = 0.99         # a scattered false positive
    coords, values = grid_of(p)
    g = patch_grid(coords, values, STRIDE, MPP)
    area = slide_score(values, "region", grid=g, region_threshold=0.5)
    assert math.isclose(area, 24 * CELL_MM ** 2)
    cfg = AggregateConfig(rule="region", slide_threshold=0.1, region_threshold=0.5, min_focus_patches=3)
    res = diagnose(values, cfg, positive="tumour", negative="normal", grid=g)
    assert res.diagnosis == "tumour" and res.metastasis == "micro" and res.n_foci == 1
    assert math.isclose(res.largest_focus_mm, (math.hypot(5, 3) + 1) * CELL_MM)
    assert math.isclose(res.tumour_area_mm2, area)
    assert sorted(map(tuple, coords[res.focus_indices].tolist())) == sorted(
        (500 + c * STRIDE, 300 + r * STRIDE) for r in range(10, 16) for c in range(10, 14))
    neg = diagnose(values, AggregateConfig(rule="smoothmax", slide_threshold=0.99), positive="tumour",
                   negative="normal", grid=g)
    assert neg.diagnosis == "normal" and neg.metastasis == "none" and neg.n_foci == 0
    assert neg.largest_focus_mm == 0.0 and neg.focus_indices == []
    with pytest.raises(ConfigError, match="grid positions"):
        diagnose(values, cfg, positive="tumour", negative="normal")
    with pytest.raises(ConfigError, match="area in mm²"):
        AggregateConfig(rule="region", slide_threshold=-1.0)
    assert AggregateConfig(rule="region", slide_threshold=3.5).unit == "mm²"
    with pytest.raises(ConfigError, match="slide_threshold"):
        AggregateConfig(rule="smoothmax", slide_threshold=1.5)


def _shape(geometry: dict):  # type: ignore[no-untyped-def]
    import shapely.geometry

    return shapely.geometry.shape(geometry)


def _rfc7946_oriented(geom) -> bool:  # type: ignore[no-untyped-def]
    polygons = [geom] if geom.geom_type == "Polygon" else list(geom.geoms)
    return all(p.exterior.is_ccw and not any(h.is_ccw for h in p.interiors) for p in polygons)


@pytest.mark.parametrize(("mask", "kind", "holes"), [
    ([[1, 1], [1, 1]], "Polygon", 0),
    ([[1, 0], [0, 1]], "MultiPolygon", 0),                        # corners only: two polygons touching at a point
    ([[1, 1, 1], [1, 0, 1], [1, 1, 1]], "Polygon", 1),            # a ring of patches keeps its hole
    ([[0, 1, 1], [1, 0, 1], [1, 1, 1]], "Polygon", 1),            # ... also where it closes at a corner only
    ([[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]], "Polygon", 2),
])
def test_outline_is_the_union_of_the_cells_valid_and_rfc7946_oriented(mask: list[list[int]], kind: str,
                                                                      holes: int) -> None:
    import shapely

    from wsi_screen.screening.spatial import outline_l0

    m = np.array(mask, dtype=bool)
    p = np.where(m, 0.9, 0.1)
    g = patch_grid(*grid_of(p), STRIDE, MPP)
    geo = outline_l0(np.argwhere(m), g)
    shape = _shape(geo)
    assert geo["type"] == kind and shapely.is_valid(shape) and _rfc7946_oriented(shape)
    polygons = [shape] if kind == "Polygon" else list(shape.geoms)
    assert sum(len(q.interiors) for q in polygons) == holes
    assert shape.area == m.sum() * STRIDE ** 2
    truth = shapely.union_all([shapely.box(500 + c * STRIDE, 300 + r * STRIDE, 500 + (c + 1) * STRIDE,
                                           300 + (r + 1) * STRIDE) for r, c in np.argwhere(m)])
    assert shape.symmetric_difference(truth).area == 0  # exactly the cells, in level-0 pixels
    rings = geo["coordinates"] if kind == "Polygon" else [r for q in geo["coordinates"] for r in q]
    for ring in rings:
        assert ring[0] == ring[-1] and all(type(v) is int for pt in ring for v in pt)
        assert len(ring) - 1 == len({tuple(pt) for pt in ring[:-1]})  # no repeated point


def test_outline_of_random_cells_and_overlapping_patches() -> None:
    import shapely

    from wsi_screen.screening.spatial import outline_l0

    rng = np.random.default_rng(3)
    for _ in range(30):
        m = rng.random((9, 11)) < 0.55
        g = patch_grid(*grid_of(np.where(m, 0.9, np.nan)), STRIDE, MPP)
        rows, cols = np.nonzero(~np.isnan(g.probs))
        shape = _shape(outline_l0(np.stack([rows, cols], 1), g))
        assert shapely.is_valid(shape) and _rfc7946_oriented(shape) and shape.area == m.sum() * STRIDE ** 2
    # patches of 128 px every 96 px: each cell is the 96 px square centred on its patch
    coords = np.array([[1000, 2000], [1096, 2000]])
    g = patch_grid(coords, np.array([0.9, 0.9]), STRIDE, MPP, tile_size_l0=128)
    assert g.offset_l0 == 16
    assert _shape(outline_l0(np.array([[0, 0], [0, 1]]), g)).bounds == (1016, 2016, 1016 + 192, 2016 + 96)


def test_foci_of_a_positive_call_carry_their_patches_and_outline() -> None:
    import shapely

    p = np.full((30, 30), 0.05)
    p[10:16, 10:14] = 0.97   # 24 patches
    p[2:5, 20:23] = 0.9      # 9 patches
    p[3, 21] = 0.2           # ... around a hole
    p[25, 3] = 0.99          # scattered: below min_focus_patches, not a focus
    coords, values = grid_of(p)
    g = patch_grid(coords, values, STRIDE, MPP)
    cfg = AggregateConfig(rule="region", slide_threshold=0.1, region_threshold=0.5, min_focus_patches=3)
    assert cfg.call_patch_threshold == 0.5
    # one picture threshold whatever the rule: the focus threshold, not the model's patch threshold
    assert AggregateConfig(rule="topk", patch_threshold=0.21, region_threshold=0.7).call_patch_threshold == 0.7
    res = diagnose(values, cfg, positive="tumour", negative="normal", grid=g)
    assert res.n_foci == len(res.foci) == 2 and [f.rank for f in res.foci] == [1, 2]
    big, ring = res.foci
    assert (big.n_patches, ring.n_patches) == (24, 8) and big.category == "micro" == res.metastasis
    assert list(big.indices) == res.focus_indices and big.longest_axis_mm == res.largest_focus_mm
    assert math.isclose(res.tumour_area_mm2, big.area_mm2 + ring.area_mm2)
    assert big.mean_prob == pytest.approx(0.97) and ring.max_prob == pytest.approx(0.9)
    assert sorted(map(tuple, coords[list(ring.indices)].tolist())) == sorted(
        (500 + c * STRIDE, 300 + r * STRIDE) for r in range(2, 5) for c in range(20, 23) if (r, c) != (3, 21))
    shape = _shape(ring.outline_l0)
    assert shape.geom_type == "Polygon" and len(shape.interiors) == 1 and shapely.is_valid(shape)
    assert _shape(big.outline_l0).bounds == (500 + 10 * STRIDE, 300 + 10 * STRIDE, 500 + 14 * STRIDE, 300 + 16 * STRIDE)
    strict = AggregateConfig(rule="region", slide_threshold=10.0, region_threshold=0.5)
    neg = diagnose(values, strict, positive="tumour", negative="normal", grid=g)
    assert neg.diagnosis == "normal" and neg.foci == ()
