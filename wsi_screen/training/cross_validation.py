"""K-fold cross-validation for small datasets: training with ``folds`` K.

On a few hundred images one carved validation split (a hundred images) is too small to choose an epoch and
a threshold on: the choice follows the split's luck and the result swings with the seed. With ``folds`` K
the training pool (train plus any valid split) is cut into K folds, stratified by label and grouped by
``group_column`` when given. K models train **in lockstep**, each on K-1 folds, one epoch at a time; after
every epoch each scores its held-out fold, and the pooled out-of-fold predictions (every image scored by the
model that did not see it) give one validation score over the whole pool. The best epoch and the decision
threshold are chosen on those pooled predictions.

The delivered model is the **ensemble** of the K fold models at that epoch (their probabilities averaged): one
model folder that ``predict``, ``evaluate`` and ``infer`` load like any other (``config.json`` says
``ensemble: K``). Per-fold metrics at the chosen epoch, with their mean and sd, are in ``config.json``
(``metrics.folds``) and ``valid/fold_metrics.csv``; ``valid/`` holds the pooled out-of-fold evaluation.
Cross-validated runs are not checkpointed (small data: minutes): the run says so when it starts, and an
interrupted :func:`~wsi_screen.training.train.train` notes on its ``KeyboardInterrupt`` (:data:`NOT_RESUMED`, which
the CLI prints) that a rerun starts again at epoch 1.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_screen.errors import ConfigError, DatasetError
from wsi_screen.models import CONFIG_NAME
from wsi_screen.models.ensemble import Ensemble
from wsi_screen.training.config import PreparedData, TrainConfig, TrainResult
from wsi_screen.training.data import BatchSource, PatchFolder, Split
from wsi_screen.training.loop import (
    Loop,
    finish_model_folder,
    fmt,
    make_loop,
    model_spec,
    n_epochs,
    refuse_existing_model,
    resolved_config,
)

log = logging.getLogger(__name__)

#: default K of ``folds`` for small datasets
DEFAULT_FOLDS = 5
#: fewest images of a class in the pool for automatic cross-validation
MIN_PER_CLASS = 25
#: what an interrupted cross-validated run leaves: nothing to resume (a note on its KeyboardInterrupt)
NOT_RESUMED = "cross-validated training is not checkpointed: a rerun starts again at epoch 1"


def auto_folds(n_pool: int, labels: np.ndarray) -> int:
    """``folds`` 0 (auto): :data:`DEFAULT_FOLDS` for small pools with enough of every class, else 1."""
    from wsi_screen.training.recipes import SMALL_DATASET

    counts = Counter(labels.tolist())
    return DEFAULT_FOLDS if n_pool < SMALL_DATASET and min(counts.values()) >= MIN_PER_CLASS else 1


def assign_folds(labels: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) of every image: stratified by label, grouped when ``groups`` is given."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = Counter(labels.tolist())
    if min(counts.values()) < k:
        raise DatasetError(f"`folds` {k} needs at least {k} images of every class; the smallest class has "
                           f"{min(counts.values())}")
    out = np.full(len(labels), -1, dtype=np.int64)
    x = np.zeros((len(labels), 1))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed) if groups is not None \
        else StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(x, labels, groups)):
        out[held] = fold
    return out


@dataclass
class _Fold:
    index: int
    held: np.ndarray  # pool positions this fold's model never trains on
    data: PreparedData  # the fold's
    loop: Loop


def fit_folds(data: PreparedData, config: TrainConfig, out_dir: str | Path) -> TrainResult:
    """Cross-validated training (see the module docstring)."""
    from wsi_screen.metrics import ThresholdRule, choose_threshold, compute_metrics, monitor_value
    from wsi_screen.models import count_parameters
    from wsi_screen.training.evaluate import write_evaluation

    k = int(config.folds)
    if data.train.images is None or data.valid.images is None:
        raise ConfigError("`folds` needs the dataset decoded in memory; raise `cache_limit_mb`")
    out = Path(out_dir)
    refuse_existing_model(out, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).unlink(missing_ok=True)
    rows = np.concatenate([data.split.train, data.split.valid])
    images = torch.cat([data.train.images, data.valid.images])
    targets = np.concatenate([data.train.targets.numpy(), data.valid_targets])
    groups = None if data.folder.groups is None else np.asarray([data.folder.groups[i] for i in rows])
    fold_of = assign_folds(targets, groups, k, config.seed)
    _write_folds_csv(out / "split.csv", data.folder, rows, fold_of)
    pos_index = data.classes.index(data.positive) if data.positive is not None else None
    monitor = config.monitor if config.monitor != "auto" else "auc" if len(data.classes) == 2 \
        else "balanced_accuracy"
    started = time.perf_counter()
    folds: list[_Fold] = []
    built: dict[str, Any] = {}
    report = None
    with torch.random.fork_rng(devices=[]):
        for f in range(k):
            fit_rows, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            fold_data = replace(data, split=Split(train=rows[fit_rows], valid=rows[held], source=f"fold {f + 1}",
                                                  description=f"fold {f + 1} of {k}"),
                                train=BatchSource(targets[fit_rows], images=images[fit_rows]),
                                valid=BatchSource(targets[held], images=images[held]), valid_targets=targets[held])
            torch.manual_seed(config.seed * 1000 + f)
            loop, built, report = make_loop(fold_data, config)  # the same architecture and kwargs each time
            loop.name = f"fold {f + 1}/{k}"
            folds.append(_Fold(f, held, fold_data, loop))
        log.info("training %d x %s (%s parameters each) in %d-fold cross-validation on %d images of %d px; up "
                 "to %s", k, config.arch, f"{count_parameters(folds[0].loop.model):,}", k, len(rows),
                 data.size, n_epochs(config.epochs))
        log.info("cross-validated training is not checkpointed: if interrupted, a rerun starts again at epoch 1 "
                 "(`folds` 1 trains one checkpointed model)")
        best: dict[str, Any] = {"score": -math.inf, "epoch": 0}
        stale, history, stopped_early = 0, [], False
        with (out / "history.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=FOLD_HISTORY)
            writer.writeheader()
            for epoch in range(1, config.epochs + 1):
                t0 = time.perf_counter()
                oof = np.zeros((len(rows), len(data.classes)), dtype=np.float32)
                losses = []
                for fold in folds:
                    loss, _acc = fold.loop.train_epoch(fold.data, config, epoch)
                    losses.append(loss)
                    oof[fold.held], _ = fold.loop.validate(fold.data, pos_index, epoch=epoch, train_loss=loss)
                pooled = compute_metrics(targets, oof, data.classes, positive_index=pos_index)
                score = monitor_value(pooled, monitor)
                per_fold = [_fold_auc(targets[fd.held], oof[fd.held], pos_index) for fd in folds]
                fold_scores = [_fold_score(targets[fd.held], oof[fd.held], data.classes, pos_index, monitor)
                               for fd in folds]
                improved = score > best["score"]
                if improved:
                    best = {"score": score, "epoch": epoch, "oof": oof.copy(), "fold_scores": fold_scores,
                            "states": [{n: v.detach().clone() for n, v in fd.loop.model.state_dict().items()}
                                       for fd in folds]}
                stale = 0 if improved else stale + 1
                row = {"epoch": epoch, "train_loss": f"{np.mean(losses):.4f}", "oof_auc": fmt(pooled.get("auc")),
                       "oof_balanced_accuracy": fmt(pooled["balanced_accuracy"]),
                       "fold_auc_mean": fmt(_mean(per_fold)), "fold_auc_sd": fmt(_sd(per_fold)),
                       "monitor": f"{score:.4f}", "fold_monitor_mean": fmt(_mean(fold_scores)),
                       "fold_monitor_sd": fmt(_sd(fold_scores)), "seconds": f"{time.perf_counter() - t0:.1f}",
                       "best": "*" if improved else ""}
                writer.writerow(row)
                fh.flush()
                history.append(row)
                log.info("epoch %d/%d: out-of-fold %s %.4f, %s (%s s)%s", epoch, config.epochs, monitor, score,
                         _fold_figure(monitor, fold_scores), row["seconds"], " *" if improved else "")
                if config.patience and stale >= config.patience and epoch < config.epochs:
                    stopped_early = True
                    log.info("no improvement in %s for %s: stopping", monitor, n_epochs(config.patience))
                    break

    for fold, state in zip(folds, best["states"], strict=True):
        fold.loop.model.load_state_dict(state)
    ensemble = Ensemble([fd.loop.model for fd in folds]).eval()
    oof = best["oof"]
    rule = ThresholdRule.parse(config.threshold_rule)
    threshold = None if pos_index is None else choose_threshold(targets == pos_index, oof[:, pos_index], rule)
    metrics = compute_metrics(targets, oof, data.classes, positive_index=pos_index, threshold=threshold)
    fold_rows = [{"fold": fd.index + 1, "n": len(fd.held),
                  **_fold_metrics(targets[fd.held], oof[fd.held], data.classes, pos_index, threshold)}
                 for fd in folds]
    aucs = [r["auc"] for r in fold_rows]
    metrics.update(epoch=best["epoch"], monitor=monitor, cross_validation={
        "folds": k, "pooled": "out-of-fold predictions of the fold models at the chosen epoch",
        "per_fold": fold_rows, "auc_mean": _mean(aucs), "auc_sd": _sd(aucs)})
    seconds = time.perf_counter() - started
    grouped = f", grouped by {data.folder.group_column!r}" if groups is not None else ""
    spec = model_spec(config, data, built, threshold=threshold, rule=rule, metrics=metrics,
                        split={"split": f"{k}-fold cross-validation over {len(rows)} images (stratified{grouped}, "
                                        f"seed {config.seed})",
                               "split_source": "folds", "n_train": len(rows), "n_valid": len(rows), "folds": k},
                        class_targets=targets,
                        train_config=resolved_config(config, data, monitor, best["epoch"], stopped_early, seconds,
                                                 report),
                        ensemble=k)
    write_evaluation(out / "valid", metrics, [data.folder.paths[i] for i in rows], targets, oof)
    _write_fold_metrics(out / "valid" / "fold_metrics.csv", fold_rows)
    pool = replace(data, train=BatchSource(targets, images=images), valid=BatchSource(targets, images=images),
                   valid_targets=targets)
    # the domain threshold is set on the training images here: see docs/classifier.md
    finish_model_folder(out, ensemble, pool, spec, targets, oof, domain_calibrated_on="train")
    log.info("best epoch %d (out-of-fold %s %.4f, %s); threshold %s; saved %s", best["epoch"], monitor,
             best["score"], _fold_figure(monitor, best["fold_scores"]),
             "n/a" if threshold is None else f"{threshold:.4f}", out)
    return TrainResult(model_dir=out, spec=spec, history=history, best_epoch=best["epoch"],
                         best_score=best["score"], stopped_early=stopped_early, seconds=seconds,
                         pretrained=report.as_dict() if report else None)


FOLD_HISTORY = ("epoch", "train_loss", "oof_auc", "oof_balanced_accuracy", "fold_auc_mean", "fold_auc_sd",
                "monitor", "seconds", "best", "fold_monitor_mean", "fold_monitor_sd")


def _fold_auc(y: np.ndarray, probs: np.ndarray, pos_index: int | None) -> float | None:
    if pos_index is None or len(set(y.tolist())) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y == pos_index, probs[:, pos_index]))


def _fold_score(y: np.ndarray, probs: np.ndarray, classes: list[str], pos_index: int | None,
                monitor: str) -> float | None:
    """The monitored figure on one fold's held-out images (None where undefined)."""
    from wsi_screen.metrics import compute_metrics, monitor_value

    value = monitor_value(compute_metrics(y, probs, classes, positive_index=pos_index), monitor)
    return None if math.isnan(value) else value


def _fold_figure(monitor: str, scores: list[float | None]) -> str:
    """``fold auc 0.8512 +- 0.0301``: the monitored figure's mean and sd over the folds, named."""
    mean, sd = _mean(scores), _sd(scores)
    spread = "n/a" if mean is None else f"{mean:.4f}" + ("" if sd is None else f" +- {sd:.4f}")
    return f"fold {monitor} {spread}"


def _fold_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], pos_index: int | None,
                  threshold: float | None) -> dict[str, Any]:
    from wsi_screen.metrics import compute_metrics

    m = compute_metrics(y, probs, classes, positive_index=pos_index, threshold=threshold)
    return {key: m.get(key) for key in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")}


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _sd(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def _write_folds_csv(path: Path, folder: PatchFolder, rows: np.ndarray, fold_of: np.ndarray) -> None:
    """``split.csv`` of a cross-validated model: every pool image with its fold (1..K)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "fold"] + (["group"] if folder.groups is not None else []))
        for i, f in sorted(zip(rows.tolist(), fold_of.tolist(), strict=True)):
            extra = [folder.groups[i]] if folder.groups is not None else []
            writer.writerow([folder.paths[i], folder.labels[i], "train", f + 1, *extra])


def _write_fold_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
