"""A small registry over timm: every timm architecture by name, plus the project's own (``screen_cnn32``).

Nothing is ever downloaded: :func:`create_model` always builds with ``pretrained=False``; weights come from
training here or from a local file (:func:`wsi_screen.models.checkpoint.load_pretrained`).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from wsi_screen.errors import ModelError, UnknownModelError, check_whole, speaks_api
from wsi_screen.models import screen_cnn

#: the project's own architectures (registered in timm by importing their modules)
OWN_MODELS = ("screen_cnn32",)

#: architectures `wsi-screen models` lists by default: small enough for a CPU, or named in the issue
SUGGESTED = ("screen_cnn32", "resnet10t", "resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_small_100",
             "convnext_atto", "densenet121", "inception_v3", "vgg16")


@dataclass(frozen=True)
class ArchInfo:
    """An architecture as ``wsi-screen models`` lists it."""

    name: str
    params: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # "wsi-screen" or "timm"


def list_models(pattern: str = "") -> list[str]:
    """Registered architecture names (timm's and ours), optionally filtered by a glob pattern."""
    names = sorted(set(timm.list_models()) | set(OWN_MODELS))
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def check_arch(name: str) -> str:
    """Return ``name`` if it is a registered architecture, else raise with the closest matches."""
    if name in OWN_MODELS or timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `list_models` lists them"
    raise UnknownModelError(f"unknown architecture {name!r}{hint}")


@speaks_api
def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build an architecture with random weights (never downloads), for training your own model.

    Parameters
    ----------
    name
        A timm architecture or the project's own ``screen_cnn32`` (``wsi-screen models`` lists them).
    num_classes
        Outputs of the classifier head, a whole number >= 1 (:class:`~wsi_screen.errors.ConfigError` otherwise).
    **kwargs
        Passed to ``timm.create_model``.

    Raises
    ------
    UnknownModelError
        An unknown architecture (the message names the closest ones).

    Examples
    --------
    >>> import torch, wsi_screen
    >>> net = wsi_screen.create_model("screen_cnn32", num_classes=2)
    >>> tuple(net(torch.zeros(1, 3, 32, 32)).shape)   # 32 x 32 px inputs
    (1, 2)
    """
    check_arch(name)
    num_classes = check_whole(num_classes, "num_classes", at_least=1)
    if kwargs.pop("pretrained", False):
        raise ModelError("pretrained weights are never downloaded; give a local weights file as `pretrained` "
                         "instead")
    try:
        model: nn.Module = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ModelError(f"cannot build {name}: {exc}") from None
    return model


def default_cfg(model: nn.Module) -> dict[str, Any]:
    """timm's pretrained config of a built model (input size, mean, std, classifier name)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return dict(cfg)


Triple = tuple[float, float, float]


def default_mean_std(model: nn.Module) -> tuple[Triple, Triple]:
    """The architecture's normalisation mean and std (timm's config; ImageNet's if it has none)."""
    cfg = default_cfg(model)
    m = [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))]
    s = [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))]
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def default_input_size(model: nn.Module) -> int:
    """The architecture's native square input edge in pixels."""
    size = default_cfg(model).get("input_size", (3, 224, 224))
    return int(size[-1])


def fixed_input_size(name: str) -> int | None:
    """The only input size an architecture accepts, or None if it takes any reasonable size."""
    return screen_cnn.INPUT_SIZE if name == "screen_cnn32" else None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def arch_info(name: str, num_classes: int = 2) -> ArchInfo:
    """Parameter count and defaults of an architecture, built on the meta device (no memory, fast)."""
    check_arch(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes)
    mean, std = default_mean_std(model)
    return ArchInfo(name=name, params=count_parameters(model), input_size=default_input_size(model),
                    mean=mean, std=std, source="wsi-screen" if name in OWN_MODELS else "timm")


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the model's final classifier (the part replaced for a new class set)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise ModelError(f"{type(model).__name__} does not expose its classifier (get_classifier)")
    head = get()
    if isinstance(head, nn.Module):
        ids = {id(p) for p in head.parameters()}
    else:  # some timm models return a tuple of heads
        ids = {id(p) for h in head for p in h.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}
