"""Choosing a slide rule and its threshold on labelled slides, and reporting how it does.

Candidates are every rule of :mod:`wsi_screen.screening.aggregate` with a few settings each (top-k for several k,
the smoothed maximum over 3x3 and 5x5 neighbourhoods, the largest region at several patch thresholds). The
operating point of a screening tool that labs will use is set by its negatives: for each candidate the
threshold is the one with the highest sensitivity among those whose specificity on the calibration slides
is at least ``min_specificity`` (:func:`wsi_screen.metrics.choose_threshold`, ``specificity:X`` within
every slide-size bin). The candidate with the
highest sensitivity there wins, then the one with the higher slide AUC. Candidates tied on both (on a small cohort
every rule may separate it) go to the model's current rule where it is one of them (``prefer``), else to the widest
margin (:func:`margin`), then to the simpler rule (the order of :func:`candidates`); the choice records the tie.

The cohort it is chosen on comes from :mod:`wsi_screen.synthetic.cohort` (``scripts/calibrate_slide_rule.py``), or
from a lab's own labelled run (``wsi-screen calibrate``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_screen.errors import ConfigError
from wsi_screen.metrics import ThresholdRule, bootstrap_auc, choose_threshold, rates_at, wilson
from wsi_screen.screening.aggregate import AggregateConfig, slide_score
from wsi_screen.screening.spatial import ScoreGrid, regions

TOPK = (1, 3, 5, 10, 20, 40)
RADII = (1, 2)
REGION_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
DEFAULT_MIN_SPECIFICITY = 0.99
#: share of calibration negatives allowed a region as large as a counted focus
FOCUS_NOISE_QUANTILE = 0.99


@dataclass(frozen=True)
class Candidate:
    """A rule with its settings; ``name`` is how tables show it (e.g. ``topk10``, ``region0.9``)."""

    name: str
    rule: str
    k: int = 5
    radius: int = 1
    region_threshold: float = 0.5


def candidates() -> list[Candidate]:
    out = [Candidate("mean", "mean"), Candidate("max", "max")]
    out += [Candidate(f"topk{k}", "topk", k=k) for k in TOPK]
    out.append(Candidate("fraction", "fraction"))
    out += [Candidate(f"smoothmax{r}", "smoothmax", radius=r) for r in RADII]
    out += [Candidate(f"region{t:g}", "region", region_threshold=t) for t in REGION_THRESHOLDS]
    return out


def candidate_scores(grid: ScoreGrid, patch_threshold: float) -> dict[str, float]:
    """Every candidate's score of one slide (its probabilities on their grid)."""
    p = grid.probs[~np.isnan(grid.probs)]
    return {c.name: slide_score(p, c.rule, k=c.k, patch_threshold=patch_threshold, grid=grid, radius=c.radius,
                                region_threshold=c.region_threshold) for c in candidates()}


def largest_region(grid: ScoreGrid, threshold: float) -> int:
    found = regions(grid, threshold)
    return found[0].n_patches if found else 0


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    threshold: float
    sensitivity: float
    specificity: float
    auc: float
    table: list[dict[str, Any]]
    #: the candidates tied with the chosen one on sensitivity and AUC (empty when it was chosen outright)
    tied: tuple[str, ...] = ()


def candidate_name(config: AggregateConfig) -> str:
    """The name of the :func:`candidates` entry a rule's settings are (e.g. ``topk10``, ``region0.8``)."""
    suffix = {"topk": f"{config.k}", "smoothmax": f"{config.radius}", "region": f"{config.region_threshold:g}"}
    return config.rule + suffix.get(config.rule, "")


def margin(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """The gap between the lowest-scoring positive called and the highest-scoring negative not called at
    ``threshold``, as a share of the scores' range (scale-free: rules score on different scales); 0 when either
    side is empty."""
    called = scores >= threshold
    pos, neg = scores[labels & called], scores[~labels & ~called]
    spread = float(scores.max() - scores.min())
    if not pos.size or not neg.size or spread <= 0:
        return 0.0
    return float(pos.min() - neg.max()) / spread


def best_of(table: Sequence[dict[str, Any]], prefer: str | None = None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The best row of a :func:`choose` table (sensitivity, then AUC; among ties ``prefer`` if it is one, else the
    widest margin, then the order of :func:`candidates`) and the names tied with it on sensitivity and AUC."""
    order = [c.name for c in candidates()]
    top = max((r["sensitivity"], r["auc"]) for r in table)
    tied = [r for r in table if (r["sensitivity"], r["auc"]) == top]
    kept = [r for r in tied if r["rule"] == prefer]
    best = kept[0] if kept else max(tied, key=lambda r: (r["margin"], -order.index(r["rule"])))
    return best, tuple(r["rule"] for r in tied) if len(tied) > 1 else ()


def choose(scores: Mapping[str, Sequence[float]], labels: Sequence[bool], *,
           min_specificity: float = DEFAULT_MIN_SPECIFICITY, strata: Sequence[int] | None = None,
           prefer: str | None = None) -> Choice:
    """The candidate with the highest sensitivity at specificity >= ``min_specificity`` (within every
    stratum of ``strata``, if given; the rule of :func:`wsi_screen.metrics.choose_threshold`); ties as
    :func:`best_of` breaks them (``prefer``: the model's current candidate)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ConfigError(f"choosing a slide rule needs positive and negative slides; got {int(y.sum())} "
                          f"positive of {y.size}")
    if not 0.0 < min_specificity <= 1.0:
        raise ConfigError(f"minimum specificity must be in (0, 1], got {min_specificity}")
    by_name = {c.name: c for c in candidates()}
    table: list[dict[str, Any]] = []
    for name, values in scores.items():
        s = np.asarray(values, dtype=np.float64)
        if s.shape != y.shape:
            raise ConfigError(f"rule {name}: {s.size} scores for {y.size} labelled slides")
        threshold = choose_threshold(y, s, ThresholdRule("specificity", min_specificity), strata=strata)
        sens, spec = rates_at(y, s, threshold)
        table.append({"rule": name, "auc": float(roc_auc_score(y, s)), "threshold": threshold,
                      "sensitivity": sens, "specificity": spec, "margin": margin(y, s, threshold)})
    best, tied = best_of(table, prefer)
    return Choice(candidate=by_name[best["rule"]], threshold=best["threshold"], sensitivity=best["sensitivity"],
                  specificity=best["specificity"], auc=best["auc"], table=table, tied=tied)


def min_focus_patches(negative_largest: Sequence[int]) -> int:
    """The smallest region that counts as a focus: one patch more than the largest region that
    :data:`FOCUS_NOISE_QUANTILE` of the negative slides show at the focus threshold."""
    v = np.asarray(negative_largest, dtype=np.float64)
    if v.size == 0:
        return 1
    return int(np.quantile(v, FOCUS_NOISE_QUANTILE, method="higher")) + 1


def aggregate_config(choice: Choice, *, patch_threshold: float, region_threshold: float,
                     focus_patches: int) -> AggregateConfig:
    c = choice.candidate
    return AggregateConfig(rule=c.rule, k=c.k, patch_threshold=patch_threshold,
                           slide_threshold=choice.threshold, radius=c.radius, region_threshold=region_threshold,
                           min_focus_patches=focus_patches)


# ------------------------------------------------------------------------------------------- reporting
SIZE_BINS = ((500, 2000), (2000, 5000), (5000, 10000), (10000, 20001))


def size_bin(n_patches: int) -> int:
    """Index of the :data:`SIZE_BINS` entry a slide of ``n_patches`` falls in (the last for larger ones)."""
    for i, (_, hi) in enumerate(SIZE_BINS):
        if n_patches < hi:
            return i
    return len(SIZE_BINS) - 1


def size_bin_words(i: int) -> str:
    """:func:`size_bin`'s bin ``i`` as it groups slides: the first takes every smaller slide, the last every
    larger one."""
    lo, hi = SIZE_BINS[i]
    if i == 0:
        return f"under {hi}"
    return f"{lo} or more" if i == len(SIZE_BINS) - 1 else f"{lo}-{hi}"


def report(scores: Sequence[float], labels: Sequence[bool], classes: Sequence[str], sizes: Sequence[int],
           threshold: float) -> dict[str, Any]:
    """Slide AUC (bootstrap CI), sensitivity by focus class and specificity by slide size (Wilson CIs)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    called = s >= threshold
    auc, lo, hi = bootstrap_auc(s, y)
    out: dict[str, Any] = {"n_slides": int(y.size), "n_positive": int(y.sum()), "auc": auc, "auc_ci": [lo, hi],
                           "sensitivity_by_class": {}, "specificity_by_size": {}}
    cls = np.asarray(classes)
    for name in ("itc", "micro", "macro"):
        m = y & (cls == name)
        k, n = int(called[m].sum()), int(m.sum())
        out["sensitivity_by_class"][name] = {"n": n, "detected": k, "rate": k / n if n else None,
                                             "ci": list(wilson(k, n))}
    n_all = np.asarray(sizes)
    for lo_n, hi_n in SIZE_BINS:
        m = ~y & (n_all >= lo_n) & (n_all < hi_n)
        k, n = int((~called[m]).sum()), int(m.sum())
        out["specificity_by_size"][f"{lo_n}-{min(hi_n, 20000)}"] = {"n": n, "correct": k,
                                                                    "rate": k / n if n else None,
                                                                    "ci": list(wilson(k, n))}
    k, n = int((~called[~y]).sum()), int((~y).sum())
    out["specificity"] = {"n": n, "correct": k, "rate": k / n if n else None, "ci": list(wilson(k, n))}
    k, n = int(called[y].sum()), int(y.sum())
    out["sensitivity"] = {"n": n, "detected": k, "rate": k / n if n else None, "ci": list(wilson(k, n))}
    return out


# ------------------------------------------------------------------------------------ whole calibration
@dataclass(frozen=True)
class LabelledSlide:
    """One labelled slide as calibration sees it: every candidate's score and the largest region at each
    candidate region threshold."""

    name: str
    positive: bool
    n_patches: int
    scores: dict[str, float]
    largest: dict[float, int]
    size_class: str = ""


def labelled_slide(name: str, grid: ScoreGrid, positive: bool, patch_threshold: float,
                   size_class: str = "") -> LabelledSlide:
    return LabelledSlide(name=name, positive=positive, n_patches=int(grid.tissue.sum()),
                         scores=candidate_scores(grid, patch_threshold),
                         largest={t: largest_region(grid, t) for t in REGION_THRESHOLDS}, size_class=size_class)


def _bins_held(slides: Sequence[LabelledSlide]) -> str:
    """The slide-size bins ``slides`` fall in, with their counts: ``under 2000 patches: 3 slides, ...``."""
    counts = collections.Counter(size_bin(s.n_patches) for s in slides)
    return ", ".join(f"{size_bin_words(i)} patches: {counts[i]} slide(s)" for i in sorted(counts))


def calibrate(slides: Sequence[LabelledSlide], *, patch_threshold: float,
              min_specificity: float = DEFAULT_MIN_SPECIFICITY,
              current: AggregateConfig | None = None) -> tuple[AggregateConfig, dict[str, Any]]:
    """Choose the rule on ``slides``; returns the config and the ``slide_rule.json`` body (without provenance).

    The focus threshold is the chosen region rule's, or else the best region candidate's; the smallest focus
    is :func:`min_focus_patches` of the negatives there. Ties keep the ``current`` rule's candidate and focus
    threshold where they are among the best (:func:`best_of`); ``tie`` in the body names the tied candidates."""
    labels = [s.positive for s in slides]
    names = [c.name for c in candidates()]
    choice = choose({n: [s.scores[n] for s in slides] for n in names}, labels, min_specificity=min_specificity,
                    strata=[size_bin(s.n_patches) for s in slides],
                    prefer=candidate_name(current) if current is not None else None)
    best_region, _ = best_of([t for t in choice.table if t["rule"].startswith("region")],
                             f"region{current.region_threshold:g}" if current is not None else None)
    region_threshold = choice.candidate.region_threshold if choice.candidate.rule == "region" \
        else float(best_region["rule"][len("region"):])
    focus = min_focus_patches([s.largest[region_threshold] for s in slides if not s.positive])
    config = aggregate_config(choice, patch_threshold=patch_threshold, region_threshold=region_threshold,
                              focus_patches=focus)
    per_rule: dict[str, Any] = {}
    by_name = {c.name: c for c in candidates()}
    for row in sorted(choice.table, key=lambda t: (-t["sensitivity"], -t["auc"])):
        c = by_name[row["rule"]]
        per_rule.setdefault(c.rule, {**row, "name": c.name, "rule": c.rule, "k": c.k, "radius": c.radius,
                                     "region_threshold": c.region_threshold})
    doc = {**config.to_json(), "name": choice.candidate.name, "per_rule": per_rule, "tie": list(choice.tied),
           "candidates": {t["rule"]: t for t in choice.table},
           "method": f"highest sensitivity at specificity >= {min_specificity} in every slide-size bin of the "
                     f"calibration slides ({_bins_held(slides)}); foci: "
                     f"regions of >= {focus} patches at p >= {region_threshold:g} (99th percentile of the "
                     "negatives' largest region + 1)"}
    return config, doc
