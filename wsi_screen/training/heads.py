"""Training a head (linear or MLP) on a frozen encoder's embeddings (``TrainConfig.encoder`` and ``head``).

The dataset is read and split as for any training run (:func:`wsi_screen.training.train.read_split`: the test
split is never read); the encoder embeds every train and valid image once (cached, see
:mod:`wsi_screen.training.embeddings`), and only the head trains, on the embeddings: seconds per epoch on a CPU
whatever the encoder. The best epoch on validation is kept and the decision threshold chosen there, as in
:func:`wsi_screen.training.train.fit`, with the same options (epochs, patience, optimiser, schedule, label
smoothing, class weights, dropout, threshold rule), except that the learning rate defaults to :data:`HEAD_LR`.
Image augmentation and the other settings of a whole network's training do not apply (the embeddings are fixed):
:class:`~wsi_screen.training.config.TrainConfig` refuses them with an ``encoder`` (its ``NETWORK_ONLY``, a recipe,
``folds`` above 1) and ``config.json`` records them as null (:meth:`TrainConfig.applied`).

The model folder is a normal one (see :mod:`wsi_screen.models.head`): ``config.json`` names the encoder (its
identity, weights sha256 and preprocessing) and the head, ``model.safetensors`` holds the head's tensors, plus
``history.csv``, ``split.csv``, ``valid/`` and ``card.json``. It has no domain model (``domain.json``): the
out-of-domain flag of ``infer`` needs one, so runs with a head model say that slides are not checked for it.
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
from torch import nn

from wsi_screen import __version__, progress
from wsi_screen.errors import ConfigError
from wsi_screen.metrics import ThresholdRule, choose_threshold, compute_metrics
from wsi_screen.models import CONFIG_NAME, ModelSpec, save_model
from wsi_screen.models.card import write_card
from wsi_screen.models.device import resolve_device
from wsi_screen.models.domain import DOMAIN_CONFIG, DOMAIN_WEIGHTS
from wsi_screen.models.encoder import EncoderIdentity, load_encoder
from wsi_screen.models.head import Head, head_record
from wsi_screen.training.config import TrainConfig, TrainResult
from wsi_screen.training.data import PatchFolder, Split, file_digests, fingerprint, write_split_csv
from wsi_screen.training.embeddings import DatasetEmbeddings, cache_folder, dataset_embeddings
from wsi_screen.training.evaluate import write_evaluation
from wsi_screen.training.inputs import HISTORY_COLUMNS, log_resizing, read_split, resolve_mpp, resolve_size
from wsi_screen.training.loop import (
    _auc_ci,
    _class_weights,
    check_finite,
    epoch_score,
    history_row,
    make_optimizer,
    make_schedule,
    n_epochs,
    refuse_existing_model,
    run_environment,
    score_words,
)

log = logging.getLogger(__name__)

#: the head's learning rate when --lr is not given: on the bundled model's PCam embeddings, 1e-3 (the whole
#: network's default) peaked at valid AUC 0.928 in the first epoch and fell after; 1e-4 reached 0.933-0.934
#: (choices made on PCam valid, docs/encoders.md)
HEAD_LR = 1e-4


def train_head(dataset: str | Path, out_dir: str | Path, config: TrainConfig) -> TrainResult:
    """Train ``config.head`` on ``config.encoder``'s embeddings of ``dataset`` and write the model folder. The
    encoder runs on ``config.device`` (mixed precision on a CUDA GPU); the head trains on the CPU (seconds)."""
    config = for_head(config)
    refuse_existing_model(Path(out_dir), config)
    return fit_head(prepare_head_data(dataset, config), config, out_dir)


def for_head(config: TrainConfig) -> TrainConfig:
    """``config`` as a head trains with it: the learning rate :data:`HEAD_LR` unless one is given."""
    if config.encoder is None:
        raise ConfigError("a head needs an encoder")
    return replace(config, lr=HEAD_LR) if config.lr is None else config


@dataclass(frozen=True)
class HeadData:
    """What every head trained on one dataset and encoder shares: the split, the encoder's identity and the
    embeddings of the train and valid images (read from the cache, or computed once and cached)."""

    folder: PatchFolder
    split: Split
    classes: list[str]
    positive: str | None
    size: int
    sizes: dict[tuple[int, int], int]
    mpp: float | None
    data_fingerprint: str
    identity: EncoderIdentity
    precision: str
    device: torch.device
    cache_dir: Path
    embeddings: DatasetEmbeddings
    embedding_seconds: float
    #: the embedding pass belongs to a search that shares it between its trials (recorded once, in its tune.json):
    #: a head trained on these data records its own embedding seconds as 0
    shared: bool = False

    def embedding_record(self) -> dict[str, Any]:
        """``config.json``'s ``train_config.embeddings``: the cache, whether it was read back, and the seconds of the
        embedding pass (0 for a trial of a search, ``shared`` true: the search's tune.json records the pass once)."""
        return {"cache": str(self.embeddings.path), "reused": self.embeddings.reused,
                "seconds": 0.0 if self.shared else round(self.embedding_seconds, 1), "shared": self.shared}


def prepare_head_data(dataset: str | Path, config: TrainConfig) -> HeadData:
    """Read and split ``dataset`` (never its test split), load ``config.encoder`` and embed the train and valid
    images (the cache :func:`~wsi_screen.training.embeddings.dataset_embeddings` keeps: a rerun, or every trial of
    a search, reads them from it)."""
    reference = config.encoder
    if reference is None:
        raise ConfigError("a head needs an encoder")
    torch_device = resolve_device(config.device)
    encoder = load_encoder(reference, weights=config.encoder_weights, device=torch_device,
                           precision="auto" if torch_device.type == "cuda" else "fp32")
    identity = encoder.identity
    folder, split, classes, positive = read_split(dataset, config)
    rows = np.concatenate([split.train, split.valid])
    size, sizes = resolve_size(config, folder, rows, None)
    log_resizing(sizes, size, len(rows))
    mpp = resolve_mpp(config, folder, sizes, size, warn_missing=True, encoder=(identity.name, identity.mpp))
    note = identity.scale_note(mpp, size)  # `mpp` is the patches' at `size` px
    if note:
        log.warning("%s", note)
    digests = file_digests(folder, [int(i) for i in rows])
    data_fp = fingerprint(folder, [int(i) for i in rows], ["train"] * len(split.train) + ["valid"] * len(split.valid),
                          digests=digests)
    cache_dir = cache_folder(config.embedding_cache)
    embedding_started = time.perf_counter()
    emb = dataset_embeddings(encoder, folder, split.train, split.valid, size=size, digests=digests,
                             cache_dir=cache_dir, workers=max(1, config.workers))
    return HeadData(folder=folder, split=split, classes=list(classes), positive=positive, size=size, sizes=sizes,
                    mpp=mpp, data_fingerprint=data_fp, identity=identity, precision=encoder.precision,
                    device=torch_device, cache_dir=cache_dir, embeddings=emb,
                    embedding_seconds=time.perf_counter() - embedding_started)


def fit_head(data: HeadData, config: TrainConfig, out_dir: str | Path) -> TrainResult:
    """Train ``config.head`` on ``data``'s embeddings, choose on validation, and write the model folder ``out_dir``
    (``config`` as :func:`for_head` makes it)."""
    out = Path(out_dir)
    folder, split, classes, positive, emb = data.folder, data.split, data.classes, data.positive, data.embeddings
    size, sizes, mpp, identity = data.size, data.sizes, data.mpp, data.identity
    started = time.perf_counter()  # the head's training, as a whole network's excludes decoding its images
    train_y = torch.from_numpy(folder.label_indices(classes, split.train))
    valid_y = folder.label_indices(classes, split.valid)
    pos_index = classes.index(positive) if positive is not None else None
    monitor = config.monitor if config.monitor != "auto" else "auc" if len(classes) == 2 else "balanced_accuracy"

    out.mkdir(parents=True, exist_ok=True)
    for stale_file in (CONFIG_NAME, DOMAIN_WEIGHTS, DOMAIN_CONFIG):  # an earlier model's: not this one's
        (out / stale_file).unlink(missing_ok=True)
    write_split_csv(out / "split.csv", folder, split)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head, best_state, best_probs, best_epoch, best_score, history, stopped = _fit(
            emb.train, train_y, emb.valid, valid_y, classes, pos_index, monitor, config, out)
    head.load_state_dict(best_state)
    rule = ThresholdRule.parse(config.threshold_rule)
    threshold = None if pos_index is None else \
        choose_threshold(valid_y == pos_index, best_probs[:, pos_index], rule)
    metrics = compute_metrics(valid_y, best_probs, classes, positive_index=pos_index, threshold=threshold)
    metrics.update(epoch=best_epoch, monitor=monitor)
    seconds = time.perf_counter() - started
    record = head_record(config.head, identity.dim)
    resolved = config.applied()
    resolved.update(embedding_cache=str(data.cache_dir))  # the folder used: the default one when none was named
    resolved.update(size=size, lr=config.resolved_lr, weight_decay=config.resolved_weight_decay, monitor=monitor,
                    best_epoch=best_epoch, stopped_early=stopped, seconds=round(seconds, 1),
                    embeddings=data.embedding_record())
    resolved.update(run_environment(data.device, data.precision))  # the head trains in float32, on the CPU
    spec = ModelSpec(
        arch=f"{identity.name}+{config.head}", classes=list(classes), input_size=size, positive_class=positive,
        mpp=mpp, mean=identity.mean, std=identity.std, stain_method=config.stain_method,
        stain_target=config.stain_target, threshold=threshold,
        threshold_rule=str(rule) if positive is not None else "argmax",
        metrics={k: v for k, v in metrics.items() if k != "classes"}, data_fingerprint=data.data_fingerprint,
        data={"dataset": str(folder.root.resolve()), "layout": folder.layout, "label_column": folder.label_column,
              "group_column": folder.group_column, "split": split.description, "split_source": split.source,
              "n_train": len(split.train), "n_valid": len(split.valid),
              "image_sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())},
              "train_class_counts": dict(Counter(classes[int(t)] for t in train_y))},
        train_config=resolved, package_version=__version__, encoder=identity.to_dict(), head=record)
    write_evaluation(out / "valid", metrics, [folder.paths[i] for i in split.valid], valid_y, best_probs)
    write_card(out, spec, auc_ci=_auc_ci(valid_y, best_probs, pos_index))
    save_model(out, head, spec)
    log.info("best epoch %d (%s); threshold %s; saved %s", best_epoch, score_words(metrics, monitor, best_score),
             "n/a" if threshold is None else f"{threshold:.4f}", out)
    return TrainResult(model_dir=out, spec=spec, history=history, best_epoch=best_epoch, best_score=best_score,
                       stopped_early=stopped, seconds=seconds)


def _probs(head: Head, features: torch.Tensor) -> np.ndarray:
    head.eval()
    with torch.inference_mode():
        return torch.softmax(head(features).float(), dim=1).numpy()


def _fit(train_x: torch.Tensor, train_y: torch.Tensor, valid_x: torch.Tensor, valid_y: np.ndarray,
         classes: list[str], pos_index: int | None, monitor: str, config: TrainConfig,
         out: Path) -> tuple[Head, dict[str, torch.Tensor], np.ndarray, int, float, list[dict[str, Any]], bool]:
    """The epochs: shuffled mini-batches of embeddings; the best epoch on validation is kept."""
    head = Head(config.head, int(train_x.shape[1]), len(classes), dropout=config.drop_rate)
    head.set_standardisation(train_x)
    steps = max(1, len(train_x) // config.batch_size)
    optimizer = make_optimizer(head, config)
    schedule = make_schedule(optimizer, config, steps)
    weights = _class_weights(train_y, len(classes)) if config.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    best_score, best_epoch, best_state, best_probs = -math.inf, 0, {}, np.zeros((0, 0))
    history: list[dict[str, Any]] = []
    stale, stopped = 0, False
    valid_t = torch.from_numpy(valid_y)
    with (out / "history.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for epoch in progress.bar(range(1, config.epochs + 1), total=config.epochs, desc="head", unit="epoch"):
            t0 = time.perf_counter()
            head.train()
            order = torch.randperm(len(train_x), generator=generator)
            losses, correct = 0.0, 0
            for i in range(0, steps * config.batch_size, config.batch_size):
                idx = order[i:i + config.batch_size]
                logits = head(train_x[idx])
                loss = criterion(logits, train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == train_y[idx]).sum())
            seen = steps * config.batch_size if len(train_x) >= config.batch_size else len(train_x)
            probs = _probs(head, valid_x)
            check_finite(epoch, losses / max(1, seen), probs)
            vm = compute_metrics(valid_y, probs, classes, positive_index=pos_index)
            vm["loss"] = float(nn.functional.nll_loss(torch.from_numpy(np.log(probs.clip(1e-7))), valid_t))
            score = epoch_score(vm, monitor)
            improved = score > best_score
            if improved:
                best_score, best_epoch, best_probs = score, epoch, probs
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            stale = 0 if improved else stale + 1
            row = history_row(epoch, optimizer.param_groups[0]["lr"], losses / max(1, seen), correct / max(1, seen),
                              vm, score, time.perf_counter() - t0, improved)
            writer.writerow(row)
            history.append(row)
            log.debug("head epoch %d: valid %s %.4f%s", epoch, monitor, score, " *" if improved else "")
            if config.patience and stale >= config.patience and epoch < config.epochs:
                stopped = True
                log.info("no improvement in %s for %s: stopping", monitor, n_epochs(config.patience))
                break
    return head, best_state, best_probs, best_epoch, best_score, history, stopped

