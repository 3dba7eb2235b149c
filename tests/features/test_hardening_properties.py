"""Property tests (hypothesis) for what the module tests leave open: the level-0 -> heatmap cell -> GeoJSON ->
level-0 round trip through real grids, the thumbnail/grid arithmetic that ties them, and slide-call invariants.

(tests/tiling/test_grid.py, tests/screening/test_heatmap.py, test_geojson.py and test_aggregate.py check each
piece alone.)
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from wsi_screen.screening.aggregate import (
    N_TOP,
    NO_TISSUE,
    RULES,
    SPATIAL_RULES,
    AggregateConfig,
    diagnose,
    slide_score,
)
from wsi_screen.screening.geojson import geojson_to_coords, patches_to_geojson
from wsi_screen.screening.heatmap import heatmap_array
from wsi_screen.tiling.grid import make_grid, stride_l0, tile_size_l0
from wsi_screen.tiling.pipeline import THUMBNAIL_MAX_PIXELS, THUMBNAIL_MAX_SIDE, THUMBNAIL_MIN_SIDE, thumbnail_mpp

CLASSES = ["normal", "tumour"]


@st.composite
def slide_grids(draw: st.DrawFn) -> tuple[np.ndarray, int, tuple[int, int], tuple[int, int]]:
    """A tiled slide as the pipeline makes it: dims, tile at some mpp, random tissue, a thumbnail no coarser
    than a tile. Returns (coords, tile_l0, (W, H), thumbnail (h, w))."""
    slide_mpp = draw(st.sampled_from([0.25, 0.2527, 0.499, 0.5, 1.0]))
    w0 = draw(st.integers(300, 60_000))
    h0 = draw(st.integers(300, 60_000))
    size = draw(st.sampled_from([64, 96, 224, 256]))
    mpp = draw(st.floats(max(0.25, slide_mpp), 4.0))
    tile = tile_size_l0(mpp, size, slide_mpp)
    assume(tile <= min(w0, h0))
    stride = stride_l0(tile, size, 0)
    # the thumbnail: at least one pixel per tile on each axis (the pipeline's is ~8 um/px against 20-200 um tiles)
    px = draw(st.floats(1.0, 0.9 * tile))
    tw, th = max(1, math.ceil(w0 / px)), max(1, math.ceil(h0 / px))
    assume(tw * th <= 4_000_000)
    seed = draw(st.integers(0, 2**16))
    mask = np.random.default_rng(seed).random((min(th, 64), min(tw, 64))) > 0.5
    grid = make_grid(mask, (w0, h0), tile, stride, min_tissue=draw(st.floats(0.0, 1.0)))
    assume(0 < len(grid) <= 3000)
    return grid.coords, tile, (w0, h0), (th, tw)


@settings(max_examples=60, deadline=None)
@given(slide_grids())
def test_level0_heatmap_geojson_round_trip(case: tuple[np.ndarray, int, tuple[int, int], tuple[int, int]]) -> None:
    coords, tile, (W, H), (h, w) = case
    n = len(coords)
    values = (np.arange(n) + 1) / 4096.0  # exact in float32: a cell's value names its patch
    heat = heatmap_array(coords, values, tile, tile, (W, H), (h, w))
    fc = json.loads(json.dumps(patches_to_geojson(coords, tile, np.stack([1 - values, values], 1), CLASSES,
                                                  slide_name="s")))
    back, sizes = geojson_to_coords(fc)
    assert np.array_equal(back, coords) and np.all(sizes == tile)  # level 0 -> GeoJSON -> level 0, exactly

    finite = np.isfinite(heat)
    owner = np.full(heat.shape, -1)
    owner[finite] = np.rint(heat[finite] * 4096).astype(int) - 1
    # every patch is visible on the heatmap (no cell lost, none merged: patches do not overlap)
    assert set(np.unique(owner[finite]).tolist()) == set(range(n))
    # cell -> level 0: each painted cell's centre lies inside the GeoJSON square of the patch it shows
    i, j = np.nonzero(finite)
    cx, cy = (j + 0.5) * W / w, (i + 0.5) * H / h
    k = owner[i, j]
    x0, y0 = back[k, 0], back[k, 1]
    assert np.all((x0 <= cx) & (cx < x0 + sizes[k]) & (y0 <= cy) & (cy < y0 + sizes[k]))
    # level 0 -> cell: the cell under each patch's centre shows that patch
    pj = np.minimum(((coords[:, 0] + tile / 2) * w / W).astype(int), w - 1)
    pi = np.minimum(((coords[:, 1] + tile / 2) * h / H).astype(int), h - 1)
    assert np.array_equal(owner[pi, pj], np.arange(n))


@settings(max_examples=200, deadline=None)
@given(st.floats(0.1, 30.0), st.integers(1, 500_000), st.integers(1, 500_000))
def test_thumbnail_resolution_bounds(slide_mpp: float, w0: int, h0: int) -> None:
    """The thumbnail (tissue mask, heatmap background) is never finer than level 0, never over the size and
    area caps (bounded memory), and at least THUMBNAIL_MIN_SIDE px long where the slide has that many pixels
    at level 0; ordinary slides get 8 um/px."""
    t = thumbnail_mpp(slide_mpp, (w0, h0))
    longest = max(w0, h0) * slide_mpp / t  # thumbnail pixels along the longest side
    assert t >= slide_mpp
    assert longest <= THUMBNAIL_MAX_SIDE * (1 + 1e-9)
    assert (w0 * slide_mpp / t) * (h0 * slide_mpp / t) <= THUMBNAIL_MAX_PIXELS * (1 + 1e-9)
    longest_um = max(w0, h0) * slide_mpp
    if slide_mpp <= 8.0 and 1024 * 8.0 <= longest_um <= 8192 * 8.0 and w0 * h0 * slide_mpp ** 2 <= 600e6:
        assert t == 8.0  # a slide of 8 to 65 mm along its longest side and up to 600 mm^2
    assert longest >= min(THUMBNAIL_MIN_SIDE, max(w0, h0)) * (1 - 1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 1024), st.integers(0, 1023), st.floats(0.2, 8.0), st.floats(0.2, 8.0))
def test_overlap_in_level0_matches_patch_pixels(size: int, overlap: int, mpp: float, slide_mpp: float) -> None:
    """Neighbouring patches overlap by the requested share of a patch, to within one level-0 pixel."""
    assume(overlap < size and mpp >= slide_mpp)
    tile = tile_size_l0(mpp, size, slide_mpp)
    stride = stride_l0(tile, size, overlap)
    assert 1 <= stride <= tile
    assert stride_l0(tile, size, 0) == tile
    assert abs((tile - stride) - overlap * tile / size) <= 0.5 + 1e-9 or stride == 1


probs_st = arrays(np.float64, st.integers(0, 80), elements=st.floats(0.0, 1.0, allow_nan=False))


@settings(max_examples=150, deadline=None)
@given(probs_st, st.sampled_from([r for r in RULES if r not in SPATIAL_RULES]),
       st.one_of(st.integers(1, 50), st.floats(0.01, 0.99)),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_slide_call_invariants(p: np.ndarray, rule: str, k: int | float, patch_thr: float, slide_thr: float) -> None:
    cfg = AggregateConfig(rule=rule, k=k, patch_threshold=patch_thr, slide_threshold=slide_thr)
    res = diagnose(p, cfg, positive="tumour", negative="normal")
    if p.size == 0:
        assert res.score is None and res.diagnosis == NO_TISSUE and res.n_patches == 0
        return
    assert res.score is not None
    assert res.diagnosis == ("tumour" if res.score >= slide_thr else "normal")
    assert res.n_patches == p.size and res.n_positive_patches == int(np.sum(p >= patch_thr))
    top = res.top_indices
    assert len(top) == min(N_TOP, p.size) and len(set(top)) == len(top)
    assert all(p[a] > p[b] or (p[a] == p[b] and a < b) for a, b in itertools.pairwise(top))
    assert not top or p[top[0]] == p.max()
    # the call is the one a lab reproduces from scores.csv: rounding to 6 decimals moves the score < 1e-6
    if rule != "fraction":  # a threshold count can flip; means and maxima cannot move more than the rounding
        rounded = slide_score(np.round(p, 6), rule, k=k, patch_threshold=patch_thr)
        assert abs(rounded - res.score) <= 1e-6


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(1, 40), elements=st.floats(0.0, 1.0, allow_nan=False)), st.integers(2, 4))
def test_repeating_every_patch_changes_no_score_but_topk_counts(p: np.ndarray, times: int) -> None:
    """mean, max and fraction are properties of the score distribution: copying every patch changes nothing."""
    q = np.tile(p, times)
    for rule in ("mean", "max", "fraction"):
        assert math.isclose(slide_score(q, rule), slide_score(p, rule), abs_tol=1e-12)
    # topk with a share is scale-free as well, where the share is a whole number of copies
    if math.ceil(0.5 * q.size) == times * math.ceil(0.5 * p.size):
        assert math.isclose(slide_score(q, "topk", k=0.5), slide_score(p, "topk", k=0.5), abs_tol=1e-9)
