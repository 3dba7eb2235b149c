"""Training a patch classifier on a labelled patch dataset, on a CPU or a GPU (``TrainConfig.device``).

:func:`train` = :func:`prepare_data` (read, validate and split the dataset, decode it once) +
:func:`fit` (the loop) and writes a model folder:

=========================== ================================================================================
``model.safetensors``       weights of the best epoch on validation
``config.json``             the :class:`~wsi_screen.models.ModelSpec` (contract, threshold, provenance)
``history.csv``             one row per epoch (written as training goes)
``split.csv``               which images trained and which validated
``valid/``                  validation metrics.json, predictions.csv, roc.png, confusion.png at the threshold
=========================== ================================================================================

Choices are made on validation only: the best epoch, early stopping and the decision threshold. The test
split is never read. Augmentation (:mod:`wsi_screen.training.augment`) runs on whole uint8 batches in the
main process, so it is cheap and deterministic under the seed; the seed also fixes initialisation, shuffling
and dropout (for a given number of threads).

On a CUDA GPU (``device`` ``auto`` where one is present, ``cuda``, ``cuda:N``) the model, the batches and the
augmentation run on the GPU and the forward pass runs in mixed precision (bfloat16, or float16 with a gradient
scaler on GPUs without bfloat16; :func:`wsi_screen.models.precision.training_dtype`); validation stays float32.
Batches streamed from disk are pinned for the copy to the GPU. On a CPU nothing changes: float32, no pinning.
``config.json`` records the device (``train_config.device``: type, index, GPU name) and the arithmetic
(``train_config.mixed_precision``).
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from wsi_screen.errors import TrainingDivergedError
from wsi_screen.metrics import ThresholdRule, choose_threshold, compute_metrics
from wsi_screen.models import CONFIG_NAME, ModelSpec
from wsi_screen.models.device import resolve_device
from wsi_screen.models.registry import check_arch, count_parameters
from wsi_screen.training import checkpoint as train_checkpoint
from wsi_screen.training.config import PreparedData, TrainConfig, TrainResult
from wsi_screen.training.cross_validation import NOT_RESUMED, auto_folds, fit_folds
from wsi_screen.training.data import (
    BatchSource,
    PatchImageDataset,
    fingerprint,
    in_memory,
    load_images,
    write_split_csv,
)
from wsi_screen.training.evaluate import write_evaluation
from wsi_screen.training.inputs import (
    HISTORY_COLUMNS,
    log_resizing,
    read_split,
    resolve_mpp,
    resolve_size,
)
from wsi_screen.training.loop import (
    Best,
    describe_device,
    epoch_score,
    finish_model_folder,
    history_row,
    make_loop,
    model_spec,
    n_epochs,
    refuse_existing_model,
    resolved_config,
    score_words,
)

log = logging.getLogger(__name__)


def _pretrained_spec(path: str | None) -> ModelSpec | None:
    if path is None:
        return None
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if (folder / CONFIG_NAME).exists() and (p.is_dir() or p.suffix == ".safetensors"):
        return ModelSpec.read(folder)
    return None


def prepare_data(dataset: str | Path, config: TrainConfig) -> PreparedData:
    """Read, validate and split the dataset and decode train + valid at the input size (never test)."""
    check_arch(config.arch)
    folder, split, classes, positive = read_split(dataset, config)
    pretrained = _pretrained_spec(config.pretrained)
    rows = np.concatenate([split.train, split.valid])
    size, sizes = resolve_size(config, folder, rows, pretrained)
    log_resizing(sizes, size, len(rows))
    mpp = resolve_mpp(config, folder, sizes, size)
    train_y = folder.label_indices(classes, split.train)
    valid_y = folder.label_indices(classes, split.valid)
    threads = max(1, config.workers)
    pin = resolve_device(config.device).type == "cuda"  # also refuses an absent device before any decoding
    if in_memory(len(rows), size, config.cache_limit_mb):
        train_src = BatchSource(train_y, images=torch.from_numpy(
            load_images(folder, split.train, size, workers=threads, desc="decoding train").images))
        valid_src = BatchSource(valid_y, images=torch.from_numpy(
            load_images(folder, split.valid, size, workers=threads, desc="decoding valid").images))
    else:
        log.info("%d images exceed `cache_limit_mb` (%.0f MB): streaming from disk", len(rows),
                 config.cache_limit_mb)
        train_src = BatchSource(train_y, stream=PatchImageDataset(folder, split.train, train_y, size),
                                workers=config.workers, pin_memory=pin)
        valid_src = BatchSource(valid_y, stream=PatchImageDataset(folder, split.valid, valid_y, size),
                                workers=config.workers, pin_memory=pin)
    fp = fingerprint(folder, [int(i) for i in rows],
                     ["train"] * len(split.train) + ["valid"] * len(split.valid))
    return PreparedData(folder=folder, split=split, classes=classes, positive=positive, size=size, mpp=mpp,
                        train=train_src, valid=valid_src, valid_targets=valid_y, data_fingerprint=fp,
                        image_sizes={f"{w}x{h}": n for (w, h), n in sorted(sizes.items())})


# --- the loop --------------------------------------------------------------------------------------------

def fit(data: PreparedData, config: TrainConfig, out_dir: str | Path) -> TrainResult:
    """Train on ``data.train``, choose on ``data.valid``, and write the model folder ``out_dir``.

    After every epoch the whole state is checkpointed in ``out_dir/checkpoint`` (see
    :mod:`wsi_screen.training.checkpoint`); a rerun with the same settings resumes after the last finished epoch
    unless ``config.restart``. ``config.json`` is written last and marks a complete folder.
    """
    if config.folds > 1:
        return fit_folds(data, config, out_dir)
    out = Path(out_dir)
    complete = (out / CONFIG_NAME).exists()
    refuse_existing_model(out, config)
    out.mkdir(parents=True, exist_ok=True)
    if complete or config.restart:
        (out / CONFIG_NAME).unlink(missing_ok=True)  # the folder is incomplete until the new config is written
        train_checkpoint.remove(out)
    write_split_csv(out / "split.csv", data.folder, data.split)
    started = time.perf_counter()
    pos_index = data.classes.index(data.positive) if data.positive is not None else None
    monitor = config.monitor if config.monitor != "auto" else "auc" if len(data.classes) == 2 \
        else "balanced_accuracy"
    best, history, stopped_early = Best(), [], False
    settings = train_checkpoint.run_settings(asdict(config), data.data_fingerprint)
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout, without touching the caller's RNG
        torch.manual_seed(config.seed)
        loop, built, report = make_loop(data, config)
        log.info("training %s (%s parameters) on %d images of %d px, validating on %d; up to %s on %s",
                 config.arch, f"{count_parameters(loop.model):,}", len(data.train), data.size,
                 len(data.valid), n_epochs(config.epochs), describe_device(loop.amp))
        stale, first = 0, 1
        resumed = train_checkpoint.load(out, settings=settings, model=loop.model, optimizer=loop.optimizer,
                                        schedule=loop.schedule, generator=loop.generator,
                                        scaler=loop.amp.scaler)
        if resumed is not None:
            best = Best(score=resumed.best_score, epoch=resumed.best_epoch, state=resumed.best_state,
                         probs=resumed.best_probs)
            history, stale, first = resumed.history, resumed.stale, resumed.epoch + 1
            stopped_early = bool(config.patience and stale >= config.patience and resumed.epoch < config.epochs)
        with (out / "history.csv").open("w", newline="", encoding="utf-8") as hist_fh:
            writer = csv.DictWriter(hist_fh, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(history)
            for epoch in range(first, config.epochs + 1):
                if stopped_early:
                    break
                t0 = time.perf_counter()
                train_loss, train_acc = loop.train_epoch(data, config, epoch)
                try:
                    probs, vm = loop.validate(data, pos_index, epoch=epoch, train_loss=train_loss)
                except TrainingDivergedError as exc:
                    if epoch == 1:
                        raise
                    raise TrainingDivergedError(f"{exc} and set `restart` ({out} keeps the checkpoint after epoch "
                                                f"{epoch - 1}, which a run with other settings does not resume)"
                                                ) from None
                score = epoch_score(vm, monitor)
                improved = score > best.score
                if improved:
                    best = Best(score=score, epoch=epoch, probs=probs,
                                 state={k: v.detach().clone() for k, v in loop.model.state_dict().items()})
                stale = 0 if improved else stale + 1
                row = history_row(epoch, loop.optimizer.param_groups[0]["lr"], train_loss, train_acc, vm, score,
                                  time.perf_counter() - t0, improved)
                writer.writerow(row)
                hist_fh.flush()
                history.append(row)
                train_checkpoint.save(out, settings=settings, epoch=epoch, stale=stale, best_score=best.score,
                                      best_epoch=best.epoch, best_state=best.state, best_probs=best.probs,
                                      history=history, model=loop.model, optimizer=loop.optimizer,
                                      schedule=loop.schedule, generator=loop.generator, scaler=loop.amp.scaler)
                log.info("epoch %d/%d: train loss %s, valid loss %s, auc %s, bal. acc (argmax) %s (%s s)%s", epoch,
                         config.epochs, row["train_loss"], row["valid_loss"], row["valid_auc"] or "n/a",
                         row["valid_balanced_accuracy"] or "n/a", row["seconds"], " *" if improved else "")
                if config.patience and stale >= config.patience and epoch < config.epochs:
                    stopped_early = True
                    log.info("no improvement in %s for %s: stopping", monitor, n_epochs(config.patience))

    loop.model.load_state_dict(best.state)
    rule = ThresholdRule.parse(config.threshold_rule)
    threshold = None if pos_index is None else \
        choose_threshold(data.valid_targets == pos_index, best.probs[:, pos_index], rule)
    metrics = compute_metrics(data.valid_targets, best.probs, data.classes, positive_index=pos_index,
                              threshold=threshold)
    metrics.update(epoch=best.epoch, monitor=monitor)
    seconds = time.perf_counter() - started
    spec = model_spec(config, data, built, threshold=threshold, rule=rule, metrics=metrics,
                      split={"split": data.split.description, "split_source": data.split.source,
                             "n_train": len(data.train), "n_valid": len(data.valid)},
                      class_targets=data.train.targets.numpy(),
                      train_config=resolved_config(config, data, monitor, best.epoch, stopped_early, seconds, report))
    write_evaluation(out / "valid", metrics, [data.folder.paths[i] for i in data.split.valid],
                     data.valid_targets, best.probs)
    finish_model_folder(out, loop.model, data, spec, data.valid_targets, best.probs)
    train_checkpoint.remove(out)
    log.info("best epoch %d (%s); threshold %s; saved %s", best.epoch, score_words(metrics, monitor, best.score),
             "n/a" if threshold is None else f"{threshold:.4f}", out)
    return TrainResult(model_dir=out, spec=spec, history=history, best_epoch=best.epoch,
                       best_score=best.score, stopped_early=stopped_early, seconds=seconds,
                       pretrained=report.as_dict() if report else None)


def for_data(config: TrainConfig, data: PreparedData) -> TrainConfig:
    """``config`` with its recipe and number of folds resolved for ``data`` (see wsi_screen.training.recipes and
    wsi_screen.training.cross_validation)."""
    from wsi_screen.training import recipes

    n_pool = len(data.train) + len(data.valid)
    config = recipes.apply(config, len(data.train))
    if config.folds == 0:
        pool_labels = np.concatenate([data.train.targets.numpy(), data.valid_targets])
        config = replace(config, folds=auto_folds(n_pool, pool_labels))
    log.info("recipe %s; %s", config.recipe, _folds_line(config.folds, data) if config.folds > 1 else
             "one validation split")
    if config.folds > 1 and data.split.source == "dataset":
        log.info("the dataset's %d valid images train the model too: evaluate it on `split` test, or set "
                 "`carve_valid` to keep them held out", len(data.valid))
    return config


def _folds_line(k: int, data: PreparedData) -> str:
    """What cross-validation does with the split logged before it: the folds are cut from its train and valid
    images together (test images, and valid ones left unused by `carve_valid`, never take part)."""
    if data.split.source == "dataset":
        pool = f"its {len(data.train)} train and {len(data.valid)} valid images together"
        split = "the dataset's train/valid split above"
    else:
        pool = f"all {len(data.train) + len(data.valid)} train images"
        split = "the valid split carved above"
    return (f"{k}-fold cross-validation: {split} is not used; the folds are cut from {pool}, and each image is "
            "validated once, by the model of the fold that leaves it out")


def train(dataset: str | Path, out_dir: str | Path, config: TrainConfig) -> TrainResult:
    """Train ``config.arch`` on a dataset folder and write the model folder (see the module docstring); with
    ``config.encoder``, a head on that encoder's embeddings (:mod:`wsi_screen.training.heads`)."""
    out = Path(out_dir)
    refuse_existing_model(out, config)
    if config.encoder is not None:
        from wsi_screen.training.heads import train_head

        return train_head(dataset, out, config)
    data = prepare_data(dataset, config)
    config = for_data(config, data)
    try:
        return fit(data, config, out)
    except KeyboardInterrupt as exc:
        if config.folds > 1:
            exc.add_note(NOT_RESUMED)
        raise
