"""What a training run takes and gives: :class:`TrainConfig` (the settings), :class:`PreparedData` (a dataset
read, split and decoded) and :class:`TrainResult`. Shared by :mod:`wsi_screen.training.train` (one validation
split), :mod:`wsi_screen.training.cross_validation` and :mod:`wsi_screen.training.loop`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen._device_name import parse_device_name
from wsi_screen.errors import ConfigError
from wsi_screen.metrics import DEFAULT_THRESHOLD_RULE, ThresholdRule
from wsi_screen.models.registry import fixed_input_size
from wsi_screen.models.spec import STAIN_METHODS, ModelSpec
from wsi_screen.slide.slide import PLAUSIBLE_MPP
from wsi_screen.training.data import BatchSource, PatchFolder, Split

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
MONITORS = ("auto", "auc", "balanced_accuracy", "accuracy", "loss")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adam": 0.0, "adamw": 0.05}
#: the numeric settings' ranges, checked in one place (TrainConfig, so the API, train and every value of a tune
#: search meet the same rule before anything trains): name -> (low, high or None, low open, high open)
RANGES: dict[str, tuple[float, float | None, bool, bool]] = {
    "valid_fraction": (0, 1, True, True), "epochs": (1, None, False, False), "batch_size": (1, None, False, False),
    "lr": (0, None, True, False), "weight_decay": (0, None, False, False), "momentum": (0, 1, False, True),
    "warmup_epochs": (0, None, False, False), "label_smoothing": (0, 1, False, True),
    "drop_rate": (0, 1, False, True), "patience": (0, None, False, False), "frozen_epochs": (0, None, False, False),
    "hed_jitter": (0, 1, False, False), "color_jitter": (0, 1, False, False), "workers": (0, None, False, False),
    "cache_limit_mb": (0, None, False, False), "folds": (0, None, False, False),
}
#: settings only a whole network uses (images augmented, decoded into memory or compiled, a backbone frozen): a
#: head on an ``encoder`` trains on fixed embeddings, so they are refused with one and recorded as null
NETWORK_ONLY = ("flips", "hed_jitter", "color_jitter", "frozen_epochs", "compile", "cache_limit_mb")
#: settings only a head on an ``encoder`` uses: refused without one and recorded as null
HEAD_ONLY = ("head", "embedding_cache")


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
    #: fields set explicitly (a recipe never changes them; a setting of :data:`NETWORK_ONLY` or :data:`HEAD_ONLY`
    #: named here is refused where it cannot apply, even at its default value)
    overrides: tuple[str, ...] = ()
    #: K-fold cross-validation (see wsi_screen.training.cross_validation); 1: one validation split; 0: auto
    folds: int = 1
    #: where to train: auto (a CUDA GPU where present, else the CPU), cpu, cuda, cuda:N or mps
    device: str = "auto"

    #: train only a head on this frozen encoder's embeddings (see wsi_screen.training.heads); ``arch`` is then empty
    encoder: str | None = None
    #: a local weights file for ``encoder`` (a timm architecture or registry name)
    encoder_weights: str | None = None
    #: the head on the encoder: linear or mlp
    head: str = "linear"
    #: where dataset embeddings are cached (None: wsi_screen.training.embeddings.default_cache_dir())
    embedding_cache: str | None = None

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
            problems.append("a stain target needs a stain method (`stain_method`)")
        problems += self._out_of_range()
        if self.size is not None and self.size < 8:
            problems.append(f"size {self.size} is too small (at least 8 px)")
        fixed = fixed_input_size(self.arch)
        if self.size is not None and fixed is not None and self.size != fixed:
            problems.append(f"{self.arch} takes {fixed}x{fixed} px input; use `size`={fixed} (images are resized)")
        if self.mpp is not None and not PLAUSIBLE_MPP[0] <= self.mpp <= PLAUSIBLE_MPP[1]:
            problems.append(f"`mpp` {self.mpp:g} (the training patches' um/px) is outside the plausible range "
                            f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px")

        if self.encoder is not None:
            if self.arch:
                problems.append("give `arch` (train a whole network) or `encoder` (train a head on a frozen encoder), "
                                "not both")
            if self.head not in ("linear", "mlp"):
                problems.append(f"head {self.head!r} is not one of linear, mlp")
            if self.pretrained or self.freeze_backbone:
                problems.append("`pretrained` and `freeze_backbone` train a whole network; with an `encoder` only the "
                                "head trains (the encoder stays frozen)")
            if self.folds > 1:
                problems.append("a head on an `encoder` trains on one validation split (`folds` 1)")
            if self.recipe == "small":
                problems.append("`recipe` small sets a whole network's training (Adam at 1e-3, 60 epochs); a head on "
                                "an `encoder` has its own defaults (lr 1e-4): set `lr`, `epochs` and the rest yourself")
            network = self._given(NETWORK_ONLY)
            if network:
                problems.append(f"{_settings(network)} only to a whole network (images augmented, decoded or "
                                "compiled, a backbone frozen); a head on an `encoder` trains on fixed embeddings")
        elif self.encoder_weights is not None:
            problems.append("`encoder_weights` is an `encoder`'s file (name the architecture it is for with "
                            "`encoder`); a whole network starts from local weights with `pretrained`")
        elif self._given(HEAD_ONLY):  # with or without `arch`: the setting given is what is wrong
            whole = f"; `arch` {self.arch} trains a whole network" if self.arch else ""
            problems.append(f"{_settings(self._given(HEAD_ONLY))} only to a head on an `encoder`{whole}")
        elif not self.arch:
            problems.append("set `arch` (a network to train) or `encoder` (a frozen encoder to train a head on)")
        if problems:
            raise ConfigError("; ".join(problems))
        ThresholdRule.parse(self.threshold_rule)
        parse_device_name(self.device)

    def _out_of_range(self) -> list[str]:
        """What :data:`RANGES` refuses: each numeric setting that is not a finite number in its range (NaN and
        infinity included, which slip through comparisons)."""
        problems = []
        for name, (low, high, low_open, high_open) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                      and (high is None or (value < high if high_open else value <= high)))
            if not inside:
                where = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}'}"
                where += "" if high is None else (")" if high_open else "]")
                problems.append(f"`{name}` must be a finite number in {where}, not {value!r}")
        return problems

    def _given(self, names: tuple[str, ...]) -> list[str]:
        """Those of ``names`` set explicitly (in ``overrides``) or away from their defaults."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        return [n for n in names if n in self.overrides or getattr(self, n) != defaults[n]]

    def applied(self) -> dict[str, Any]:
        """The settings as ``config.json`` records them (``train_config``): those that did not apply to this kind
        of training are null (:data:`NETWORK_ONLY`, the recipe and ``arch`` for a head, whose ``folds`` is 1: one
        validation split; :data:`HEAD_ONLY` for a whole network); ``restart`` is left out (how, not what, was
        trained)."""
        out = asdict(self)
        out.pop("restart", None)
        out["overrides"] = list(self.overrides)  # as JSON holds it
        if self.encoder is not None:  # `arch` too: a head's network is the encoder's (an older folder holds "")
            out.update(dict.fromkeys((*NETWORK_ONLY, "recipe", "arch")), folds=1)
        else:
            out.update(dict.fromkeys(HEAD_ONLY))
        return out

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]


def _settings(names: list[str]) -> str:
    """``names`` in backticks and the verb that follows: "`flips` applies", "`flips`, `compile` apply"."""
    return ", ".join(f"`{n}`" for n in names) + (" applies" if len(names) == 1 else " apply")


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
