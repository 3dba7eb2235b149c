"""Aggregation rules, slide calls and rule/threshold choice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from wsi_screen.errors import ConfigError
from wsi_screen.screening.aggregate import (
    NO_TISSUE,
    RULES,
    SPATIAL_RULES,
    AggregateConfig,
    diagnose,
    rule_label,
    slide_score,
    top_indices,
    top_k_count,
)

probs_st = arrays(np.float64, st.integers(1, 60), elements=st.floats(0.0, 1.0, allow_nan=False))
k_st = st.one_of(st.integers(1, 80), st.floats(0.01, 0.99))
fast = settings(max_examples=60, deadline=None)
#: rules that pool probabilities regardless of where patches are (the spatial ones: tests/screening/test_spatial.py)
POOLED = [r for r in RULES if r not in SPATIAL_RULES]


def test_rules_on_a_small_example() -> None:
    p = np.array([0.1, 0.9, 0.4, 0.8, 0.2])
    assert slide_score(p, "mean") == pytest.approx(0.48)
    assert slide_score(p, "max") == 0.9
    assert slide_score(p, "topk", k=2) == pytest.approx(0.85)
    assert slide_score(p, "topk", k=1) == 0.9
    assert slide_score(p, "topk", k=99) == pytest.approx(0.48)  # k > N: all patches
    assert slide_score(p, "topk", k=0.4) == pytest.approx(0.85)  # 40 % of 5 = 2 patches
    assert slide_score(p, "topk", k=0.01) == 0.9  # at least one patch
    assert slide_score(p, "fraction") == pytest.approx(0.4)
    assert slide_score(p, "fraction", patch_threshold=0.8) == pytest.approx(0.4)  # >= counts
    assert slide_score(p, "fraction", patch_threshold=0.85) == pytest.approx(0.2)
    assert slide_score([0.3], "mean") == pytest.approx(0.3)


def test_top_k_count() -> None:
    assert top_k_count(10, 3) == 3
    assert top_k_count(10, 0.1) == 1
    assert top_k_count(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert top_k_count(10, 0.15) == 2  # rounded up
    assert top_k_count(2, 5) == 2
    assert top_k_count(10, 4.0) == 4


def test_a_typed_k_is_checked_and_a_whole_count_kept_whole() -> None:
    from wsi_screen.screening.aggregate import as_k

    assert as_k(3.0) == 3 and isinstance(as_k(3.0), int) and as_k(0.25) == 0.25
    for bad in (math.inf, 2.5, 0.0, -1.0):
        with pytest.raises(ConfigError, match="top-k `k` must be"):
            as_k(bad)


@pytest.mark.parametrize("bad", [[0.2, float("nan")], [0.2, 1.5], [-0.1], [[0.1, 0.2]]])
def test_invalid_probabilities(bad: list[float]) -> None:
    with pytest.raises(ConfigError) as err:
        slide_score(np.array(bad), "mean")
    assert "\n" not in str(err.value)


def test_a_rule_is_named_with_the_k_that_changes_its_meaning() -> None:
    # printed after a run and in the report: "topk" alone hid that a calibrated k = 1 makes it the max
    assert AggregateConfig(rule="topk", k=1).label == "topk (k = 1)"
    assert rule_label("topk", 0.05) == "topk (k = 0.05)"
    assert AggregateConfig(rule="region", k=5).label == "region"
    # the fraction rule's score counts patches at the model's threshold, not the pictures' focus threshold
    assert AggregateConfig(rule="fraction", patch_threshold=0.213).label == "fraction (of patches at p >= 0.213)"
    assert rule_label("fraction") == "fraction"


def test_invalid_settings() -> None:
    with pytest.raises(ConfigError, match="unknown aggregation rule 'median'"):
        slide_score([0.5], "median")
    with pytest.raises(ConfigError, match="top-k"):
        slide_score([0.5], "topk", k=0)
    with pytest.raises(ConfigError, match="top-k"):
        slide_score([0.5], "topk", k=2.5)
    with pytest.raises(ConfigError, match="top-k"):
        AggregateConfig(k=True)
    with pytest.raises(ConfigError, match="patch_threshold"):
        AggregateConfig(patch_threshold=1.2)
    with pytest.raises(ConfigError, match="slide_threshold"):
        AggregateConfig(slide_threshold=-0.1)
    with pytest.raises(ConfigError, match="unknown aggregation rule"):
        AggregateConfig(rule="Max")
    with pytest.raises(ConfigError, match="at least one patch"):
        slide_score([], "max")


def test_diagnose() -> None:
    cfg = AggregateConfig(rule="max", slide_threshold=0.7)
    res = diagnose(np.array([0.1, 0.75, 0.3, 0.75]), cfg, positive="tumour", negative="normal")
    assert res.diagnosis == "tumour" and res.score == 0.75 and res.n_patches == 4 and res.status == "ok"
    assert res.top_indices == [1, 3, 2, 0]  # highest first, ties by index
    assert res.n_positive_patches == 2
    assert res.to_json()["rule"] == "max"
    neg = diagnose(np.array([0.1, 0.2]), cfg, positive="tumour", negative="normal")
    assert neg.diagnosis == "normal"
    empty = diagnose(np.zeros(0), cfg, positive="tumour", negative="normal")
    assert empty.diagnosis == NO_TISSUE and empty.score is None and empty.n_patches == 0
    assert empty.status == NO_TISSUE and empty.top_indices == []
    # the threshold itself counts as positive
    edge = diagnose(np.array([0.7]), cfg, positive="tumour", negative="normal")
    assert edge.diagnosis == "tumour"


def test_top_indices_large() -> None:
    p = np.zeros(1000)
    p[[5, 500, 999]] = [0.9, 0.95, 0.9]
    assert top_indices(p, 4) == [500, 5, 999, 0]


@fast
@given(probs_st, k_st, st.floats(0.0, 1.0))
def test_scores_in_unit_interval_and_ordered(p: np.ndarray, k: int | float, thr: float) -> None:
    scores = {r: slide_score(p, r, k=k, patch_threshold=thr) for r in POOLED}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores["max"] >= scores["topk"] >= scores["mean"] - 1e-12
    n = p.size
    assert any(math.isclose(scores["fraction"], i / n, abs_tol=1e-12) for i in range(n + 1))


@fast
@given(probs_st, k_st, st.floats(0.0, 1.0), st.data())
def test_monotone_in_every_patch(p: np.ndarray, k: int | float, thr: float, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, p.size - 1))
    q = p.copy()
    q[i] = data.draw(st.floats(float(p[i]), 1.0))
    for rule in POOLED:
        assert slide_score(q, rule, k=k, patch_threshold=thr) >= \
            slide_score(p, rule, k=k, patch_threshold=thr) - 1e-12


@fast
@given(probs_st, k_st, st.randoms(use_true_random=False))
def test_permutation_invariant(p: np.ndarray, k: int | float, rnd: object) -> None:
    q = p.copy()
    rnd.shuffle(q)  # type: ignore[attr-defined]
    for rule in POOLED:
        assert slide_score(q, rule, k=k) == pytest.approx(slide_score(p, rule, k=k), abs=1e-12)


def test_describe_states_the_rule_and_threshold() -> None:
    """The sentence a calibrated copy's card states (`operating_point.slide_rule`): the bundled card's own one for
    the bundled rule, and the rule and threshold a recalibration chose for another."""
    import json

    from wsi_screen.models import default_model_dir
    from wsi_screen.screening.aggregate import describe

    folder = default_model_dir()
    rule = json.loads((folder / "slide_rule.json").read_text())
    card = json.loads((folder / "card.json").read_text())
    bundled = AggregateConfig(rule="region", slide_threshold=rule["slide_threshold"], region_threshold=0.8,
                              min_focus_patches=6, patch_threshold=rule["patch_threshold"])
    assert describe(bundled, "tumour", patch_area_mm2=(0.972 * 96 / 1000) ** 2) == \
        card["operating_point"]["slide_rule"]
    assert describe(AggregateConfig(rule="max", slide_threshold=0.98831), "tumour") == \
        "highest patch P(tumour) >= 0.988 -> tumour"
    assert describe(AggregateConfig(rule="topk", k=0.1, slide_threshold=0.5), "abnormal") == \
        "mean P(abnormal) of the highest 10% of patches >= 0.5 -> abnormal"


def _on_grid(p: np.ndarray):  # type: ignore[no-untyped-def]
    from wsi_screen.screening.spatial import patch_grid

    rows, cols = np.nonzero(np.ones_like(p, dtype=bool))
    coords = np.stack([cols * 96, rows * 96], 1).astype(np.int64)
    values = p[rows, cols]
    return values, patch_grid(coords, values, 96, 0.972)


def test_foci_need_min_focus_patches_whatever_the_rule_but_the_region_rules_largest_counts() -> None:
    p = np.full((12, 12), 0.1)
    p[1, 1:3] = 0.93          # a 2-patch region at 0.8: too small to be a focus
    p[8, 8] = 0.97            # the highest patch, alone
    values, grid = _on_grid(p)
    as_max = AggregateConfig(rule="max", slide_threshold=0.95, region_threshold=0.8, min_focus_patches=6)
    res = diagnose(values, as_max, positive="tumour", negative="normal", grid=grid)
    assert res.diagnosis == "tumour" and res.foci == () and res.n_foci == 0 and res.metastasis == "none"
    # no focus measures 0 mm, as on a negative slide (it was None, a blank results.csv cell, on positive calls)
    assert res.largest_focus_mm == 0.0 and res.tumour_area_mm2 == 0.0 and res.focus_indices == []
    # the call's evidence is the patch that decided it (row 8, col 8 in input order)
    assert res.evidence_indices == (8 * 12 + 8,)
    assert res.n_call_positive == 3 and res.n_positive_patches == int(np.sum(values >= as_max.patch_threshold))
    # the region rule: its largest region is its score, so it counts even under min_focus_patches
    as_region = AggregateConfig(rule="region", slide_threshold=0.01, region_threshold=0.8, min_focus_patches=6)
    reg = diagnose(values, as_region, positive="tumour", negative="normal", grid=grid)
    assert reg.diagnosis == "tumour" and reg.n_foci == 1 and reg.foci[0].n_patches == 2 and reg.evidence_indices == ()
    # six patches in a row make a focus under either rule
    p[4, 2:8] = 0.9
    values, grid = _on_grid(p)
    res = diagnose(values, as_max, positive="tumour", negative="normal", grid=grid)
    assert res.n_foci == 1 and res.foci[0].n_patches == 6 and res.metastasis == "micro"


def test_a_region_call_needs_a_region_even_at_slide_threshold_0() -> None:
    p = np.full((6, 6), 0.1)
    values, grid = _on_grid(p)
    at_zero = AggregateConfig(rule="region", slide_threshold=0.0, region_threshold=0.8)
    res = diagnose(values, at_zero, positive="tumour", negative="normal", grid=grid)
    assert res.score == 0.0 and res.diagnosis == "normal" and res.n_foci == 0 and res.metastasis == "none"
    assert res.largest_focus_mm == 0.0 and res.tumour_area_mm2 == 0.0
    assert not at_zero.calls(0.0) and at_zero.calls(1e-6)
    # one patch at 0.8 is a region: any region is enough at threshold 0
    p[2, 2] = 0.85
    values, grid = _on_grid(p)
    res = diagnose(values, at_zero, positive="tumour", negative="normal", grid=grid)
    assert res.diagnosis == "tumour" and res.score > 0 and res.n_foci == 1 and res.largest_focus_mm > 0
    # the pooled rules keep score >= threshold: a mean of 0 at threshold 0 is positive
    assert AggregateConfig(rule="mean", slide_threshold=0.0).calls(0.0)
    # and sentences say so (infer's summary, the report's rule line)
    from wsi_screen.screening.aggregate import call_comparison

    assert call_comparison("region", 0.0) == "> 0" and call_comparison("region", 0.0479) == ">= 0.0479"
    assert call_comparison("mean", 0.0) == ">= 0"


def test_a_score_and_its_threshold_print_with_decimals_that_keep_them_apart() -> None:
    """synth_000 (seed 5, --aggregate max): 0.984614 against 0.984831 printed as 'score 0.985 < 0.985'."""
    from wsi_screen.screening.aggregate import MOST_DECIMALS, call_comparison, score_against, score_decimals

    max_rule = AggregateConfig(rule="max", slide_threshold=0.984831)
    assert score_decimals(0.984831, [0.984614]) == 4 and score_against(max_rule, 0.984614) == "0.9846 < 0.9848"
    assert score_against(max_rule, 0.9848311) == "0.985 >= 0.985"  # at or above it: never printed below it
    assert score_decimals(0.984831, [0.9848301]) == MOST_DECIMALS == 6  # capped: 0.984830 < 0.984831
    assert score_decimals(0.5, [0.4999999]) == 6  # beyond the cap they may print equal
    # the threshold's own digits are kept (3 significant), and one count of decimals serves every score shown
    assert score_decimals(0.0479) == 4 and score_decimals(0.01) == 3 and score_decimals(0.0) == 3
    assert score_decimals(0.9, [0.95, 0.2, 0.89996]) == 5 and call_comparison("max", 0.9, 5) == ">= 0.90000"
    assert score_against(AggregateConfig(rule="region", slide_threshold=0.0479), 0.6531) == "0.6531 mm² >= 0.0479 mm²"
    assert score_against(AggregateConfig(rule="region", slide_threshold=0.0), 0.1) == "0.100 mm² > 0 mm²"
    assert AggregateConfig(rule="region", slide_threshold=1).unit == "mm²"


def test_call_evidence_is_what_the_score_was_read_from() -> None:
    from wsi_screen.screening.aggregate import call_evidence

    p = np.full((6, 6), 0.1)
    p[0, 5], p[5, 5], p[5, 0] = 0.99, 0.98, 0.97
    p[1:4, 1:4] = 0.7
    p[2, 2] = 0.75      # the highest 3 x 3 neighbourhood mean (0.706) is the one around cell (2, 2)
    values, grid = _on_grid(p)
    assert call_evidence(values, AggregateConfig(rule="max")) == (5,)
    assert call_evidence(values, AggregateConfig(rule="topk", k=3)) == (5, 30, 35)
    window = call_evidence(values, AggregateConfig(rule="smoothmax", radius=1), grid)
    assert window == tuple(r * 6 + c for r in range(1, 4) for c in range(1, 4))
    assert call_evidence(values, AggregateConfig(rule="mean")) == ()
    assert call_evidence(values, AggregateConfig(rule="fraction")) == ()
    assert call_evidence(values, AggregateConfig(rule="region"), grid) == ()
    res = diagnose(values, AggregateConfig(rule="topk", k=3, slide_threshold=0.5), positive="t", negative="n")
    assert res.evidence_indices == (5, 30, 35)


def test_one_picture_threshold_whatever_the_rule() -> None:
    from wsi_screen.screening.aggregate import call_patch_threshold, call_patch_threshold_name
    from wsi_screen.screening.run import fallback_rule

    for rule in RULES:
        cfg = AggregateConfig(rule=rule, patch_threshold=0.213, region_threshold=0.8,
                              slide_threshold=0.05 if rule == "region" else 0.9)
        assert cfg.call_patch_threshold == 0.8 == cfg.to_json()["call_patch_threshold"]
        assert call_patch_threshold(cfg.to_json()) == 0.8
    assert call_patch_threshold({"rule": "max", "patch_threshold": 0.213, "region_threshold": 0.7}) == 0.7  # old run
    assert call_patch_threshold({}) is None
    assert call_patch_threshold_name("region") == "the call's patch threshold"
    assert call_patch_threshold_name("max") == "the focus threshold"
    # a model without a calibrated rule has one threshold, its own, for its calls and its pictures
    fallback = fallback_rule(0.3)
    assert (fallback.patch_threshold, fallback.region_threshold, fallback.call_patch_threshold) == (0.3, 0.3, 0.3)
    assert fallback_rule(None).call_patch_threshold == 0.5


def test_foci_count_in_words() -> None:
    from wsi_screen.screening.aggregate import foci_count

    assert [foci_count(n) for n in (0, 1, 2)] == ["0 foci", "1 focus", "2 foci"]


def test_results_row_of_a_region_call_without_a_region(tmp_path: Path) -> None:
    from wsi_screen.screening.outputs import SlideRow, write_results
    from wsi_screen.screening.runfolder import read_results

    p = np.full((6, 6), 0.1)
    values, grid = _on_grid(p)
    at_zero = AggregateConfig(rule="region", slide_threshold=0.0, region_threshold=0.8)
    res = diagnose(values, at_zero, positive="tumour", negative="normal", grid=grid)
    write_results(tmp_path, [SlideRow(name="tcga", source="tcga.svs", result=res)], at_zero, {"arch": "m"})
    row = read_results(tmp_path)[0]
    assert (row["diagnosis"], row["metastasis"], row["n_foci"]) == ("normal", "none", "0")
    assert (row["largest_focus_mm"], row["tumour_area_mm2"]) == ("0.000", "0.0000")
