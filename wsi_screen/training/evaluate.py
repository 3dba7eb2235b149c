"""Metrics, operating points and evaluation of a model on a labelled split.

The maths is pure (arrays in, dicts out) and every number comes from scikit-learn; files (metrics.json,
predictions.csv, roc.png, confusion.png) are written at the edge by :func:`evaluate_model`.

Decisions follow the model: a binary model calls its positive class when ``p(positive) >= threshold``
(the operating point chosen on validation); a multi-class model predicts the most probable class. The
"positive" view (sensitivity, specificity, AUC of one class against the rest) is reported for the
model's positive class, or for another class named with ``positive``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_screen import progress
from wsi_screen._safe_write import atomic_write_text, atomic_write_with
from wsi_screen.errors import ConfigError, ModelMismatchError

if TYPE_CHECKING:
    from wsi_screen.models import PatchClassifier
    from wsi_screen.training.data import PatchFolder

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


def choose_threshold(is_positive: np.ndarray, score: np.ndarray, rule: ThresholdRule | str) -> float:
    """Threshold on ``score`` (call positive when ``score >= t``) chosen by ``rule`` on validation data.

    Ties are broken towards the other rate: among the cuts with the highest specificity at the required
    sensitivity, the one with the highest sensitivity (the lowest threshold), so a perfectly separated
    validation set does not push the threshold up to its top positive scores. The threshold is placed
    midway between the deciding score and the next lower one, so the validation decisions are exactly
    those the rule chose, with the widest margin. Falls back to 0.5 (logged) when the data hold only one
    class.
    """
    rule = ThresholdRule.parse(rule) if isinstance(rule, str) else rule
    if rule.kind == "fixed":
        return float(rule.value)  # type: ignore[arg-type]
    y = np.asarray(is_positive, dtype=bool)
    if y.all() or not y.any():
        log.warning("validation holds only one class; threshold falls back to 0.5")
        return 0.5
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, np.asarray(score, dtype=np.float64), drop_intermediate=False)
    # roc_curve runs from the highest threshold down: fpr and tpr never decrease along it
    target = 0.0 if rule.value is None else rule.value
    if rule.kind == "sensitivity":  # fewest false positives, then (ties) the most true positives
        best_fpr = fpr[tpr >= target - 1e-12].min()
        i = int(np.flatnonzero(fpr <= best_fpr)[-1])
    elif rule.kind == "specificity":  # most true positives, then (ties) the fewest false positives
        best_tpr = tpr[fpr <= 1.0 - target + 1e-12].max()
        i = int(np.argmax(tpr >= best_tpr))
    else:  # youden
        i = int(np.argmax(tpr - fpr))
    upper = float(thr[i]) if np.isfinite(thr[i]) else 1.0
    lower = float(thr[i + 1]) if i + 1 < len(thr) else 0.0
    return float(min(1.0, max(0.0, (upper + lower) / 2 if i + 1 < len(thr) else upper)))


# --- metrics ---------------------------------------------------------------------------------------------
def _f(x: Any) -> float | None:
    """A JSON-safe float (None for nan)."""
    x = float(x)
    return None if math.isnan(x) else x


def binary_view(is_positive: np.ndarray, called: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """Sensitivity, specificity, precision, F1 and AUC of one class against the rest."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

    y, c = np.asarray(is_positive, bool), np.asarray(called, bool)
    tn, fp, fn, tp = confusion_matrix(y, c, labels=[False, True]).ravel()
    both = bool(y.any() and not y.all())
    return {
        "sensitivity": _f(recall_score(y, c, zero_division=np.nan)) if y.any() else None,
        "specificity": _f(tn / (tn + fp)) if tn + fp else None,
        "precision": _f(precision_score(y, c, zero_division=0)),
        "recall": _f(recall_score(y, c, zero_division=0)),
        "f1": _f(f1_score(y, c, zero_division=0)),
        "auc": _f(roc_auc_score(y, score)) if both else None,
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], *,
                    positive_index: int | None = None, threshold: float | None = None,
                    metric_positive: int | None = None) -> dict[str, Any]:
    """All evaluation metrics for integer labels ``y_true`` and probabilities ``probs`` (N, C).

    Decisions: see :func:`wsi_screen.decision.decide` (the model's ``positive_index`` and
    ``threshold``). ``metric_positive`` names the class of the one-vs-rest view (default: the model's
    positive class). For two classes, top-level precision/recall/f1/auc are the positive class's; for
    more, they are macro averages (and ``macro`` and ``per_class`` hold the details).
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    from wsi_screen.decision import decide

    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.shape != (len(y), n_classes):
        raise ValueError(f"probs shape {probs.shape} does not match {len(y)} labels and {n_classes} classes")
    labels = list(range(n_classes))
    pred = decide(probs, positive_index, threshold)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    for k, name in enumerate(classes):
        ovr_auc = None
        if 0 < (y == k).sum() < len(y):
            ovr_auc = float(roc_auc_score(y == k, probs[:, k]))
            aucs.append(ovr_auc)
        per_class[name] = {"precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
                           "support": int(support[k]), "auc": ovr_auc}
    macro = {"precision": float(np.mean(prec)), "recall": float(np.mean(rec)), "f1": float(np.mean(f1)),
             "auc": float(np.mean(aucs)) if aucs else None}
    out: dict[str, Any] = {
        "n": len(y),
        "classes": list(classes),
        "positive_class": classes[positive_index] if positive_index is not None else None,
        "threshold": threshold,
        "decision": ("p(positive) >= threshold" if n_classes == 2 and positive_index is not None
                     and threshold is not None else "argmax"),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else None,
        "balanced_accuracy": _balanced(y, pred, balanced_accuracy_score),
    }
    view_index = positive_index if metric_positive is None else metric_positive
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
                    "sensitivity": view["sensitivity"] if view else None,
                    "specificity": view["specificity"] if view else None})
    out["positive"] = view
    out["confusion_matrix"] = {"labels": list(classes), "rows": "true", "columns": "predicted",
                               "matrix": confusion_matrix(y, pred, labels=labels).tolist()}
    out["per_class"] = per_class
    out["macro"] = macro
    return out


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


# --- evaluation on a dataset -----------------------------------------------------------------------------
def evaluate_model(model: PatchClassifier, folder: PatchFolder, split: str, out_dir: str | Path, *,
                   positive: str | None = None, batch_size: int = 256, workers: int = 2) -> dict[str, Any]:
    """Score ``split`` of a dataset with ``model`` (a PatchClassifier) and write the evaluation folder.

    Writes ``metrics.json``, ``predictions.csv``, ``roc.png`` and ``confusion.png`` into ``out_dir`` and
    returns the metrics. Images of another size than the model input are resized (with a warning).
    """
    import torch

    from wsi_screen.training.data import iter_images

    spec = model.spec
    rows = folder.indices(split)
    present = sorted({folder.labels[i] for i in rows})
    unknown = [c for c in present if c not in spec.classes]
    if unknown:
        raise ModelMismatchError(f"the model's classes are {', '.join(spec.classes)} but {folder.describe()} "
                                 f"has {', '.join(unknown[:5])}: evaluate with the label column the model "
                                 "was trained on (--label-column) or with another model")
    metric_positive = None
    if positive is not None:
        if positive not in spec.classes:
            raise ConfigError(f"--positive {positive!r} is not one of the model's classes "
                              f"({', '.join(spec.classes)})")
        metric_positive = spec.classes.index(positive)
    y = folder.label_indices(spec.classes, rows)
    started = time.perf_counter()
    probs_parts: list[np.ndarray] = []
    dist_parts: list[np.ndarray] = []
    sizes: dict[tuple[int, int], int] = {}
    with progress.bar(total=len(rows), desc="evaluating", unit="img") as bar:
        for loaded in iter_images(folder, rows, spec.input_size, workers=workers, chunk=max(batch_size, 256)):
            for size, n in loaded.original_sizes.items():
                sizes[size] = sizes.get(size, 0) + n
            x = torch.from_numpy(loaded.images)
            for i in range(0, len(x), batch_size):
                p, d = model.score_tensor(model.preprocess(x[i:i + batch_size]))
                probs_parts.append(p.cpu().numpy())
                if d is not None:
                    dist_parts.append(d)
            bar.update(len(loaded.images))
    other = {s: n for s, n in sizes.items() if s != (spec.input_size, spec.input_size)}
    if other:
        desc = ", ".join(f"{n} of {w}x{h}" for (w, h), n in sorted(other.items()))
        log.warning("%s: images resized to the model input of %d px (%s)", folder.root, spec.input_size, desc)
    probs = np.concatenate(probs_parts)
    metrics = compute_metrics(y, probs, spec.classes, positive_index=spec.positive_index,
                              threshold=spec.threshold, metric_positive=metric_positive)
    metrics["source"] = {"dataset": str(folder.root), "split": split, "label_column": folder.label_column,
                         "images": len(rows),
                         "image_sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())},
                         "arch": spec.arch, "model_created": spec.created,
                         "seconds": round(time.perf_counter() - started, 2)}
    distance = np.concatenate(dist_parts) if model.domain is not None and dist_parts else None
    if model.domain is not None and distance is not None:
        flagged = ~model.domain.in_domain(distance)
        metrics["domain"] = {"threshold": model.domain.threshold, "flagged": int(flagged.sum()),
                             "flagged_fraction": float(flagged.mean()) if len(flagged) else 0.0,
                             "median_distance": float(np.median(distance)) if len(distance) else None}
    write_evaluation(out_dir, metrics, [folder.paths[i] for i in rows], y, probs, distance=distance,
                     in_domain=None if distance is None or model.domain is None else model.domain.in_domain(distance))
    return metrics


def write_evaluation(out_dir: str | Path, metrics: dict[str, Any], paths: list[str], y: np.ndarray,
                     probs: np.ndarray, *, distance: np.ndarray | None = None,
                     in_domain: np.ndarray | None = None) -> Path:
    """Write metrics.json, predictions.csv (with each image's domain distance when given), roc.png and
    confusion.png."""
    from wsi_screen.decision import decide

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes: list[str] = metrics["classes"]
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    pos = classes.index(metrics["positive_class"]) if metrics.get("positive_class") else None
    pred = decide(probs, pos, metrics.get("threshold"))
    with io.StringIO(newline="") as fh:
        writer = csv.writer(fh)
        domain = ["domain_distance", "in_domain"] if distance is not None else []
        writer.writerow(["path", "label", "predicted", *[f"p_{c}" for c in classes], *domain])
        for i, (p, t, d, row) in enumerate(zip(paths, y, pred, probs, strict=True)):
            extra = [] if distance is None else \
                [f"{distance[i]:.4f}", "" if in_domain is None else str(bool(in_domain[i])).lower()]
            writer.writerow([p, classes[t], classes[d], *[f"{v:.6f}" for v in row], *extra])
        atomic_write_text(out / "predictions.csv", fh.getvalue())
    plot_roc(out / "roc.png", y, probs, classes, metrics)
    plot_confusion(out / "confusion.png", metrics)
    return out


# --- plots -----------------------------------------------------------------------------------------------
def plot_roc(path: Path, y: np.ndarray, probs: np.ndarray, classes: list[str],
             metrics: dict[str, Any]) -> None:
    """ROC curve of the positive class (with the operating point), or one-vs-rest curves per class."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5, 5), dpi=120)
    ax = fig.add_subplot()
    view = metrics.get("positive")
    targets = [classes.index(view["class"])] if view else list(range(len(classes)))
    for k in targets:
        if not 0 < (y == k).sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y == k, probs[:, k])
        auc = metrics["per_class"][classes[k]]["auc"]
        ax.plot(fpr, tpr, lw=1.5, label=f"{classes[k]} (AUC {auc:.3f})")
    if view and view.get("sensitivity") is not None and view.get("specificity") is not None:
        ax.plot([1 - view["specificity"]], [view["sensitivity"]], "o", color="black",
                label=f"operating point (threshold {metrics['threshold']:.3g})"
                if metrics.get("threshold") is not None else "operating point")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title=f"ROC, n = {metrics['n']}")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


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

