"""wsi_screen.screening.runview: what the notebook shows, read from a real run folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_screen.screening import runview


def test_top_patches_are_the_highest_scores_with_their_pixels(demo_run: Path) -> None:
    view = runview.open_run(demo_run)
    assert view.slides == ["CMU-1-Small-Region"] and view.positive_class == "tumour"
    p = view.positive_probs("CMU-1-Small-Region")
    top = runview.top_patches(view, "CMU-1-Small-Region", 5)
    assert [t.probability for t in top] == sorted(np.sort(p)[::-1][:5].astype(float).tolist(), reverse=True)
    coords = view.scores("CMU-1-Small-Region").coords
    assert all((t.x, t.y) == tuple(coords[t.index]) for t in top)
    assert all(t.image is not None and t.image.shape == (96, 96, 3) for t in top)


def test_heatmap_matches_the_thumbnail_and_figures_render(demo_run: Path) -> None:
    view = runview.open_run(demo_run)
    thumb, heat, info = runview.heatmap(view, "CMU-1-Small-Region")
    assert heat.shape == thumb.shape[:2] and info["slide"] == "CMU-1-Small-Region"
    p = view.positive_probs("CMU-1-Small-Region")
    assert np.nanmax(heat) == np.float32(p.max())  # every scored value lands in the map
    for fig in (runview.slide_figure(view, "CMU-1-Small-Region"), runview.distribution_figure(view)):
        assert runview.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
