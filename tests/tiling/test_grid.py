"""Grid arithmetic: pure functions, checked with hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_screen.errors import ConfigError, ResolutionError
from wsi_screen.tiling.grid import BAND_COLUMNS, TileSpec, coverage, grid_positions, make_grid, stride_l0, tile_size_l0

dims = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@given(dims=dims, tile=st.integers(1, 700), stride=st.integers(16, 700))
@settings(max_examples=200, deadline=None)
def test_full_mask_grid_covers_every_whole_position(dims: tuple[int, int], tile: int, stride: int) -> None:
    w, h = dims
    mask = np.ones((max(1, h // 7), max(1, w // 7)), dtype=bool)
    grid = make_grid(mask, dims, tile, stride, min_tissue=1.0)
    expected_cols = (w - tile) // stride + 1 if w >= tile else 0
    expected_rows = (h - tile) // stride + 1 if h >= tile else 0
    assert grid.shape == (expected_rows, expected_cols)
    assert len(grid) == expected_cols * expected_rows
    if len(grid):
        xs, ys = grid.coords[:, 0], grid.coords[:, 1]
        assert grid.coords.dtype == np.int64
        assert np.all(xs % stride == 0) and np.all(ys % stride == 0)
        assert xs.min() == 0 and ys.min() == 0
        assert np.all(xs + tile <= w) and np.all(ys + tile <= h)
        assert np.allclose(grid.tissue, 1.0, atol=1e-5)
        # band order: sorted by (band of BAND_COLUMNS columns, y, x), no duplicates; one band is row-major
        band = (xs // stride) // BAND_COLUMNS
        order = np.lexsort((xs, ys, band))
        assert np.array_equal(order, np.arange(len(grid)))
        if expected_cols <= BAND_COLUMNS:
            assert np.array_equal(np.lexsort((xs, ys)), np.arange(len(grid)))
        assert len(np.unique(grid.coords, axis=0)) == len(grid)


@given(dims=dims, tile=st.integers(1, 400), stride=st.integers(16, 400), seed=st.integers(0, 2**16),
       min_tissue=st.floats(0.0, 1.0))
@settings(max_examples=150, deadline=None)
def test_filtered_grid_is_a_subset_with_fractions_in_range(dims: tuple[int, int], tile: int, stride: int,
                                                          seed: int, min_tissue: float) -> None:
    rng = np.random.default_rng(seed)
    w, h = dims
    mask = rng.random((max(1, h // 5), max(1, w // 5))) > 0.5
    full = make_grid(mask, dims, tile, stride, min_tissue=0.0)
    kept = make_grid(mask, dims, tile, stride, min_tissue=min_tissue)
    assert np.all((full.tissue >= 0) & (full.tissue <= 1))
    assert np.all(kept.tissue >= min_tissue - 1e-6)
    full_set = {tuple(c) for c in full.coords.tolist()}
    assert {tuple(c) for c in kept.coords.tolist()} <= full_set
    assert len(kept) == int(np.sum(full.tissue >= np.float32(min_tissue) - np.float32(1e-6)))


def test_coverage_is_exact_area_fraction() -> None:
    # mask 4x4 over a 400x400 slide: each mask pixel is 100x100 level-0 pixels; left half tissue
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, :2] = True
    coords = np.array([[0, 0], [150, 0], [200, 0], [50, 50], [175, 0]], dtype=np.int64)
    frac = coverage(mask, (400, 400), coords, 100)
    assert frac.tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0, 0.25])


def test_grid_positions_when_slide_smaller_than_tile() -> None:
    xs, ys = grid_positions((100, 50), 224, 224)
    assert xs.size == 0 and ys.size == 0
    assert len(make_grid(np.ones((5, 10), bool), (100, 50), 224, 224, 0.5)) == 0


@given(size=st.integers(8, 1024), mpp=st.floats(0.1, 50), slide_mpp=st.floats(0.1, 50))
def test_tile_size_l0_rule(size: int, mpp: float, slide_mpp: float) -> None:
    if mpp < slide_mpp * 0.95:
        with pytest.raises(ResolutionError, match="finer than the slide's level 0"):
            tile_size_l0(mpp, size, slide_mpp)
    else:
        t = tile_size_l0(mpp, size, slide_mpp)
        assert t == max(1, round(size * mpp / slide_mpp))
        assert t >= round(size * 0.95) - 1


def test_known_tile_sizes() -> None:
    assert tile_size_l0(0.5, 224, 0.499) == 224
    assert tile_size_l0(0.972, 96, 0.499) == 187
    assert tile_size_l0(0.5, 224, 0.25) == 448
    assert stride_l0(448, 224, 0) == 448
    assert stride_l0(448, 224, 112) == 224
    with pytest.raises(ResolutionError):
        tile_size_l0(0.5, 224, 28.97)


@pytest.mark.parametrize("kwargs", [{"mpp": 0}, {"size_px": 4}, {"overlap_px": 224}, {"min_tissue": 1.5},
                                    {"overlap_px": -1}])
def test_tile_spec_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TileSpec(**kwargs)  # type: ignore[arg-type]


def test_coverage_memory_does_not_grow_with_the_mask() -> None:
    """Tissue fractions are measured band by band of mask rows: no whole-mask summed-area table (4 bytes per
    mask pixel: 67 MB for this 4096^2 mask; with its temporaries the old code peaked over 100 MB here). What
    remains is a few float64 values per footprint (342k of them here) and one band's table."""
    import tracemalloc

    mask = np.zeros((4096, 4096), dtype=bool)
    mask[500:3500, 700:3900] = True
    dims = (131072, 131072)  # 32 level-0 px per mask pixel
    xs, ys = grid_positions(dims, 224, 224)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        frac = coverage(mask, dims, coords, 224)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    inside = (coords[:, 0] >= 700 * 32) & (coords[:, 0] + 224 <= 3900 * 32) \
        & (coords[:, 1] >= 500 * 32) & (coords[:, 1] + 224 <= 3500 * 32)
    assert np.all(frac[inside] == 1.0) and frac.sum() == pytest.approx(3000 * 3200 * 1024 / 224**2, rel=1e-3)
    assert peak < 40e6, peak
