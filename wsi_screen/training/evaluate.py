"""Evaluation of a model on a labelled split: metrics.json, predictions.csv, roc.png and confusion.png.

The numbers come from :mod:`wsi_screen.metrics` (the same code that reports slide metrics); this module
runs the model over the split and writes the files.

Decisions follow the model: a binary model calls its positive class when ``p(positive) >= threshold``
(the operating point chosen on validation); a multi-class model predicts the most probable class. The
"positive" view (sensitivity, specificity, AUC of one class against the rest) is reported for the
model's positive class, or for another class named with ``positive``: metrics.json's ``positive_class`` and
roc.png name that class, ``decision_class`` and ``threshold`` the model's operating point, which a binary model's
other class meets where ``p(positive) < threshold`` (the point marked on its ROC).

Images that trained the model (by its folder's ``split.csv``; :func:`trained_on`) give optimistic figures, and so
do those of its validation split, which chose its epoch and threshold: the evaluation warns with their numbers and
records them (null where it cannot tell), rather than refusing, since looking at fit is fair use.

An output folder that holds files is refused unless ``overwrite``, as ``train`` and ``tune`` refuse theirs; with it,
the evaluation's files (:data:`EVALUATION_FILES`) are replaced and nothing else in the folder is touched.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_screen import progress
from wsi_screen._safe_write import atomic_write_text
from wsi_screen.errors import ConfigError, ModelMismatchError
from wsi_screen.metrics import add_intervals, compute_metrics, plot_confusion, plot_model_roc

if TYPE_CHECKING:
    from wsi_screen.models import PatchClassifier
    from wsi_screen.training.data import PatchFolder

log = logging.getLogger(__name__)

#: what an evaluation folder holds (``fold_metrics.csv``: a cross-validated training's report, stale once another
#: evaluation replaces the others); with ``overwrite`` they are removed before the new evaluation is written
EVALUATION_FILES = ("metrics.json", "predictions.csv", "roc.png", "confusion.png", "fold_metrics.csv")


# --- evaluation on a dataset -----------------------------------------------------------------------------
def evaluate_model(model: PatchClassifier, folder: PatchFolder, split: str, out_dir: str | Path, *,
                   positive: str | None = None, batch_size: int = 256, workers: int = 2,
                   overwrite: bool = False) -> dict[str, Any]:
    """Score ``split`` of a dataset with ``model`` (a PatchClassifier) and write the evaluation folder.

    Writes ``metrics.json``, ``predictions.csv``, ``roc.png`` and ``confusion.png`` into ``out_dir`` and
    returns the metrics. Images of another size than the model input are resized (with a warning). An
    ``out_dir`` that holds files is refused unless ``overwrite`` (see the module docstring).
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} already holds files; set `overwrite` or choose another output folder")
        for name in EVALUATION_FILES:
            (out / name).unlink(missing_ok=True)

    from wsi_screen.models.device import device_info
    from wsi_screen.training.data import iter_images

    spec = model.spec
    rows = folder.indices(split)
    present = sorted({folder.labels[i] for i in rows})
    unknown = [c for c in present if c not in spec.classes]
    if unknown:
        raise ModelMismatchError(f"the model's classes are {', '.join(spec.classes)} but {folder.describe()} "
                                 f"has {', '.join(unknown[:5])}: evaluate with the label column the model "
                                 "was trained on (`label_column`) or with another model")
    metric_positive = None
    if positive is not None:
        if positive not in spec.classes:
            raise ConfigError(f"`positive` {positive!r} is not one of the model's classes "
                              f"({', '.join(spec.classes)})")
        metric_positive = spec.classes.index(positive)
    y = folder.label_indices(spec.classes, rows)
    seen = trained_on(model, folder, rows)
    chose = trained_on(model, folder, rows, role="valid")
    split_csv = model.model_dir / "split.csv" if model.model_dir else "split.csv"
    honest = ("for an honest one evaluate a split it did not see (`split` test), or train it with `carve_valid` and "
              "evaluate `split` valid")
    if seen:
        how = "cross-validation trains on the dataset's train and valid images" if spec.ensemble > 1 \
            else "its training split"
        log.warning("%d of the %d images evaluated trained this model (%s, %s): these figures are optimistic; %s",
                    seen, len(rows), how, split_csv, honest)
    if chose:
        log.warning("%d of the %d images evaluated are this model's validation images (%s): they chose its epoch "
                    "and decision threshold, so the figures at the threshold are optimistic (its sensitivity is "
                    "the threshold rule's by construction); %s", chose, len(rows), split_csv, honest)
    started = time.perf_counter()
    probs_parts: list[np.ndarray] = []
    dist_parts: list[np.ndarray] = []
    sizes: dict[tuple[int, int], int] = {}
    with progress.bar(total=len(rows), desc="evaluating", unit="img") as bar:
        for loaded in iter_images(folder, rows, spec.input_size, workers=workers, chunk=max(batch_size, 256)):
            for size, n in loaded.original_sizes.items():
                sizes[size] = sizes.get(size, 0) + n
            p, d = model.predict_with_domain(loaded.images, batch_size=batch_size)
            probs_parts.append(p)
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
    add_intervals(metrics, y, probs)
    metrics["source"] = {"dataset": str(folder.root), "split": split, "label_column": folder.label_column,
                         "images": len(rows), "images_that_trained_the_model": seen,
                         "images_that_chose_the_model": chose,
                         "image_sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())},
                         "arch": spec.arch, "model_created": spec.created,
                         "numeric_precision": model.precision, "device": device_info(model.device),
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


def trained_on(model: PatchClassifier, folder: PatchFolder, rows: np.ndarray, *, role: str = "train") -> int | None:
    """How many of ``rows`` trained ``model`` (``role`` valid: chose its epoch and threshold), by its folder's
    ``split.csv`` (same file and label); None where it cannot tell. Where the dataset the model was trained on is
    still there, its images are compared with these by the files they are (symbolic links followed), so another
    layout of the same files (a labels.csv over an ImageFolder's images) counts too; where it is not, only a copy
    under the same folder name can be compared, by relative path (paths such as ``tumour/001.png`` repeat across
    datasets). None: no model folder or no ``split.csv``, or the training dataset gone and ``folder`` named
    otherwise."""
    from wsi_screen.training.data import read_trained_images

    recorded = model.spec.data.get("dataset")
    split_csv = model.model_dir / "split.csv" if model.model_dir is not None else None
    if not recorded or split_csv is None or not split_csv.is_file():
        return None
    trained = read_trained_images(split_csv, role)
    source = Path(recorded)
    if source.is_dir():
        files = {((source / path).resolve(), label) for path, label in trained}
        return sum(((folder.root / folder.paths[i]).resolve(), folder.labels[i]) in files for i in rows)
    if source.name != folder.root.resolve().name:
        return None
    return sum((folder.paths[i], folder.labels[i]) in trained for i in rows)


def write_evaluation(out_dir: str | Path, metrics: dict[str, Any], paths: list[str], y: np.ndarray,
                     probs: np.ndarray, *, distance: np.ndarray | None = None,
                     in_domain: np.ndarray | None = None) -> Path:
    """Write metrics.json, predictions.csv (with each image's domain distance when given), roc.png and
    confusion.png."""
    from wsi_screen.metrics import decide

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes: list[str] = metrics["classes"]
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    decision_class = metrics.get("decision_class", metrics.get("positive_class"))  # the model's, not the view's
    pos = classes.index(decision_class) if decision_class else None
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
    plot_model_roc(out / "roc.png", y, probs, classes, metrics)
    plot_confusion(out / "confusion.png", metrics)
    return out


