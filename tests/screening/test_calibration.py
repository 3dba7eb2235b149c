"""Choosing the slide rule and threshold, and the figures reported for it (wsi_screen.screening.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_screen import metrics
from wsi_screen.errors import ConfigError
from wsi_screen.screening import calibration
from wsi_screen.screening.aggregate import AggregateConfig
from wsi_screen.screening.spatial import patch_grid


def test_choose_prefers_sensitivity_then_auc_then_the_simpler_rule() -> None:
    y = [True, True, True, False, False, False]
    scores = {"mean": [0.3, 0.2, 0.25, 0.22, 0.1, 0.05], "smoothmax1": [0.9, 0.95, 0.8, 0.5, 0.4, 0.3],
              "region0.9": [0.9, 0.95, 0.8, 0.5, 0.4, 0.3]}
    choice = calibration.choose(scores, y, min_specificity=1.0)
    assert choice.candidate.name == "smoothmax1"  # ties with region0.9; listed earlier
    assert choice.threshold == pytest.approx(0.65) and choice.sensitivity == 1.0 and choice.auc == 1.0
    with pytest.raises(ConfigError, match="positive and negative"):
        calibration.choose({"mean": [0.1, 0.2]}, [True, True])
    with pytest.raises(ConfigError, match="2 scores for 3"):
        calibration.choose({"mean": [0.1, 0.2]}, [True, False, True])


def test_choose_breaks_a_tie_by_the_preferred_rule_else_the_widest_margin() -> None:
    """All three separate the slides (sensitivity and AUC 1): list order chose mean, the narrowest margin."""
    y = [True, True, False, False]
    scores = {"mean": [0.30, 0.31, 0.29, 0.0], "max": [0.9, 1.0, 0.1, 0.0], "topk1": [0.6, 0.7, 0.4, 0.0]}
    choice = calibration.choose(scores, y, min_specificity=1.0)
    assert (choice.candidate.name, choice.tied) == ("max", ("mean", "max", "topk1"))
    assert {r["rule"]: round(r["margin"], 3) for r in choice.table} == {"mean": round(0.01 / 0.31, 3), "max": 0.8,
                                                                       "topk1": round(0.2 / 0.7, 3)}
    assert calibration.choose(scores, y, min_specificity=1.0, prefer="topk1").candidate.name == "topk1"
    scores["max"] = [0.9, 0.1, 0.2, 0.0]  # no longer among the best: not preferred
    choice = calibration.choose(scores, y, min_specificity=1.0, prefer="max")
    assert (choice.candidate.name, choice.tied) == ("topk1", ("mean", "topk1"))
    assert calibration.candidate_name(AggregateConfig(rule="region", region_threshold=0.8)) == "region0.8"
    assert calibration.candidate_name(AggregateConfig(rule="topk", k=10)) == "topk10"


def test_choose_keeps_the_specificity_on_an_area_score() -> None:
    """A region rule scores in mm² (above 1): its threshold must clear the top negative there, not stop at 1."""
    y = [True, True, True, False, False, False]
    scores = {"mean": [0.3, 0.2, 0.25, 0.22, 0.1, 0.05], "region0.9": [3.0, 2.5, 4.0, 1.5, 0.2, 0.0]}
    choice = calibration.choose(scores, y, min_specificity=0.99)
    assert choice.candidate.name == "region0.9"
    assert choice.threshold == pytest.approx(2.0) and (choice.sensitivity, choice.specificity) == (1.0, 1.0)
    assert metrics.rates_at(np.array(y), np.array(scores["region0.9"]), choice.threshold) == (1.0, 1.0)


def test_calibrate_on_spatial_truth_picks_a_spatial_rule() -> None:
    """Foci of 12+ contiguous patches against scattered false positives: a pooled rule cannot separate
    them at 100 % specificity on large slides, a spatial one can."""
    rng = np.random.default_rng(0)
    slides = []
    for i in range(40):
        side = [25, 60][i % 2]
        p = rng.beta(1, 12, size=(side, side))
        fp = rng.random((side, side)) < 0.02
        p[fp] = rng.uniform(0.8, 1.0, fp.sum())  # scattered confident false positives
        positive = i % 4 < 2
        if positive:
            r, c = rng.integers(2, side - 6, 2)
            p[r:r + 4, c:c + 3] = rng.uniform(0.7, 1.0, (4, 3))
        rows, cols = np.mgrid[0:side, 0:side]
        grid = patch_grid(np.stack([cols.ravel() * 96, rows.ravel() * 96], 1), p.ravel(), 96, 0.972)
        slides.append(calibration.labelled_slide(f"s{i}", grid, positive, 0.5))
    config, doc = calibration.calibrate(slides, patch_threshold=0.5, min_specificity=1.0)
    assert config.rule in ("smoothmax", "region")
    assert doc["candidates"][doc["name"]]["sensitivity"] == 1.0
    assert doc["candidates"]["topk10"]["sensitivity"] < 1.0
    assert config.min_focus_patches >= 2  # pairs of neighbouring false positives occur on 3,600-patch slides
    assert set(doc["per_rule"]) == {"mean", "max", "topk", "fraction", "smoothmax", "region"}
    # the bins it held the slides to, as they were: 625-patch slides are not in a "500-2000" bin of a cohort
    assert doc["method"].startswith("highest sensitivity at specificity >= 1.0 in every slide-size bin of the "
                                    "calibration slides (under 2000 patches: 20 slide(s), 2000-5000 patches: 20 "
                                    "slide(s)); foci: "), doc["method"]


def test_report_counts_by_class_and_size() -> None:
    scores = [0.9, 0.2, 0.8, 0.1, 0.7, 0.6]
    labels = [True, True, True, False, False, False]
    classes = ["macro", "itc", "micro", "none", "none", "none"]
    sizes = [600, 600, 12000, 600, 3000, 15000]
    r = calibration.report(scores, labels, classes, sizes, 0.65)
    assert r["sensitivity_by_class"]["itc"]["detected"] == 0 and r["sensitivity_by_class"]["macro"]["rate"] == 1.0
    assert r["specificity_by_size"]["500-2000"] == {"n": 1, "correct": 1, "rate": 1.0,
                                                    "ci": list(metrics.wilson(1, 1))}
    assert r["specificity_by_size"]["10000-20000"]["correct"] == 1
    assert r["specificity_by_size"]["2000-5000"]["correct"] == 0
    assert r["specificity"]["correct"] == 2 and r["sensitivity"]["detected"] == 2
