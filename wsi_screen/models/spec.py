"""ModelSpec: the contract that travels with a model's weights (``config.json`` in a model folder).

A model folder holds ``model.safetensors`` (the state dict) and ``config.json`` (this spec). Everything a
consumer needs to apply the model correctly is here: the architecture, the class names and their order (the
order of the output columns), the positive class and its decision threshold, the input size, the resolution
(``mpp``) and stain normalisation of the training patches, and the normalisation mean/std. The rest is
provenance: validation metrics, the training data fingerprint, the resolved training configuration
(including the seed) and the package version.

This module is light (no torch): reading a model's contract does not load the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsi_screen.errors import ModelError

log = logging.getLogger(__name__)

#: version of the config.json layout; a newer one is refused
FORMAT_VERSION = 1

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

STAIN_METHODS = ("none", "macenko", "reinhard", "vahadane")


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _package_version() -> str:
    from wsi_screen import __version__

    return __version__


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a patch classifier expects and promises; serialised as ``config.json``.

    ``classes`` lists the class names in output order. ``threshold`` applies to the probability of
    ``positive_class`` (a patch is called positive when ``p >= threshold``); it is ``None`` only when the
    model has no positive class (a multi-class model used by arg-max). ``mean``/``std`` normalise RGB
    scaled to [0, 1].
    """

    arch: str
    classes: list[str]
    input_size: int
    positive_class: str | None = None
    mpp: float | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    stain_method: str = "none"
    stain_target: str | None = None
    threshold: float | None = None
    threshold_rule: str = ""
    # not in the repr (pages of numbers and settings; they are attributes, and in config.json)
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    data_fingerprint: str | None = field(default=None, repr=False)
    data: dict[str, Any] = field(default_factory=dict, repr=False)
    train_config: dict[str, Any] = field(default_factory=dict, repr=False)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: number of member models whose probabilities are averaged (K-fold cross-validated training delivers K)
    ensemble: int = 1
    #: a head model's encoder (its :class:`~wsi_screen.models.encoder.EncoderIdentity` as a dict), else None
    encoder: dict[str, Any] | None = None
    #: a head model's head (kind, dim, hidden; see :mod:`wsi_screen.models.head`), else None
    head: dict[str, Any] | None = None
    package_version: str = field(default_factory=_package_version)
    created: str = field(default_factory=_now)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ModelError(f"invalid model config: {'; '.join(problems)}")

    def _problems(self) -> list[str]:
        out: list[str] = []
        if not self.arch:
            out.append("arch is empty")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            out.append(f"classes must be at least two distinct names, got {self.classes}")
        if self.positive_class is not None and self.positive_class not in self.classes:
            out.append(f"positive_class {self.positive_class!r} is not one of {self.classes}")
        if self.positive_class is not None and self.threshold is None:
            out.append("a model with a positive class needs a threshold")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            out.append(f"threshold {self.threshold} is outside [0, 1]")
        if self.input_size < 1:
            out.append(f"input_size {self.input_size} must be positive")
        if not isinstance(self.ensemble, int) or self.ensemble < 1:
            out.append(f"ensemble {self.ensemble!r} must be a positive number of members")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            out.append(f"mpp {self.mpp} must be a positive number")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            out.append("mean and std must be three numbers each, std positive")
        if self.stain_method not in STAIN_METHODS:
            out.append(f"stain_method {self.stain_method!r} is not one of {', '.join(STAIN_METHODS)}")
        return out

    # --- derived ---------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def positive_index(self) -> int | None:
        """Column of the positive class in the model's output, or None."""
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    # --- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False, default=str) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> ModelSpec:
        """Build a spec from parsed JSON; ``source`` names the file in error messages."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{source}: expected a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelError(f"{source}: model config format {version} is newer than this wsi-screen "
                             f"understands ({FORMAT_VERSION}); upgrade wsi-screen")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            log.debug("%s: ignoring unknown config keys %s", source, ", ".join(unknown))
        missing = [n for n in ("arch", "classes", "input_size") if n not in data]
        if missing:
            raise ModelError(f"{source}: model config lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            kwargs["classes"] = [str(c) for c in kwargs["classes"]]
            kwargs["input_size"] = int(kwargs["input_size"])
            for key in ("mean", "std"):
                if key in kwargs:
                    kwargs[key] = tuple(float(v) for v in kwargs[key])
            for key in ("mpp", "threshold"):
                if kwargs.get(key) is not None:
                    kwargs[key] = float(kwargs[key])
            return cls(**kwargs)
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: malformed model config: {exc}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{source}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelSpec:
        """Read ``config.json`` from a model folder (without loading weights)."""
        path = Path(model_dir) / CONFIG_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if not Path(model_dir).exists():
                raise ModelError(f"{model_dir}: no such model folder") from None
            raise ModelError(f"{model_dir}: no {CONFIG_NAME}; not a wsi-screen model folder (an interrupted "
                             "training run leaves none)") from None
        except OSError as exc:
            raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls.from_json(text, source=str(path))

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)
