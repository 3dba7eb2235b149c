"""The training loop's parts, shared by one-split training (:mod:`wsi_screen.training.train`) and
cross-validation (:mod:`wsi_screen.training.cross_validation`): the model, optimiser and schedule
(:func:`make_loop`), one epoch and one validation (:class:`Loop`), the best epoch so far (:class:`Best`), the
``config.json`` of a trained model (:func:`model_spec`), what completes a model folder
(:func:`finish_model_folder`) and the guard against overwriting one (:func:`refuse_existing_model`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_screen import __version__, progress
from wsi_screen.errors import ConfigError, ModelError, TrainingDivergedError
from wsi_screen.metrics import ThresholdRule, compute_metrics, monitor_value
from wsi_screen.models import CONFIG_NAME, ModelSpec, PretrainedReport, create_model, load_pretrained, save_model
from wsi_screen.models.card import write_card
from wsi_screen.models.device import device_info, resolve_device
from wsi_screen.models.domain import DomainModel, collect_features
from wsi_screen.models.domain import fit as fit_domain_model
from wsi_screen.models.pixels import normalise, to_unit_float
from wsi_screen.models.precision import dtype_name, training_dtype
from wsi_screen.models.registry import classifier_parameter_names, default_mean_std
from wsi_screen.training.augment import BatchAugment
from wsi_screen.training.config import PreparedData, TrainConfig
from wsi_screen.training.data import BatchSource

log = logging.getLogger(__name__)


def refuse_existing_model(out: Path, config: TrainConfig) -> None:
    """A folder that holds a finished model is replaced only with ``overwrite``."""
    if (out / CONFIG_NAME).exists() and not config.overwrite:
        raise ConfigError(f"{out} already holds a model; set `overwrite` or choose another output folder")


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
            raise ConfigError(f"{arch} cannot take {size}x{size} px input; choose another `size`")
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
class Best:
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
class Loop:
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
    #: what the progress bar calls this run before its epoch (``fold 2/5`` in cross-validation)
    name: str = ""

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
        # summed on the device and read once per epoch: a per-step read would make the CPU wait for the GPU
        losses = torch.zeros((), dtype=torch.float64, device=self.amp.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.amp.device)
        seen = 0
        batches = data.train.batches(config.batch_size, order=order, drop_last=drop_last)
        desc = f"{self.name} epoch {epoch}/{config.epochs}".lstrip()
        for xb, yb in progress.bar(batches, total=steps, desc=desc, unit="batch", leave=False):
            xb, yb = xb.to(self.amp.device, non_blocking=True), yb.to(self.amp.device, non_blocking=True)
            x = normalise(self.augment(xb), self.mean, self.std)  # float32, outside autocast
            with self.amp.autocast():
                logits = self.forward(x)
                loss = self.criterion(logits, yb)
            self.optimizer.zero_grad(set_to_none=True)
            self.amp.step(loss, self.optimizer)
            self.schedule.step()
            losses += loss.detach().double() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
        return float(losses) / max(1, seen), int(correct) / max(1, seen)

    def validate(self, data: PreparedData, pos_index: int | None, *, epoch: int,
                 train_loss: float) -> tuple[np.ndarray, dict[str, Any]]:
        """Validation probabilities and metrics (arg-max decisions, plus the loss) after ``epoch``, whose training
        loss was ``train_loss``; :func:`check_finite` stops a run that diverged."""
        probs = _predict(self.forward, data.valid, self.mean, self.std)
        check_finite(epoch, train_loss, probs)
        metrics = compute_metrics(data.valid_targets, probs, data.classes, positive_index=pos_index)
        metrics["loss"] = float(nn.functional.nll_loss(torch.from_numpy(np.log(probs.clip(1e-7))),
                                                       torch.from_numpy(data.valid_targets)))
        return probs, metrics


def check_finite(epoch: int, train_loss: float, probs: np.ndarray) -> None:
    """Stop a training that diverged (a learning rate too high): a training loss or validation probabilities that
    are not finite numbers end it with :class:`TrainingDivergedError`, before they reach the metrics."""
    if math.isfinite(train_loss) and np.isfinite(probs).all():
        return
    what = f"train loss {train_loss:.4g}" if not math.isfinite(train_loss) else "validation scores not finite"
    raise TrainingDivergedError(f"training diverged at epoch {epoch} ({what}); lower `lr`")


def _place(data: PreparedData, device: torch.device) -> None:
    """On a CUDA GPU: cuDNN times its kernels for the one input size, and images decoded into memory move to the
    GPU once when they take under a quarter of its free memory (every batch is then cut there, with no copy per
    step). Nothing changes on a CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    size = data.train.nbytes + data.valid.nbytes
    free, _total = torch.cuda.mem_get_info(device)
    if 0 < size < free / 4:
        data.train.to(device)
        data.valid.to(device)
        log.info("%.0f MB of decoded images moved to %s", size / 2**20, device)


def make_loop(data: PreparedData,
               config: TrainConfig) -> tuple[Loop, dict[str, Any], PretrainedReport | None]:
    """Model (+ local pretrained weights), optimiser, schedule, loss and augmentation for a run."""
    num_classes = len(data.classes)
    model, model_kwargs = build_model(config.arch, num_classes, data.size, config.drop_rate)
    report = load_pretrained(model, config.pretrained, classes=data.classes) if config.pretrained else None
    if config.freeze_backbone and not config.pretrained:
        log.warning("`freeze_backbone` without `pretrained` freezes random features")
    mean, std = _mean_std(model, report)
    device = resolve_device(config.device)
    _place(data, device)
    model = model.to(device).to(memory_format=torch.channels_last)
    forward: nn.Module = torch.compile(model) if config.compile else model  # type: ignore[assignment]
    optimizer = make_optimizer(model, config)
    weights = _class_weights(data.train.targets, num_classes).to(device) if config.class_weights else None
    get_classifier = getattr(model, "get_classifier")  # noqa: B009 - timm API, checked by registry
    loop = Loop(
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
                        targets: np.ndarray, probs: np.ndarray, *, domain_calibrated_on: str = "valid") -> None:
    """The domain distance (fitted on ``domain_data``; its threshold set on ``domain_data.valid``, which holds the
    split ``domain_calibrated_on`` names), the card (validation AUC CI from ``targets`` and ``probs``) and, last,
    the weights and ``config.json``, which mark a complete model folder."""
    fit_domain(model, domain_data, spec, calibrated_on=domain_calibrated_on).save(out)
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


def fit_domain(model: nn.Module, data: PreparedData, spec: ModelSpec, *, calibrated_on: str = "valid") -> DomainModel:
    """The model's domain distance: fitted on the training split's features, threshold on ``data.valid``'s (the
    split ``calibrated_on`` names; see :mod:`wsi_screen.models.domain`); on the device ``model`` is on."""
    device = next(model.parameters()).device
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    train = collect_features(model, (xb for xb, _ in data.train.batches(256)), mean, std)
    valid = collect_features(model, (xb for xb, _ in data.valid.batches(256)), mean, std)
    domain = fit_domain_model(train, data.train.targets.numpy(), valid,
                              info={"dataset": data.folder.root.name}, calibrated_on=calibrated_on)
    on = "valid" if calibrated_on == "valid" else f"the {calibrated_on} images, set on them (no unseen split)"
    log.info("domain distance fitted on %d training images; threshold %.3f flags %.1f %% of %s", len(data.train),
             domain.threshold, 100 * domain.info["calibrated_on"]["flagged_fraction"], on)
    return domain


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def n_epochs(n: int) -> str:
    """``n`` epochs in words: "1 epoch", "20 epochs"."""
    return f"{n} epoch" + ("" if n == 1 else "s")


def epoch_score(metrics: dict[str, Any], monitor: str) -> float:
    """The monitored validation figure; minus the loss where it is undefined (AUC of a one-class split)."""
    score = monitor_value(metrics, monitor)
    return -float(metrics["loss"]) if math.isnan(score) else score


def score_words(metrics: dict[str, Any], monitor: str, score: float) -> str:
    """The chosen epoch's :func:`epoch_score` named for what it is: ``auc 0.9123``, or ``valid loss 0.5319`` where
    the monitor is the loss or was undefined (``auc`` with one class in validation), so minus the loss stood in."""
    if monitor != "loss" and not math.isnan(monitor_value(metrics, monitor)):
        return f"{monitor} {score:.4f}"
    undefined = "" if monitor == "loss" else f"; {monitor} undefined on this validation split"
    return f"valid loss {-score:.4f}{undefined}"


def history_row(epoch: int, lr: float, train_loss: float, train_accuracy: float, metrics: dict[str, Any],
                score: float, seconds: float, improved: bool) -> dict[str, Any]:
    """One row of history.csv (the columns of ``HISTORY_COLUMNS``), for whole-network and head training alike."""
    return {"epoch": epoch, "lr": f"{lr:.3g}", "train_loss": f"{train_loss:.4f}",
            "train_accuracy": f"{train_accuracy:.4f}", "valid_loss": f"{metrics['loss']:.4f}",
            "valid_accuracy": fmt(metrics["accuracy"]), "valid_balanced_accuracy": fmt(metrics["balanced_accuracy"]),
            "valid_auc": fmt(metrics["auc"]), "monitor": f"{score:.4f}", "seconds": f"{seconds:.1f}",
            "best": "*" if improved else ""}


def describe_device(amp: _Amp) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3), bf16 mixed precision`` for the log."""
    info = device_info(amp.device)
    where = str(amp.device) + (f" ({info['name']})" if "name" in info else "")
    return where if amp.dtype is None else f"{where}, {dtype_name(amp.dtype)} mixed precision"


def resolved_config(config: TrainConfig, data: PreparedData, monitor: str, best_epoch: int, stopped_early: bool,
              seconds: float, report: PretrainedReport | None) -> dict[str, Any]:
    out = config.applied()
    out.update(size=data.size, lr=config.resolved_lr, weight_decay=config.resolved_weight_decay,
               monitor=monitor, best_epoch=best_epoch, stopped_early=stopped_early, seconds=round(seconds, 1),
               pretrained_report=report.as_dict() if report else None)
    device = resolve_device(config.device)
    out.update(run_environment(device, dtype_name(training_dtype(device))))
    return out


def run_environment(device: torch.device, arithmetic: str) -> dict[str, Any]:
    """What a model's numbers depend on besides its settings, recorded in ``train_config`` by whole-network and
    head training alike: the thread count, torch and timm versions, the device and the arithmetic (``fp32``,
    ``bf16`` or ``fp16``: a whole network's training, a head's embeddings)."""
    import timm

    return {"threads": torch.get_num_threads(), "torch_version": torch.__version__, "timm_version": timm.__version__,
            "device": device_info(device), "mixed_precision": arithmetic}
