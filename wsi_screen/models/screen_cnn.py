"""``screen_cnn32``: the original small cervical-screening CNN, registered in timm's model registry.

The network of seed 000, layer for layer::

    input 32x32x3
    Conv 3x3 'same' 64  + ReLU + MaxPool 2x2   ->  16x16x64      1,792 parameters
    Conv 3x3 'same' 128 + ReLU + MaxPool 2x2   ->   8x8x128     73,856
    Conv 3x3 'same' 256 + ReLU + MaxPool 2x2   ->   4x4x256    295,168
    Flatten                                    ->  4,096
    Dense 512 + ReLU                                         2,097,664
    Dense 128 + ReLU                                            65,664
    Dense 2   (softmax)                                            258
                                                     total   2,534,402

(The seed printed a total of 2,488,402, which does not match its own layers; the layers are matched here.)
As with every model in wsi-screen, ``forward`` returns logits; the softmax is applied by
:meth:`wsi_screen.models.PatchClassifier.predict_tensor`. The flatten runs over (C, H, W) in PyTorch order,
not Keras' (H, W, C): it only matters for importing Keras weights, which nothing here does.

Importing this module registers ``screen_cnn32`` with :func:`timm.models.register_model`;
``import wsi_screen`` arranges for that to happen whenever timm is imported, so
``timm.create_model("screen_cnn32", num_classes=2)`` works in any program that imported wsi_screen.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

from wsi_screen.errors import ModelError

__all__ = ["ScreenCNN", "screen_cnn32"]

INPUT_SIZE = 32

#: timm-style default configuration (no weights exist to download; mean/std scale to [0, 1] like the seed)
default_cfgs: dict[str, dict[str, Any]] = {
    "screen_cnn32": {
        "url": "",
        "num_classes": 2,
        "input_size": (3, INPUT_SIZE, INPUT_SIZE),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "features.0",
        "classifier": "head.fc",
        "license": "apache-2.0",
    }
}


class ScreenCNN(nn.Module):
    """Three conv blocks and a three-layer dense head, for 32x32 RGB patches."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, drop_rate: float = 0.0,
                 widths: tuple[int, int, int] = (64, 128, 256), hidden: tuple[int, int] = (512, 128),
                 input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        if input_size % 8:
            raise ModelError(f"screen_cnn32 input size must be a multiple of 8, got {input_size}")
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = channels * (input_size // 8) ** 2
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.pre_logits = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.num_features, hidden[0]), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
        )
        self.head: _Head = _Head(hidden[1], num_classes)
        self.pretrained_cfg = dict(default_cfgs["screen_cnn32"])

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.head.fc.in_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.features(x)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        if pre_logits:
            return x
        out: torch.Tensor = self.head.fc(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _Head(nn.Module):
    """Holds the final layer as ``head.fc`` (timm's naming, so the classifier is found by name)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)


@register_model
def screen_cnn32(pretrained: bool = False, **kwargs: Any) -> ScreenCNN:
    """The seed's 32x32 screening CNN (2,534,402 parameters with two classes)."""
    if pretrained:
        raise ModelError("screen_cnn32 has no downloadable weights; train one with `wsi-screen train` or "
                         "load a local file as `pretrained`")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        if kwargs.pop(key, None):
            raise ModelError(f"screen_cnn32 does not support timm's {key}")
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    allowed = {"num_classes", "in_chans", "drop_rate"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ModelError(f"screen_cnn32 does not take {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(allowed))})")
    model = ScreenCNN(**kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
