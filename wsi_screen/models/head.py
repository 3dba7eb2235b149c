"""Head models: a small classifier (linear or MLP) on a frozen encoder's embeddings.

A head model is a normal model folder: ``config.json`` (the :class:`~wsi_screen.models.spec.ModelSpec`, whose
``encoder`` field records the encoder's identity and ``head`` the head's shape) and ``model.safetensors`` holding
the head's tensors only (the embedding standardisation, then the layers). :func:`wsi_screen.models.load_model`
rebuilds the encoder from its reference (checking its weights' sha256), puts the head on it, and returns an
ordinary :class:`~wsi_screen.models.PatchClassifier`: ``predict``, ``evaluate``, ``infer`` and ``calibrate`` use it
as any other model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_screen.errors import ModelError
from wsi_screen.models.encoder import EncoderModule

HEADS = ("linear", "mlp")
#: hidden width of the MLP head
MLP_HIDDEN = 256


class Head(nn.Module):
    """Embeddings (N, D) -> logits (N, C): standardised with the training embeddings' mean/std (buffers), then a
    linear layer or a one-hidden-layer MLP."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, kind: str, dim: int, num_classes: int, *, hidden: int = MLP_HIDDEN,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ModelError(f"head {kind!r} is not one of {', '.join(HEADS)}")
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.layers: nn.Module
        if kind == "linear":
            self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        else:
            self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_classes))

    def set_standardisation(self, features: torch.Tensor) -> None:
        """Centre and scale by the training embeddings (constant columns keep a scale of 1)."""
        self.mean.copy_(features.mean(dim=0))
        std = features.std(dim=0)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features.float() - self.mean) / self.std)


class HeadClassifier(nn.Module):
    """Normalised images -> logits: the encoder, then the head. ``get_classifier()`` is the head, so the code that
    taps a model's penultimate features finds the embeddings."""

    def __init__(self, encoder: EncoderModule, head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def get_classifier(self) -> nn.Module:
        return self.head


def head_record(kind: str, dim: int, *, hidden: int = MLP_HIDDEN) -> dict[str, Any]:
    """What ``config.json`` says about the head (``ModelSpec.head``)."""
    return {"kind": kind, "dim": dim, "hidden": hidden if kind == "mlp" else None}


def build_head(record: dict[str, Any], num_classes: int) -> Head:
    try:
        return Head(str(record["kind"]), int(record["dim"]), num_classes,
                    hidden=int(record.get("hidden") or MLP_HIDDEN))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"malformed head record {record}: {exc}") from None


def load_head_classifier(spec: Any, weights: Path, source: str) -> HeadClassifier:
    """The module of a head model folder: its encoder (by reference, sha256 checked) and its head's weights."""
    from wsi_screen.models.checkpoint import load_state_strict, read_weights
    from wsi_screen.models.encoder import load_identified

    if not spec.head:
        raise ModelError(f"{source}: config.json names an encoder but no head")
    try:
        encoder = load_identified(spec.encoder, model_dir=weights.parent)
    except ModelError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    head = build_head(spec.head, spec.num_classes)
    if int(spec.head["dim"]) != encoder.dim:
        raise ModelError(f"{source}: the head takes {spec.head['dim']}-dim embeddings, the encoder gives {encoder.dim}")
    load_state_strict(head, read_weights(weights), source)
    return HeadClassifier(encoder.module, head)
