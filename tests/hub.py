"""A tiny timm encoder written into a local Hugging Face hub cache, the way huggingface_hub lays one out.

``models--ORG--NAME/refs/main`` holds the revision; ``snapshots/<revision>/`` holds ``config.json`` (timm's hub
config: architecture and pretrained_cfg) and ``model.safetensors``. With ``HF_HOME`` pointing at the parent of
``hub/`` and ``HF_HUB_OFFLINE=1``, the real loading code finds it there: no mocks, no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REVISION = "0123456789abcdef0123456789abcdef01234567"
#: timm's 306k-parameter test ViT (64-dim embeddings, 160 px input)
TINY_ARCH = "test_vit"
TINY_MEAN = (0.5, 0.5, 0.5)
TINY_STD = (0.25, 0.25, 0.25)


def tiny_state(seed: int = 0, num_classes: int = 3) -> dict[str, torch.Tensor]:
    """The tiny model's weights (with a classifier, as a hub checkpoint has; the encoder drops it)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TINY_ARCH, pretrained=False, num_classes=num_classes)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_hub_model(hf_home: Path, repo: str, *, seed: int = 0) -> Path:
    """Write the tiny model as ``repo`` (ORG/NAME) into ``hf_home/hub``; returns its weights file."""
    from safetensors.torch import save_file

    org, name = repo.split("/")
    root = hf_home / "hub" / f"models--{org}--{name}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    config = {"architecture": TINY_ARCH, "num_classes": 3, "num_features": 64,
              "pretrained_cfg": {"input_size": [3, 160, 160], "mean": list(TINY_MEAN), "std": list(TINY_STD),
                                 "num_classes": 3}}
    (snapshot / "config.json").write_text(json.dumps(config))
    weights = snapshot / "model.safetensors"
    save_file(tiny_state(seed), str(weights))
    return weights
