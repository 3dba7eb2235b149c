"""The pictures of a slide's call (wsi_screen.screening.callview): title, threshold named in every legend, foci
outlined with their sizes, one key for what was drawn."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from wsi_screen.screening.aggregate import AggregateConfig, diagnose
from wsi_screen.screening.callview import CallContext, heatmap_figure, title, views_key
from wsi_screen.screening.heatmap import drawn_with
from wsi_screen.screening.spatial import patch_grid

RULE = AggregateConfig(rule="region", patch_threshold=0.213, slide_threshold=0.0479, region_threshold=0.8,
                       min_focus_patches=6)
STRIDE = 96


def _slide(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    rows, cols = np.nonzero(~np.isnan(p))
    coords = np.stack([cols * STRIDE, rows * STRIDE], 1).astype(np.int64)
    h, w = p.shape
    thumb = np.full((h * 4, w * 4, 3), 240, np.uint8)
    store = SimpleNamespace(thumbnail=thumb, tile_size_l0=STRIDE,
                            attrs={"stride_l0": STRIDE, "slide": {"dimensions": [w * STRIDE, h * STRIDE],
                                                                  "mpp": 0.972}})
    return coords, p[rows, cols], store


def _ctx(p: np.ndarray, rule: AggregateConfig = RULE, domain: dict[str, Any] | None = None
         ) -> tuple[CallContext, np.ndarray, np.ndarray, Any]:
    coords, probs, store = _slide(p)
    res = diagnose(probs, rule, positive="tumour", negative="normal", grid=patch_grid(coords, probs, STRIDE, 0.972))
    ctx = CallContext(name="s1", classes=("normal", "tumour"), positive_index=1, model_threshold=0.213,
                      aggregate=rule, result=res, domain=domain if domain is not None else
                      {"in_domain_fraction": 0.97, "out_of_domain": False})
    return ctx, coords, probs, store


def _texts(fig: Any) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(match=Text) if t.get_text()]


def _positive() -> np.ndarray:
    p = np.full((40, 50), 0.3)
    p[5:30, 5:30] = 0.95    # 625 patches: 2.3 mm across
    p[33:37, 40:44] = 0.9   # 16 patches
    p[38, 2] = 0.99         # one scattered patch: not a focus
    return p


def test_title_says_call_score_rule_metastasis_focus_and_domain() -> None:
    ctx, *_ = _ctx(_positive())
    line1, line2 = title(ctx).split("\n")
    res = ctx.result
    assert res is not None and res.n_foci == 2 and res.metastasis == "macro"
    assert line1 == f"s1: TUMOUR | metastasis macro, largest focus {res.largest_focus_mm:.2f} mm (2 foci outlined)"
    assert line2 == (f"score {res.score:.3g} mm² >= 0.0479 mm² (rule: largest region at P(tumour) >= 0.8) | "
                     "in domain (97 % of patches in domain)")
    normal, *_ = _ctx(np.full((20, 20), 0.3), domain={"in_domain_fraction": 0.31, "out_of_domain": True})
    assert title(normal) == ("s1: normal | no focus counted\nscore 0 mm² < 0.0479 mm² (rule: largest region at "
                             "P(tumour) >= 0.8) | OUT OF DOMAIN (31 % of patches in domain): call unreliable")
    topk, *_ = _ctx(np.full((20, 20), 0.3), AggregateConfig(rule="topk", k=5, patch_threshold=0.213,
                                                            slide_threshold=0.5), domain={})
    assert title(topk).endswith("score 0.300 < 0.5 (rule: topk (k = 5)) | domain not checked")
    assert topk.threshold == 0.213 and topk.threshold_name == "the model's patch threshold"


def test_heatmap_names_the_call_threshold_and_outlines_every_focus_with_its_size(tmp_path: Path) -> None:
    ctx, coords, probs, store = _ctx(_positive())
    assert ctx.threshold == 0.8 and ctx.threshold_name == "the call's patch threshold"
    fig = heatmap_figure(store, coords, probs, ctx)
    texts = _texts(fig)
    res = ctx.result
    assert res is not None
    assert title(ctx) in texts
    assert "inside cyan: P(tumour) >= 0.8 (the call's patch threshold)" in texts            # the legend
    assert "P(tumour); cyan line: the call's patch threshold 0.8" in texts                   # the colour bar
    assert "2 counted foci (largest bold), at P(tumour) >= 0.8" in texts
    assert f"1: {res.foci[0].longest_axis_mm:.2f} mm (macro)" in texts
    assert f"2: {res.foci[1].longest_axis_mm:.2f} mm" in texts
    assert not any("0.213" in t for t in texts)  # the model's threshold is not this picture's

    from wsi_screen.screening.callview import draw_heatmap

    out = draw_heatmap(tmp_path / "h.png", store, coords, probs, ctx)
    assert drawn_with(out) == views_key(ctx)


def test_a_normal_slide_reads_blue_and_outlines_nothing() -> None:
    from matplotlib.image import AxesImage

    rng = np.random.default_rng(0)
    p = rng.beta(2, 5, (30, 30))  # scores of a normal slide: mostly low, 1-2 % above 0.8, scattered
    ctx, coords, probs, store = _ctx(p)
    assert ctx.result is not None and ctx.result.diagnosis == "normal" and ctx.foci == ()
    fig = heatmap_figure(store, coords, probs, ctx)
    assert not any("focus" in t and "mm" in t for t in _texts(fig) if t != title(ctx))
    overlay = [im for im in fig.axes[1].get_images() if isinstance(im, AxesImage)][1]
    where = np.asarray(overlay.norm(probs))
    # the colour map's halves meet at the call's threshold: below it the blue half, at or above it the red one
    assert np.array_equal(where < 0.5, probs < 0.8)
    rgba = overlay.cmap(where)
    assert rgba[:, 2].mean() > rgba[:, 0].mean() + 0.2  # the slide as a whole reads blue
    linear = overlay.cmap(probs)  # on a plain 0-1 scale these scores would have looked far warmer
    assert rgba[:, 0].mean() < linear[:, 0].mean() - 0.1


def test_the_key_changes_with_what_is_drawn() -> None:
    ctx, *_ = _ctx(_positive())
    again, *_ = _ctx(_positive())
    assert views_key(ctx) == views_key(again)
    stricter = AggregateConfig(rule="region", patch_threshold=0.213, slide_threshold=0.0479, region_threshold=0.9,
                               min_focus_patches=6)
    other, *_ = _ctx(_positive(), stricter)
    assert views_key(other) != views_key(ctx)
    flagged, *_ = _ctx(_positive(), domain={"in_domain_fraction": 0.2, "out_of_domain": True})
    assert views_key(flagged) != views_key(ctx)


@pytest.mark.parametrize("rule", ["region", "smoothmax"])
def test_the_threshold_shown_is_the_calls_own(rule: str) -> None:
    cfg = AggregateConfig(rule=rule, patch_threshold=0.213, slide_threshold=0.5, region_threshold=0.8)
    ctx, *_ = _ctx(np.full((5, 5), 0.3), cfg)
    assert ctx.threshold == (0.8 if rule == "region" else 0.213)
