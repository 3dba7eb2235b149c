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


def test_the_notebook_shows_the_runs_call_at_its_threshold(demo_run: Path) -> None:
    from wsi_screen.screening.callview import views_key
    from wsi_screen.screening.heatmap import drawn_with

    view = runview.open_run(demo_run)
    row = view.results[0]
    ctx = runview.slide_call(view, "CMU-1-Small-Region")
    assert ctx.result is not None and ctx.result.diagnosis == row["diagnosis"] == "normal"
    assert ctx.result.n_foci == int(row["n_foci"]) == 0 and ctx.threshold == 0.8
    assert ctx.domain == {"in_domain_fraction": float(row["in_domain_fraction"]), "out_of_domain": True}
    # the notebook's figure is the run's heatmap.png: drawn from the same call
    assert views_key(ctx) == drawn_with(demo_run / "CMU-1-Small-Region" / "heatmap.png")
    assert runview.rule_summary(view) == ("slide call: region score >= 0.0479 mm² (largest region at p >= 0.8); "
                                          "pictures and foci at p >= 0.8 (the call's patch threshold)")


def test_the_distribution_draws_every_slides_highest_patch(synthetic_run: Path) -> None:
    """The normal slides' few patches at the call's patch threshold lie beyond their box's whiskers: the plot
    draws them (as outliers), so no slide reads as if no patch reached the threshold."""
    view = runview.open_run(synthetic_run)
    ax = runview.distribution_figure(view).axes[1]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(names) == sorted(view.slides)
    beyond = 0
    for row, name in enumerate(names, start=1):
        p = view.positive_probs(name)
        drawn = np.concatenate([np.asarray(line.get_xdata(), float) for line in ax.lines
                                if np.allclose(np.asarray(line.get_ydata(), float), row, atol=0.5)])
        assert np.isclose(drawn.max(), p.max(), atol=1e-6), (name, drawn.max(), p.max())
        q1, q3 = np.percentile(p, [25, 75])
        beyond += int(p.max() > q3 + 1.5 * (q3 - q1))
    assert beyond >= 1  # at least one slide's highest patch is an outlier (three normal ones, on this cohort)


def test_no_slide_score_bar_straddles_the_slide_threshold(synthetic_run: Path) -> None:
    """The region scores of the normal slides (0.009-0.017 mm²) and the threshold (0.0479 mm²) shared the first
    0.05 mm² bin: a bar of normal slides drawn across the line, as if on both sides of the call."""
    view = runview.open_run(synthetic_run)
    threshold = float(view.results[0]["threshold"])
    bars = [b for b in runview.distribution_figure(view).axes[0].patches if b.get_height() > 0]
    assert sum(b.get_height() for b in bars) == len(view.results)
    assert not [b for b in bars if b.get_x() + 1e-9 < threshold < b.get_x() + b.get_width() - 1e-9]
    scores = [float(r["score"]) for r in view.results]
    assert min(scores) < threshold < max(scores)  # both sides are drawn
