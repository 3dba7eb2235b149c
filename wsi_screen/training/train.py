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

import contextlib
import csv
import logging
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_screen import __version__, progress
from wsi_screen._device_name import parse_device_name
from wsi_screen.errors import ConfigError, DatasetError, ModelError
from wsi_screen.metrics import DEFAULT_THRESHOLD_RULE, ThresholdRule, choose_threshold, compute_metrics, monitor_value
from wsi_screen.models import (
    CONFIG_NAME,
    ModelSpec,
    PretrainedReport,
    create_model,
    load_pretrained,
    save_model,
)
from wsi_screen.models.card import write_card
from wsi_screen.models.classifier import normalise, to_unit_float
from wsi_screen.models.device import device_info, resolve_device
from wsi_screen.models.domain import DomainModel, collect_features
from wsi_screen.models.domain import fit as fit_domain_model
from wsi_screen.models.precision import dtype_name, training_dtype
from wsi_screen.models.registry import (
    check_arch,
    classifier_parameter_names,
    count_parameters,
    default_mean_std,
    fixed_input_size,
)
from wsi_screen.models.spec import STAIN_METHODS
from wsi_screen.training import checkpoint as train_checkpoint
from wsi_screen.training.augment import BatchAugment
from wsi_screen.training.data import (
    BatchSource,
    PatchFolder,
    PatchImageDataset,
    Split,
    fingerprint,
    image_sizes,
    in_memory,
    load_images,
    make_split,
    open_patch_folder,
    write_split_csv,
)
from wsi_screen.training.evaluate import write_evaluation

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
MONITORS = ("auto", "auc", "balanced_accuracy", "accuracy", "loss")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adam": 0.0, "adamw": 0.05}

#: words that mark the disease class of a binary dataset (tokens of the class name, e.g. colon_aca)
#: words in a class name that make it the positive (screening) class
POSITIVE_CLASS_WORDS = frozenset({"tumour", "tumor", "abnormal", "cancer", "cancerous", "malignant", "positive",
                            "metastasis", "metastatic", "carcinoma", "aca", "adenocarcinoma", "lesion"})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a training run (the CLI maps its options onto this)."""

    arch: str
    size: int | None = None  # None: the architecture's fixed size, the pretrained model's, or the images'
    label_column: str = "label"
    split_column: str | None = "split"
    require_split_column: bool = False
    group_column: str | None = None
    positive: str | None = None
    valid_fraction: float = 0.15
    carve_valid: bool = False  # ignore the dataset's valid split (keep it held out) and carve from train
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float | None = None  # None: 1e-3 for adam/adamw, 0.01 for sgd
    weight_decay: float | None = None  # None: 0.05 adamw, 0 adam, 1e-4 sgd
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weights: bool = True
    drop_rate: float = 0.0
    patience: int = 8  # epochs without improvement before stopping; 0 disables early stopping
    monitor: str = "auto"  # auto: AUC for binary, balanced accuracy otherwise
    pretrained: str | None = None
    freeze_backbone: bool = False
    frozen_epochs: int = 2
    seed: int = 0
    mpp: float | None = None
    stain_method: str = "none"
    stain_target: str | None = None
    threshold_rule: str = DEFAULT_THRESHOLD_RULE
    flips: bool = True
    hed_jitter: float = 0.05
    color_jitter: float = 0.1
    workers: int = 2
    cache_limit_mb: float = 4096.0
    compile: bool = False
    overwrite: bool = False
    restart: bool = False  # ignore a checkpoint of an interrupted run in the output folder
    #: training recipe (see wsi_screen.training.recipes): "default", "small", or "auto" (chosen from the data)
    recipe: str = "default"
    #: fields set explicitly (a recipe never changes them)
    overrides: tuple[str, ...] = ()
    #: K-fold cross-validation (see wsi_screen.training.cross_validation); 1: one validation split; 0: auto
    folds: int = 1
    #: train only a head on this frozen encoder's embeddings (see wsi_screen.training.heads); ``arch`` is then unused
    encoder: str | None = None
    #: a local weights file for ``encoder`` (a timm architecture or registry name)
    encoder_weights: str | None = None
    #: the head on the encoder: linear or mlp
    head: str = "linear"
    #: where dataset embeddings are cached (None: wsi_screen.training.embeddings.default_cache_dir())
    embedding_cache: str | None = None
    #: where to train: auto (a CUDA GPU where present, else the CPU), cpu, cuda, cuda:N or mps
    device: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.monitor not in MONITORS:
            problems.append(f"monitor {self.monitor!r} is not one of {', '.join(MONITORS)}")
        if self.stain_method not in STAIN_METHODS:
            problems.append(f"stain {self.stain_method!r} is not one of {', '.join(STAIN_METHODS)}")
        if self.stain_method == "none" and self.stain_target:
            problems.append("a stain target needs a stain method (--stain)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.size is not None and self.size < 8:
            problems.append(f"size {self.size} is too small (at least 8 px)")
        fixed = fixed_input_size(self.arch)
        if self.size is not None and fixed is not None and self.size != fixed:
            problems.append(f"{self.arch} takes {fixed}x{fixed} px input; use --size {fixed} (images are resized)")
        if self.lr is not None and not self.lr > 0:
            problems.append("lr must be positive")
        if self.mpp is not None and not self.mpp > 0:
            problems.append("mpp must be positive")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.drop_rate < 1:
            problems.append("label smoothing and drop rate must be in [0, 1)")
        if self.patience < 0 or self.frozen_epochs < 0 or self.workers < 0 or self.folds < 0:
            problems.append("patience, frozen epochs, workers and folds cannot be negative")

        if self.encoder is not None:
            if self.head not in ("linear", "mlp"):
                problems.append(f"head {self.head!r} is not one of linear, mlp")
            if self.pretrained or self.freeze_backbone:
                problems.append("--pretrained and --freeze-backbone train a whole network; with --encoder only the "
                                "head trains (the encoder stays frozen)")
            if self.folds > 1:
                problems.append("a head on --encoder trains on one validation split (--folds 1)")
        elif self.encoder_weights is not None:
            problems.append("--weights needs --encoder (the architecture the file is for)")
        elif not self.arch:
            problems.append("give --arch (a network to train) or --encoder (a frozen encoder to train a head on)")
        if problems:
            raise ConfigError("; ".join(problems))
        ThresholdRule.parse(self.threshold_rule)
        parse_device_name(self.device)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]


@dataclass
class PreparedData:
    """A dataset read, split and decoded for training (shared by the trials of a search)."""

    folder: PatchFolder
    split: Split
    classes: list[str]
    positive: str | None
    size: int
    mpp: float | None
    train: BatchSource
    valid: BatchSource
    valid_targets: np.ndarray
    data_fingerprint: str
    image_sizes: dict[str, int]


@dataclass
class TrainResult:
    """What a training run produced."""

    model_dir: Path
    spec: ModelSpec
    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float
    stopped_early: bool
    seconds: float
    pretrained: dict[str, Any] | None = field(default=None)


# --- preparing the data ----------------------------------------------------------------------------------
def resolve_positive(classes: list[str], positive: str | None) -> str | None:
    """The positive (disease) class: the one given, else for two classes the one whose name says so."""
    if positive is not None:
        if positive not in classes:
            raise ConfigError(f"--positive {positive!r} is not one of the classes ({', '.join(classes)})")
        return positive
    if len(classes) != 2:
        return None
    matches = [c for c in classes if set(re.split(r"[^a-z0-9]+", c.lower())) & POSITIVE_CLASS_WORDS]
    if len(matches) != 1:
        raise ConfigError(f"cannot tell which class is positive; pass --positive (one of "
                          f"{', '.join(classes)})")
    log.info("positive class: %s (from its name; --positive chooses another)", matches[0])
    return matches[0]


def _pretrained_spec(path: str | None) -> ModelSpec | None:
    if path is None:
        return None
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if (folder / CONFIG_NAME).exists() and (p.is_dir() or p.suffix == ".safetensors"):
        return ModelSpec.read(folder)
    return None


def resolve_size(config: TrainConfig, folder: PatchFolder, rows: np.ndarray,
                  pretrained: ModelSpec | None) -> tuple[int, Counter[tuple[int, int]]]:
    fixed = fixed_input_size(config.arch)
    sizes = image_sizes(folder, rows)
    if config.size is not None:
        return config.size, sizes
    if fixed is not None:
        return fixed, sizes
    if pretrained is not None:
        return pretrained.input_size, sizes
    (w, h), _ = sizes.most_common(1)[0]
    if w != h:
        raise ConfigError(f"{folder.root}: images are {w}x{h} px, not square; pass --size")
    return w, sizes


def read_split(dataset: str | Path, config: TrainConfig) -> tuple[PatchFolder, Split, list[str], str | None]:
    """Read and validate the dataset and split it: (folder, split, classes, positive class)."""
    folder = open_patch_folder(dataset, label_column=config.label_column, split_column=config.split_column,
                               group_column=config.group_column,
                               require_split_column=config.require_split_column)
    split = make_split(folder, valid_fraction=config.valid_fraction, seed=config.seed,
                       carve_valid=config.carve_valid)
    log.info("%s: %s", folder.root, split.description)
    train_labels = {folder.labels[i] for i in split.train}
    stray = sorted({folder.labels[i] for i in split.valid} - train_labels)
    if stray:
        raise DatasetError(f"{folder.describe()}: labels {', '.join(stray)} occur in valid but not in train")
    classes = sorted(train_labels)
    if len(classes) < 2:
        raise DatasetError(f"{folder.describe()}: training rows hold a single class ({classes[0]})")
    return folder, split, classes, resolve_positive(classes, config.positive)


def resolve_mpp(config: TrainConfig, folder: PatchFolder) -> float | None:
    """The training patches' mpp: --mpp, else the dataset's mpp column (a warning when they differ)."""
    mpp = config.mpp if config.mpp is not None else folder.mpp
    if config.mpp is not None and folder.mpp is not None \
            and not math.isclose(config.mpp, folder.mpp, rel_tol=0.05):
        log.warning("--mpp %.3g differs from the dataset's mpp column (%.3g); recording %.3g", config.mpp,
                    folder.mpp, config.mpp)
    if mpp is None:
        log.info("training patches have no recorded mpp; pass --mpp so the model can be applied to slides")
    return mpp


def log_resizing(sizes: Counter[tuple[int, int]], size: int, n: int) -> None:
    other = {s: k for s, k in sizes.items() if s != (size, size)}
    if other:
        log.info("resizing %d of %d images to %dx%d px (%s)", sum(other.values()), n, size, size,
                 ", ".join(f"{k} of {w}x{h}" for (w, h), k in sorted(other.items())))


def prepare_data(dataset: str | Path, config: TrainConfig) -> PreparedData:
    """Read, validate and split the dataset and decode train + valid at the input size (never test)."""
    check_arch(config.arch)
    folder, split, classes, positive = read_split(dataset, config)
    pretrained = _pretrained_spec(config.pretrained)
    rows = np.concatenate([split.train, split.valid])
    size, sizes = resolve_size(config, folder, rows, pretrained)
    log_resizing(sizes, size, len(rows))
    mpp = resolve_mpp(config, folder)
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
        log.info("%d images exceed --cache-limit (%.0f MB): streaming from disk", len(rows),
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


# --- the model -------------------------------------------------------------------------------------------
def _accepts(model: nn.Module, size: int) -> bool:
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError):
        return False
    return True


def build_model(arch: str, num_classes: int, size: int,
                drop_rate: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model for ``size`` px input and the keywords that rebuild it (``ModelSpec.model_kwargs``)."""
    kwargs: dict[str, Any] = {"drop_rate": drop_rate} if drop_rate else {}
    model = create_model(arch, num_classes, **kwargs)
    if not _accepts(model, size):  # e.g. a vision transformer built for another size
        try:
            model = create_model(arch, num_classes, img_size=size, **kwargs)
            fits = _accepts(model, size)
        except ModelError:
            fits = False
        if not fits:
            raise ConfigError(f"{arch} cannot take {size}x{size} px input; choose another --size")
        kwargs["img_size"] = size
    return model, kwargs


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases and norm weights
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.resolved_weight_decay)
    lr = config.resolved_lr
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR schedule: linear warm-up then cosine decay to 1 %, one-cycle, or constant."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.resolved_lr, total_steps=total)
    warm = min(total - 1, round(config.warmup_epochs * steps_per_epoch)) if config.epochs > 1 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress_ = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(targets, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


# --- the loop --------------------------------------------------------------------------------------------
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy",
                   "valid_balanced_accuracy", "valid_auc", "monitor", "seconds", "best")


def _predict(model: nn.Module, source: BatchSource, mean: torch.Tensor, std: torch.Tensor,
             batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for xb, _ in source.batches(batch_size):
            x = normalise(to_unit_float(xb.to(mean.device, non_blocking=True)), mean, std)
            out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _set_frozen(model: nn.Module, head: set[str], frozen: bool) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name in head)


def _mean_std(model: nn.Module, report: PretrainedReport | None) -> tuple[tuple[float, float, float],
                                                                           tuple[float, float, float]]:
    """Normalisation: the pretrained model's own, else the architecture's default (timm's config)."""
    if report is not None and report.spec is not None:
        return report.spec.mean, report.spec.std
    return default_mean_std(model)


@dataclass
class _Best:
    score: float = -math.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


@dataclass
class _Amp:
    """Mixed precision of a training step: nothing on a CPU (float32); autocast on a GPU, with a gradient scaler
    for float16."""

    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> _Amp:
        dtype = training_dtype(device)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        return cls(device, dtype, scaler)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


@dataclass
class _Loop:
    """The moving parts of one training run."""

    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    augment: BatchAugment
    generator: torch.Generator
    mean: torch.Tensor
    std: torch.Tensor
    head: set[str]
    head_module: nn.Module
    amp: _Amp

    def train_epoch(self, data: PreparedData, config: TrainConfig, epoch: int) -> tuple[float, float]:
        """One pass over the training rows in a seeded order; returns (mean loss, accuracy)."""
        frozen = config.freeze_backbone and epoch <= config.frozen_epochs
        _set_frozen(self.model, self.head, frozen)
        self.model.train()
        if frozen:  # frozen backbone: batch-norm statistics stay as loaded
            self.model.eval()
            self.head_module.train()
        order = torch.randperm(len(data.train), generator=self.generator)
        drop_last = len(data.train) > config.batch_size
        steps = max(1, len(data.train) // config.batch_size)
        losses, correct, seen = 0.0, 0, 0
        batches = data.train.batches(config.batch_size, order=order, drop_last=drop_last)
        for xb, yb in progress.bar(batches, total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                                   leave=False):
            xb, yb = xb.to(self.amp.device, non_blocking=True), yb.to(self.amp.device, non_blocking=True)
            x = normalise(self.augment(xb), self.mean, self.std)  # float32, outside autocast
            with self.amp.autocast():
                logits = self.forward(x)
                loss = self.criterion(logits, yb)
            self.optimizer.zero_grad(set_to_none=True)
            self.amp.step(loss, self.optimizer)
            self.schedule.step()
            losses += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        return losses / max(1, seen), correct / max(1, seen)

    def validate(self, data: PreparedData, pos_index: int | None) -> tuple[np.ndarray, dict[str, Any]]:
        """Validation probabilities and metrics (arg-max decisions, plus the loss)."""
        probs = _predict(self.forward, data.valid, self.mean, self.std)
        metrics = compute_metrics(data.valid_targets, probs, data.classes, positive_index=pos_index)
        metrics["loss"] = float(nn.functional.nll_loss(torch.from_numpy(np.log(probs.clip(1e-7))),
                                                       torch.from_numpy(data.valid_targets)))
        return probs, metrics


def _make_loop(data: PreparedData,
               config: TrainConfig) -> tuple[_Loop, dict[str, Any], PretrainedReport | None]:
    """Model (+ local pretrained weights), optimiser, schedule, loss and augmentation for a run."""
    num_classes = len(data.classes)
    model, model_kwargs = build_model(config.arch, num_classes, data.size, config.drop_rate)
    report = load_pretrained(model, config.pretrained) if config.pretrained else None
    if config.freeze_backbone and not config.pretrained:
        log.warning("--freeze-backbone without --pretrained freezes random features")
    mean, std = _mean_std(model, report)
    device = resolve_device(config.device)
    model = model.to(device).to(memory_format=torch.channels_last)
    forward: nn.Module = torch.compile(model) if config.compile else model  # type: ignore[assignment]
    optimizer = make_optimizer(model, config)
    weights = _class_weights(data.train.targets, num_classes).to(device) if config.class_weights else None
    get_classifier = getattr(model, "get_classifier")  # noqa: B009 - timm API, checked by registry
    loop = _Loop(
        model=model, forward=forward, optimizer=optimizer,
        schedule=make_schedule(optimizer, config, max(1, len(data.train) // config.batch_size)),
        criterion=nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing),
        augment=BatchAugment(flips=config.flips, hed=config.hed_jitter, color=config.color_jitter),
        generator=torch.Generator().manual_seed(config.seed),
        mean=torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
        std=torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device),
        head=classifier_parameter_names(model), head_module=get_classifier(), amp=_Amp.for_device(device))
    loop.augment.generator = loop.generator
    return loop, {"model_kwargs": model_kwargs, "mean": mean, "std": std}, report


def fit(data: PreparedData, config: TrainConfig, out_dir: str | Path) -> TrainResult:
    """Train on ``data.train``, choose on ``data.valid``, and write the model folder ``out_dir``.

    After every epoch the whole state is checkpointed in ``out_dir/checkpoint`` (see
    :mod:`wsi_screen.training.checkpoint`); a rerun with the same settings resumes after the last finished epoch
    unless ``config.restart``. ``config.json`` is written last and marks a complete folder.
    """
    if config.folds > 1:
        from wsi_screen.training.cross_validation import fit_folds

        return fit_folds(data, config, out_dir)
    out = Path(out_dir)
    complete = (out / CONFIG_NAME).exists()
    if complete and not config.overwrite:
        raise ConfigError(f"{out} already holds a model; pass --overwrite or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    if complete or config.restart:
        (out / CONFIG_NAME).unlink(missing_ok=True)  # the folder is incomplete until the new config is written
        train_checkpoint.remove(out)
    write_split_csv(out / "split.csv", data.folder, data.split)
    started = time.perf_counter()
    pos_index = data.classes.index(data.positive) if data.positive is not None else None
    monitor = config.monitor if config.monitor != "auto" else "auc" if len(data.classes) == 2 \
        else "balanced_accuracy"
    best, history, stopped_early = _Best(), [], False
    fingerprint = train_checkpoint.run_fingerprint(asdict(config), data.data_fingerprint)
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout, without touching the caller's RNG
        torch.manual_seed(config.seed)
        loop, built, report = _make_loop(data, config)
        log.info("training %s (%s parameters) on %d images of %d px, validating on %d; up to %d epochs on %s",
                 config.arch, f"{count_parameters(loop.model):,}", len(data.train), data.size,
                 len(data.valid), config.epochs, _describe_device(loop.amp))
        stale, first = 0, 1
        resumed = train_checkpoint.load(out, fingerprint=fingerprint, model=loop.model, optimizer=loop.optimizer,
                                        schedule=loop.schedule, generator=loop.generator)
        if resumed is not None:
            best = _Best(score=resumed.best_score, epoch=resumed.best_epoch, state=resumed.best_state,
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
                probs, vm = loop.validate(data, pos_index)
                score = monitor_value(vm, monitor)
                if math.isnan(score):  # e.g. AUC of a single-class validation set
                    score = -vm["loss"]
                improved = score > best.score
                if improved:
                    best = _Best(score=score, epoch=epoch, probs=probs,
                                 state={k: v.detach().clone() for k, v in loop.model.state_dict().items()})
                stale = 0 if improved else stale + 1
                row = {"epoch": epoch, "lr": f"{loop.optimizer.param_groups[0]['lr']:.3g}",
                       "train_loss": f"{train_loss:.4f}", "train_accuracy": f"{train_acc:.4f}",
                       "valid_loss": f"{vm['loss']:.4f}", "valid_accuracy": _fmt(vm["accuracy"]),
                       "valid_balanced_accuracy": _fmt(vm["balanced_accuracy"]), "valid_auc": _fmt(vm["auc"]),
                       "monitor": f"{score:.4f}", "seconds": f"{time.perf_counter() - t0:.1f}",
                       "best": "*" if improved else ""}
                writer.writerow(row)
                hist_fh.flush()
                history.append(row)
                train_checkpoint.save(out, fingerprint=fingerprint, epoch=epoch, stale=stale, best_score=best.score,
                                      best_epoch=best.epoch, best_state=best.state, best_probs=best.probs,
                                      history=history, model=loop.model, optimizer=loop.optimizer,
                                      schedule=loop.schedule, generator=loop.generator)
                log.info("epoch %d/%d: train loss %s, valid loss %s, auc %s, bal. acc %s (%s s)%s", epoch,
                         config.epochs, row["train_loss"], row["valid_loss"], row["valid_auc"],
                         row["valid_balanced_accuracy"], row["seconds"], " *" if improved else "")
                if config.patience and stale >= config.patience and epoch < config.epochs:
                    stopped_early = True
                    log.info("no improvement in %s for %d epochs: stopping", monitor, config.patience)

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
                      train_config=_resolved(config, data, monitor, best.epoch, stopped_early, seconds, report))
    write_evaluation(out / "valid", metrics, [data.folder.paths[i] for i in data.split.valid],
                     data.valid_targets, best.probs)
    finish_model_folder(out, loop.model, data, spec, data.valid_targets, best.probs)
    train_checkpoint.remove(out)
    log.info("best epoch %d (%s %.4f); threshold %s; saved %s", best.epoch, monitor, best.score,
             "n/a" if threshold is None else f"{threshold:.4f}", out)
    return TrainResult(model_dir=out, spec=spec, history=history, best_epoch=best.epoch,
                       best_score=best.score, stopped_early=stopped_early, seconds=seconds,
                       pretrained=report.as_dict() if report else None)


def model_spec(config: TrainConfig, data: PreparedData, built: dict[str, Any], *, threshold: float | None,
               rule: ThresholdRule, metrics: dict[str, Any], split: dict[str, Any], class_targets: np.ndarray,
               train_config: dict[str, Any], ensemble: int = 1) -> ModelSpec:
    """The ``config.json`` of a trained model (one split or cross-validated: ``split`` says which)."""
    return ModelSpec(
        arch=config.arch, classes=list(data.classes), input_size=data.size, positive_class=data.positive,
        mpp=data.mpp, mean=built["mean"], std=built["std"], stain_method=config.stain_method,
        stain_target=config.stain_target, threshold=threshold,
        threshold_rule=str(rule) if data.positive is not None else "argmax",
        metrics={k: v for k, v in metrics.items() if k != "classes"}, data_fingerprint=data.data_fingerprint,
        data={"dataset": str(data.folder.root.resolve()), "layout": data.folder.layout,
              "label_column": data.folder.label_column, "group_column": data.folder.group_column,
              **split, "image_sizes": data.image_sizes,
              "train_class_counts": dict(Counter(data.classes[int(t)] for t in class_targets))},
        train_config=train_config, model_kwargs=built["model_kwargs"], package_version=__version__,
        ensemble=ensemble,
    )


def finish_model_folder(out: Path, model: nn.Module, domain_data: PreparedData, spec: ModelSpec,
                        targets: np.ndarray, probs: np.ndarray) -> None:
    """The domain distance (fitted on ``domain_data``), the card (validation AUC CI from ``targets`` and
    ``probs``) and, last, the weights and ``config.json``, which mark a complete model folder."""
    fit_domain(model, domain_data, spec).save(out)
    write_card(out, spec, auc_ci=_auc_ci(targets, probs, spec.positive_index))
    save_model(out, model, spec)


def _auc_ci(targets: np.ndarray, probs: np.ndarray, pos_index: int | None) -> tuple[float, float] | None:
    """95 % bootstrap interval of the validation AUC (binary models with both classes present)."""
    is_pos = np.asarray(targets) == pos_index
    if pos_index is None or is_pos.all() or not is_pos.any():
        return None
    from wsi_screen.metrics import bootstrap_auc

    _auc, lo, hi = bootstrap_auc(probs[:, pos_index], is_pos, seed=0)
    return lo, hi


def fit_domain(model: nn.Module, data: PreparedData, spec: ModelSpec) -> DomainModel:
    """The model's domain distance: fitted on the training split's features, threshold on the valid split's
    (see :mod:`wsi_screen.models.domain`); on the device ``model`` is on."""
    device = next(model.parameters()).device
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    train = collect_features(model, (xb for xb, _ in data.train.batches(256)), mean, std)
    valid = collect_features(model, (xb for xb, _ in data.valid.batches(256)), mean, std)
    domain = fit_domain_model(train, data.train.targets.numpy(), valid,
                              info={"dataset": data.folder.root.name})
    log.info("domain distance fitted on %d training images; threshold %.3f flags %.1f %% of valid", len(data.train),
             domain.threshold, 100 * domain.info["calibrated_on"]["flagged_fraction"])
    return domain


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _describe_device(amp: _Amp) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3), bf16 mixed precision`` for the log."""
    info = device_info(amp.device)
    where = str(amp.device) + (f" ({info['name']})" if "name" in info else "")
    return where if amp.dtype is None else f"{where}, {dtype_name(amp.dtype)} mixed precision"


def _resolved(config: TrainConfig, data: PreparedData, monitor: str, best_epoch: int, stopped_early: bool,
              seconds: float, report: PretrainedReport | None) -> dict[str, Any]:
    out = asdict(config)
    out.pop("restart", None)
    out["overrides"] = list(config.overrides)  # as JSON holds it
    out.update(size=data.size, lr=config.resolved_lr, weight_decay=config.resolved_weight_decay,
               monitor=monitor, best_epoch=best_epoch, stopped_early=stopped_early, seconds=round(seconds, 1),
               threads=torch.get_num_threads(), torch_version=torch.__version__,
               pretrained_report=report.as_dict() if report else None)
    device = resolve_device(config.device)
    out.update(device=device_info(device), mixed_precision=dtype_name(training_dtype(device)))
    import timm

    out["timm_version"] = timm.__version__
    return out


def for_data(config: TrainConfig, data: PreparedData) -> TrainConfig:
    """``config`` with its recipe and number of folds resolved for ``data`` (see wsi_screen.training.recipes and
    wsi_screen.training.cross_validation)."""
    from wsi_screen.training import recipes
    from wsi_screen.training.cross_validation import auto_folds

    n_pool = len(data.train) + len(data.valid)
    config = recipes.apply(config, len(data.train))
    if config.folds == 0:
        pool_labels = np.concatenate([data.train.targets.numpy(), data.valid_targets])
        config = replace(config, folds=auto_folds(n_pool, pool_labels))
    log.info("recipe %s; %s", config.recipe,
             f"{config.folds}-fold cross-validation over all {n_pool} train and valid images (in place of the "
             "split above)" if config.folds > 1 else
             "one validation split")
    return config


def train(dataset: str | Path, out_dir: str | Path, config: TrainConfig) -> TrainResult:
    """Train ``config.arch`` on a dataset folder and write the model folder (see the module docstring); with
    ``config.encoder``, a head on that encoder's embeddings (:mod:`wsi_screen.training.heads`)."""
    out = Path(out_dir)
    if (out / CONFIG_NAME).exists() and not config.overwrite:
        raise ConfigError(f"{out} already holds a model; pass --overwrite or choose another output folder")
    if config.encoder is not None:
        from wsi_screen.training.heads import train_head

        return train_head(dataset, out, config)
    data = prepare_data(dataset, config)
    return fit(data, for_data(config, data), out)
