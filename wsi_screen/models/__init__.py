"""Models: a registry over timm plus ``screen_cnn32``, the ModelSpec contract and safe checkpoint I/O.

``wsi_screen.load_model(path_or_name=None)`` loads a model folder (or the bundled default) as a
:class:`PatchClassifier`.

Importing this package registers ``screen_cnn32`` in timm's registry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_screen.errors import ModelError, check_type, speaks_api
from wsi_screen.models.checkpoint import (
    PretrainedReport,
    load_pretrained,
    load_state_strict,
    read_weights,
    resolve_model_dir,
    save_model,
)
from wsi_screen.models.classifier import PatchClassifier
from wsi_screen.models.device import resolve_device
from wsi_screen.models.domain import DomainModel
from wsi_screen.models.pixels import resize_uint8
from wsi_screen.models.registry import (
    ArchInfo,
    arch_info,
    check_arch,
    count_parameters,
    create_model,
    list_models,
)
from wsi_screen.models.spec import CONFIG_NAME, WEIGHTS_NAME, ModelSpec

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ArchInfo",
    "DomainModel",
    "ModelSpec",
    "PatchClassifier",
    "PretrainedReport",
    "arch_info",
    "build_module",
    "check_arch",
    "count_parameters",
    "create_model",
    "default_model_dir",
    "list_models",
    "load_model",
    "load_pretrained",
    "resize_uint8",
    "save_model",
]

log = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """Where the bundled default model lives: ``wsi_screen/resources/models/default/``."""
    return Path(__file__).resolve().parents[1] / "resources" / "models" / "default"


def build_module(spec: ModelSpec, **kwargs: Any) -> nn.Module:
    """The architecture named by ``spec``, randomly initialised, with its output size and model kwargs (an
    :class:`~wsi_screen.models.ensemble.Ensemble` of ``spec.ensemble`` of them for a cross-validated
    model)."""
    def one() -> nn.Module:
        return create_model(spec.arch, num_classes=spec.num_classes, **{**spec.model_kwargs, **kwargs})

    if spec.ensemble > 1:
        from wsi_screen.models.ensemble import Ensemble

        return Ensemble([one() for _ in range(spec.ensemble)])
    return one()


#: the names :func:`load_model` knows besides folders (the bundled models under ``wsi_screen/resources/models``)
BUNDLED = ("default",)


@speaks_api
def load_model(path_or_name: str | os.PathLike[str] | None = None, *,
               device: str | torch.device = "cpu", precision: str = "auto") -> PatchClassifier:
    """Load a model folder (``config.json`` + ``model.safetensors``) as a :class:`PatchClassifier`.

    Parameters
    ----------
    path_or_name
        ``None`` or ``"default"``: the bundled default model; else the folder written by
        ``wsi-screen train``, its ``config.json`` or its ``model.safetensors``. Nothing is unpickled:
        pickle-based files raise :class:`~wsi_screen.errors.UnsafeFileError`. A head model (a head trained on
        a frozen encoder) loads its encoder by the reference in its config (:mod:`wsi_screen.models.head`).
    device
        Where the model runs: ``"cpu"`` (the default), ``"auto"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a
        :class:`torch.device` (see :func:`wsi_screen.models.device.resolve_device`; an absent one raises
        :class:`~wsi_screen.errors.DeviceError` before any file is read).
    precision
        ``"auto"`` (bfloat16 where the device computes it natively, else float32), ``"fp32"`` or ``"bf16"``
        (see :mod:`wsi_screen.models.precision`).

    Returns
    -------
    PatchClassifier
        ``predict(images)`` (uint8 (N, H, W, 3) -> (N, classes) probabilities), its ``spec`` (classes, mpp,
        input size, stain, threshold), its ``domain`` model and the folder it came from (``model_dir``).

    Examples
    --------
    >>> import numpy as np, wsi_screen
    >>> model = wsi_screen.load_model()
    >>> model.spec.classes, model.spec.mpp, model.spec.input_size
    (['normal', 'tumour'], 0.972, 96)
    >>> model.predict(np.full((2, 96, 96, 3), 255, np.uint8)).shape
    (2, 2)
    """
    check_type(path_or_name, (str, os.PathLike, type(None)), "path_or_name",
                    "a model folder (or its config.json), a model name or None")
    torch_device = resolve_device(device)  # an absent device is one line before any file is read
    path = path_or_name
    if path is None or (str(path) in BUNDLED and not Path(path).exists()):
        path = default_model_dir()
        if not (path / CONFIG_NAME).exists():
            raise ModelError(f"the bundled default model is missing ({path}); set `model` to a model folder (a "
                             "folder from `wsi-screen train`) or train one into that folder")
    model_dir = resolve_model_dir(Path(path))
    spec = ModelSpec.read(model_dir)
    module: nn.Module
    if spec.encoder is not None:  # a head on a frozen encoder (see wsi_screen.models.head)
        from wsi_screen.models.head import load_head_classifier

        module = load_head_classifier(spec, model_dir / WEIGHTS_NAME, str(model_dir))
    else:
        check_arch(spec.arch)
        module = build_module(spec)
        load_state_strict(module, read_weights(model_dir / WEIGHTS_NAME), str(model_dir))
    log.debug("loaded %s from %s", spec.arch, model_dir)
    classifier = PatchClassifier(module, spec, device=torch_device, domain=DomainModel.load(model_dir),
                                 precision=precision)
    classifier.model_dir = model_dir
    return classifier
