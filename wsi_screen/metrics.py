"""Metrics, written once for patches and slides: the threshold rule, the one-class view (sensitivity,
specificity, precision, F1, AUC), the multi-class metrics, confidence intervals and the ROC plot; and the
operating point, :func:`decide`: how class probabilities become a class (``predict``, ``evaluate``, the heatmap
contour, the QuPath GeoJSON and the report all call a patch through it, so a patch has the same class in every
output).

Every number comes from scikit-learn or from counts; arrays in, dicts out, no files except the plots.
``evaluate`` (patches) and ``infer`` with labels / ``calibrate`` (slides) call the same functions, so a patch
metric and a slide metric of the same name are computed the same way.

**The threshold rule** (:func:`choose_threshold`; "call positive when score >= t"): ``sensitivity:X`` is the
highest specificity with sensitivity >= X, ``specificity:X`` the highest sensitivity with specificity >= X
(within every stratum when ``strata`` is given), ``youden`` the largest sensitivity + specificity, ``fixed:T``
is T. **Ties go to the other rate**: among cut points equally good on the rate asked for, the one best on the
other (for ``sensitivity:X`` the lowest threshold, for ``specificity:X`` the highest), so no other cut is
better on both. The threshold sits midway between the deciding score and the next lower one. Scores are
non-negative on any scale: probabilities and fractions (at most 1) or an area in mm² (the region rule); a cut
above every score sits midway between the top score and 1 (probabilities) or twice the top score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen._safe_write import atomic_write_with
from wsi_screen.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD_RULE = "sensitivity:0.95"


# --- operating point -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThresholdRule:
    """How the decision threshold is chosen on validation.

    ``sensitivity:X`` highest specificity with sensitivity >= X (the screening default, X = 0.95);
    ``specificity:X`` highest sensitivity with specificity >= X; ``youden`` max sensitivity + specificity;
    ``fixed:T`` the threshold T.
    """

    kind: str
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> ThresholdRule:
        kind, _, value = text.strip().lower().partition(":")
        if kind == "youden" and not value:
            return cls("youden")
        if kind in ("sensitivity", "specificity", "fixed"):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if 0.0 <= number <= 1.0:
                return cls(kind, number)
        raise ConfigError(f"threshold rule {text!r} is not one of sensitivity:X, specificity:X, youden, "
                          "fixed:T (X, T between 0 and 1)")

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def decide(probs: np.ndarray, positive_index: int | None, threshold: float | None) -> np.ndarray:
    """Class decisions for probabilities (N, C).

    A binary model with a positive class calls it when its probability is at least ``threshold`` (the
    operating point chosen on validation); otherwise, and for more than two classes, the most probable
    class wins. ``predict`` and ``evaluate`` pass the model's threshold; a slide's outputs (heatmap contour,
    GeoJSON tiles, foci, report, notebook) the call's patch threshold, the focus threshold whatever the rule
    (:attr:`wsi_screen.screening.aggregate.AggregateConfig.call_patch_threshold`), so each picture shows one
    operating point.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0:
        return np.zeros(probs.shape[:1], dtype=np.int64)
    if probs.shape[1] == 2 and positive_index is not None and threshold is not None:
        called = probs[:, positive_index] >= threshold
        return np.where(called, positive_index, 1 - positive_index).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def choose_threshold(is_positive: np.ndarray, score: np.ndarray, rule: ThresholdRule | str, *,
                     strata: np.ndarray | Sequence[int] | None = None) -> float:
    """Threshold on ``score`` (call positive when ``score >= t``) chosen by ``rule`` (see the module: the one
    rule and its tie-break). With ``strata`` (a group per item, e.g. a slide-size bin) ``specificity:X`` must
    hold within every group of negatives, so a score that runs higher on larger slides gets the threshold
    its largest slides need. Falls back to 0.5 (logged) when the data hold only one class.
    """
    rule = ThresholdRule.parse(rule) if isinstance(rule, str) else rule
    if rule.kind == "fixed":
        return float(rule.value)  # type: ignore[arg-type]
    y = np.asarray(is_positive, dtype=bool)
    if y.all() or not y.any():
        log.warning("validation holds only one class; threshold falls back to 0.5")
        return 0.5
    from sklearn.metrics import roc_curve

    s = np.asarray(score, dtype=np.float64)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    # roc_curve runs from the highest threshold down: fpr and tpr never decrease along it
    target = 0.0 if rule.value is None else rule.value
    if rule.kind == "sensitivity":  # fewest false positives, then (ties) the most true positives
        best_fpr = fpr[tpr >= target - 1e-12].min()
        i = int(np.flatnonzero(fpr <= best_fpr)[-1])
    elif rule.kind == "specificity":  # most true positives, then (ties) the fewest false positives
        feasible = np.ones(thr.size, dtype=bool)
        groups = np.zeros(s.size, np.int64) if strata is None else np.asarray(strata)
        for g in np.unique(groups[~y]):
            neg = np.sort(s[~y & (groups == g)])
            false_pos = neg.size - np.searchsorted(neg, thr, side="left")  # negatives >= each cut
            feasible &= false_pos <= (1.0 - target) * neg.size + 1e-9
        best_tpr = tpr[feasible].max()
        i = int(np.argmax(tpr >= best_tpr))
    else:  # youden
        i = int(np.argmax(tpr - fpr))
    # the cut above every score (roc_curve's inf): 1 for probabilities, twice the top score on a larger scale
    top = float(s.max())
    ceiling = 1.0 if top <= 1.0 else 2.0 * top
    upper = float(thr[i]) if np.isfinite(thr[i]) else ceiling
    t = (upper + float(thr[i + 1])) / 2 if i + 1 < len(thr) else upper
    return float(min(ceiling, max(0.0, t)))


def rates_at(is_positive: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of calling ``score >= threshold`` positive (nan for a missing class)."""
    y = np.asarray(is_positive, dtype=bool)
    called = np.asarray(score, dtype=np.float64) >= threshold
    return (float(called[y].mean()) if y.any() else math.nan,
            float((~called[~y]).mean()) if (~y).any() else math.nan)


# --- metrics ---------------------------------------------------------------------------------------------
def json_float(x: Any) -> float | None:
    """A JSON-safe float (None for nan)."""
    x = float(x)
    return None if math.isnan(x) else x


def binary_view(is_positive: np.ndarray, called: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """Sensitivity, specificity, precision, F1 and AUC of one class against the rest; each None where it is
    undefined (no positives, no negatives, nothing called), not a 0 that reads as a measured failure."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

    y, c = np.asarray(is_positive, bool), np.asarray(called, bool)
    tn, fp, fn, tp = confusion_matrix(y, c, labels=[False, True]).ravel()
    both = bool(y.any() and not y.all())
    return {
        "sensitivity": json_float(recall_score(y, c, zero_division=np.nan)) if y.any() else None,
        "specificity": json_float(tn / (tn + fp)) if tn + fp else None,
        # undefined (None) where nothing was called (precision) or nothing was positive or called (F1)
        "precision": json_float(precision_score(y, c, zero_division=0)) if tp + fp else None,
        "recall": json_float(recall_score(y, c, zero_division=0)) if y.any() else None,  # = sensitivity
        "f1": json_float(f1_score(y, c, zero_division=0)) if tp + fp + fn else None,
        "auc": json_float(roc_auc_score(y, score)) if both else None,
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], *,
                    positive_index: int | None = None, threshold: float | None = None,
                    metric_positive: int | None = None) -> dict[str, Any]:
    """All evaluation metrics for integer labels ``y_true`` and probabilities ``probs`` (N, C).

    Decisions: see :func:`decide` (the model's ``positive_index`` and
    ``threshold``). ``metric_positive`` names the class of the one-vs-rest view (default: the model's
    positive class). For two classes, top-level precision/recall/f1/auc are the positive class's; for
    more, they are macro averages (and ``macro`` and ``per_class`` hold the details). Top-level sensitivity and
    specificity are the one-class view's where there is one (a positive class), else (more than two classes)
    the macro averages of every class's one-vs-rest rates.

    ``positive_class`` is the class the one-class view is for; ``decision_class`` the model's positive class, the
    one whose probability ``threshold`` applies to (they differ when ``metric_positive`` names another class: the
    view's class is then called as :func:`call_rule` says).
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.shape != (len(y), n_classes):
        raise ValueError(f"probs shape {probs.shape} does not match {len(y)} labels and {n_classes} classes")
    labels = list(range(n_classes))
    pred = decide(probs, positive_index, threshold)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    matrix = confusion_matrix(y, pred, labels=labels)
    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    for k, name in enumerate(classes):
        ovr_auc = None
        if 0 < (y == k).sum() < len(y):
            ovr_auc = float(roc_auc_score(y == k, probs[:, k]))
            aucs.append(ovr_auc)
        negatives = len(y) - int(support[k])  # one-vs-rest: the other classes' images, and those called k
        false_pos = int(matrix[:, k].sum() - matrix[k, k])
        per_class[name] = {"precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
                           "support": int(support[k]), "auc": ovr_auc,
                           "specificity": (negatives - false_pos) / negatives if negatives else None}
    # one-vs-rest sensitivity (recall) and specificity, averaged over the classes where each is defined
    sens = [float(rec[k]) for k in labels if support[k]]
    spec = [v["specificity"] for v in per_class.values() if v["specificity"] is not None]
    macro = {"precision": float(np.mean(prec)), "recall": float(np.mean(rec)), "f1": float(np.mean(f1)),
             "auc": float(np.mean(aucs)) if aucs else None,
             "sensitivity": float(np.mean(sens)) if sens else None,
             "specificity": float(np.mean(spec)) if spec else None}
    view_index = positive_index if metric_positive is None else metric_positive
    decision_class = classes[positive_index] if positive_index is not None else None
    by_threshold = n_classes == 2 and decision_class is not None and threshold is not None
    out: dict[str, Any] = {
        "n": len(y),
        "classes": list(classes),
        "positive_class": classes[view_index] if view_index is not None else None,
        "decision_class": decision_class,
        "threshold": threshold,
        "decision": ("argmax" if not by_threshold else "p(positive) >= threshold" if view_index == positive_index
                     else f"p({decision_class}) >= threshold"),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else None,
        "balanced_accuracy": _balanced(y, pred, balanced_accuracy_score),
    }
    view = None
    if view_index is not None:
        called = pred == view_index
        if n_classes > 2 and view_index == positive_index and threshold is not None:
            called = probs[:, view_index] >= threshold  # the screening call of a multi-class model
        view = binary_view(y == view_index, called, probs[:, view_index])
        view["class"] = classes[view_index]
    if n_classes == 2 and view is not None:
        out.update({k: view[k] for k in ("precision", "recall", "f1", "auc", "sensitivity", "specificity")})
    else:
        out.update({"precision": macro["precision"], "recall": macro["recall"], "f1": macro["f1"],
                    "auc": macro["auc"],
                    "sensitivity": view["sensitivity"] if view else macro["sensitivity"],
                    "specificity": view["specificity"] if view else macro["specificity"]})
    out["positive"] = view
    out["confusion_matrix"] = {"labels": list(classes), "rows": "true", "columns": "predicted",
                               "matrix": matrix.tolist()}
    out["per_class"] = per_class
    out["macro"] = macro
    return out


def call_rule(metrics: dict[str, Any], fmt: str = ".3g") -> str | None:
    """When :func:`compute_metrics`' one-class view calls its class (``positive_class``), in words: ``p(tumour) >=
    0.454``; for a binary model's other class ``p(tumour) < 0.454`` (the model's threshold read the other way);
    ``most probable class`` where the decision is the arg-max; None without a view."""
    view, decision = metrics.get("positive_class"), metrics.get("decision_class")
    threshold = metrics.get("threshold")
    if view is None:
        return None
    if decision is None or threshold is None or (view != decision and len(metrics["classes"]) != 2):
        return "most probable class"
    return f"p({decision}) {'>=' if view == decision else '<'} {threshold:{fmt}}"


def _balanced(y: np.ndarray, pred: np.ndarray, fn: Any) -> float | None:
    import warnings

    if not len(y):
        return None
    with warnings.catch_warnings():  # one class only in y_true (and y_pred): still well defined
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(fn(y, pred))


def monitor_value(metrics: dict[str, Any], name: str) -> float:
    """The model-selection score (higher is better) of validation ``metrics``; nan if undefined."""
    if name == "loss":
        return -float(metrics["loss"])
    value = metrics.get(name)
    return math.nan if value is None else float(value)



# --- intervals ------------------------------------------------------------------------------------------
#: fewer positive slides than this and a sensitivity measured on them (or a slide rule chosen by it) is mostly chance
ADVISED_POSITIVES = 20


def few_positives(n_positive: int, what: str) -> str | None:
    """The small-cohort warning (calibration's and the slide metrics'): ``only 3 positive slide(s): <what>,
    which takes at least 20 to mean much``; None from :data:`ADVISED_POSITIVES` positive slides on."""
    if n_positive >= ADVISED_POSITIVES:
        return None
    return f"only {n_positive} positive slide(s): {what}, which takes at least {ADVISED_POSITIVES} to mean much"


def one_class_words(n_positive: int, n_negative: int) -> str | None:
    """Why labelled slides of one class give no AUC and one rate only: ``no positive slide among the 2 labelled
    ones: no AUC and no sensitivity, the specificity only``; None when both classes are there."""
    if n_positive and n_negative:
        return None
    missing, rate = ("positive", "specificity") if not n_positive else ("negative", "sensitivity")
    other = "specificity" if rate == "sensitivity" else "sensitivity"
    n = n_positive + n_negative
    among = "the labelled one" if n == 1 else f"the {n} labelled ones"
    return f"no {missing} slide among {among}: no AUC and no {other}, the {rate} only"


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion, within [0, 1]. None correct gives a low end of exactly 0 and all
    correct a high end of exactly 1 (what the formula gives exactly; in floating point it leaves 6.9e-18 or
    0.9999999999999999)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes <= 0 else min(1.0, max(0.0, centre - half))
    high = 1.0 if successes >= n else min(1.0, max(0.0, centre + half))
    return low, high


def bootstrap_auc(scores: np.ndarray, labels: np.ndarray, *, n_boot: int = 1000,
                  seed: int = 0) -> tuple[float, float, float]:
    """AUC and its 95 % percentile-bootstrap interval (resampling slides within each class).

    The resamples depend on the two groups and ``seed``, not on which group is positive: each draw gives every
    position a uniform number and a group's picks come from its own positions' numbers. So the other class's
    interval (its labels negated, its scores reversed) is this one mirrored, ``[1 - high, 1 - low]``.

    Each resample's AUC is the Mann-Whitney statistic of its ranks (ties averaged: what ``roc_auc_score`` gives),
    computed for a block of resamples at once: 1,000 ``roc_auc_score`` calls took 3.5-4 s on a 2-core box, at every
    trained model, labelled ``evaluate`` and ``calibrate``.
    """
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    auc = float(roc_auc_score(y, s))
    rng = np.random.default_rng(seed)
    groups = (np.flatnonzero(y), np.flatnonzero(~y))
    n_pos, n_neg = groups[0].size, groups[1].size
    block = max(1, _BOOT_BLOCK // max(y.size, 1))
    boots = []
    for start in range(0, n_boot, block):
        u = rng.random((min(block, n_boot - start), y.size))  # the same draws, row by row, as one per resample
        idx = np.concatenate([g[np.minimum((u[:, g] * g.size).astype(np.intp), g.size - 1)] for g in groups],
                             axis=1)  # positives first, then negatives
        ranks = rankdata(s[idx], axis=1)
        boots.append((ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    lo, hi = np.percentile(np.concatenate(boots), [2.5, 97.5])
    return auc, float(lo), float(hi)


#: resampled scores held at once by :func:`bootstrap_auc` (rows of a block x the number of scores)
_BOOT_BLOCK = 2_000_000


def rate_intervals(counts: Mapping[str, int]) -> dict[str, list[float] | None]:
    """``sensitivity_ci95`` and ``specificity_ci95`` (:func:`wilson`, ``[low, high]``; None where the rate is
    undefined) from a confusion's ``tp``, ``fn``, ``tn`` and ``fp``."""
    tp, fn, tn, fp = (int(counts[k]) for k in ("tp", "fn", "tn", "fp"))
    return {"sensitivity_ci95": list(wilson(tp, tp + fn)) if tp + fn else None,
            "specificity_ci95": list(wilson(tn, tn + fp)) if tn + fp else None}


def _ci_words(ci: Sequence[float] | None, digits: int) -> str:
    """A 95 % interval after its figure: `` (95 % CI 0.21-0.94)`` at ``digits`` decimals; nothing without one."""
    return f" (95 % CI {ci[0]:.{digits}f}-{ci[1]:.{digits}f})" if ci else ""


def count_words(k: int, n: int, ci: Sequence[float] | None) -> str:
    """A rate on a few slides as counts with its 95 % interval: ``2/3 (95 % CI 0.21-0.94)`` (one format for the
    slide metrics and a calibration's figures)."""
    return f"{k}/{n}" + _ci_words(ci, 2)


#: the counts (of a ``confusion``) that a sensitivity and a specificity are the share of: (hits, of these)
_RATE_COUNTS = {"sensitivity": ("tp", "fn"), "specificity": ("tn", "fp")}


def rate_words(metrics: Mapping[str, Any], key: str) -> str:
    """A rate with its 95 % interval as people read it: :func:`count_words` (``2/3 (95 % CI 0.21-0.94)``) where
    ``metrics`` has its ``confusion``, else ``0.667 (95 % CI 0.21-0.94)``; ``n/a`` where undefined."""
    value, ci = metrics.get(key), metrics.get(f"{key}_ci95")
    if value is None:
        return "n/a"
    confusion = metrics.get("confusion")
    if confusion and key in _RATE_COUNTS:
        hit, miss = (int(confusion[k]) for k in _RATE_COUNTS[key])
        return count_words(hit, hit + miss, ci)
    return f"{value:.3g}" + _ci_words(ci, 2)


def auc_words(auc: float | None, ci: Sequence[float] | None) -> str:
    """An AUC with its 95 % interval as people read it: ``0.875 (95 % CI 0.583-1.000)`` (one format for the slide
    metrics, a calibration's figures and the report); ``n/a`` where undefined (labels of one class only)."""
    if auc is None:
        return "n/a"
    return f"{auc:.3f}" + _ci_words(ci, 3)


def add_intervals(metrics: dict[str, Any], y_true: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """:func:`compute_metrics`' ``metrics`` with 95 % intervals of its one-class view (``positive``), in place:
    ``sensitivity_ci95`` and ``specificity_ci95`` (:func:`wilson`, from the view's counts) and ``auc_ci95``
    (:func:`bootstrap_auc`, the bootstrap a model card's validation AUC gets), each ``[low, high]`` or None where
    the rate is undefined. The top level gets the view's intervals where its numbers are the view's: sensitivity
    and specificity always, AUC for two classes (for more, the top-level AUC is the macro average; its
    ``auc_ci95`` is None and the view's is in ``positive``)."""
    view = metrics.get("positive")
    if not view:
        metrics.update(auc_ci95=None, sensitivity_ci95=None, specificity_ci95=None)
        return metrics
    k = list(metrics["classes"]).index(view["class"])
    view.update(rate_intervals(view))
    view["auc_ci95"] = (list(bootstrap_auc(np.asarray(probs)[:, k], np.asarray(y_true) == k, n_boot=n_boot,
                                           seed=seed)[1:]) if view.get("auc") is not None else None)
    metrics["sensitivity_ci95"], metrics["specificity_ci95"] = view["sensitivity_ci95"], view["specificity_ci95"]
    metrics["auc_ci95"] = view["auc_ci95"] if len(metrics["classes"]) == 2 else None
    return metrics


# --- plots -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RocCurve:
    label: str
    is_positive: np.ndarray
    score: np.ndarray


def plot_roc(path: Path, curves: Sequence[RocCurve], *, title: str,
             point: tuple[float, float, str] | None = None) -> None:
    """The ROC plot: one curve per entry, an operating point ``(sensitivity, specificity, label)``."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5, 5), dpi=120)
    ax = fig.add_subplot()
    for c in curves:
        fpr, tpr, _ = roc_curve(c.is_positive, c.score)
        ax.plot(fpr, tpr, lw=1.5, label=c.label)
    if point is not None:
        ax.plot([1 - point[1]], [point[0]], "o", color="black", label=point[2])
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title=title)
    if ax.get_legend_handles_labels()[0]:  # no curve and no point (one class in the split): no legend to draw
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no ROC: the split holds one class", ha="center", va="center")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_model_roc(path: Path, y: np.ndarray, probs: np.ndarray, classes: list[str],
                   metrics: dict[str, Any]) -> None:
    """A model's ROC: its positive class (with the operating point), or one-vs-rest curves per class."""
    view = metrics.get("positive")
    targets = [classes.index(view["class"])] if view else list(range(len(classes)))
    curves = [RocCurve(f"{classes[k]} (AUC {metrics['per_class'][classes[k]]['auc']:.3f})", y == k, probs[:, k])
              for k in targets if 0 < (y == k).sum() < len(y)]
    point = None
    if view and view.get("sensitivity") is not None and view.get("specificity") is not None:
        rule = call_rule(metrics)
        same = metrics.get("positive_class") == metrics.get("decision_class", metrics.get("positive_class"))
        point = (view["sensitivity"], view["specificity"],
                 f"operating point (threshold {metrics['threshold']:.3g})"
                 if same and metrics.get("threshold") is not None else
                 f"operating point ({view['class']}: {rule})" if rule else "operating point")
    plot_roc(path, curves, title=f"ROC, n = {metrics['n']}", point=point)


def plot_confusion(path: Path, metrics: dict[str, Any]) -> None:
    """Confusion matrix (rows true, columns predicted) with counts."""
    from matplotlib.figure import Figure

    labels: list[str] = metrics["confusion_matrix"]["labels"]
    matrix = np.asarray(metrics["confusion_matrix"]["matrix"])
    side = 2.5 + 0.6 * len(labels)
    fig = Figure(figsize=(side + 1, side), dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = list(range(len(labels)))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    top = matrix.max() if matrix.size else 0
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > top / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))

