"""uint8 RGB pixels -> a model's input: the accepted image inputs, the one resize, scaling and normalisation
(training, inference and the domain distance use these)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from wsi_screen.errors import ModelError

ImageBatch = np.ndarray | torch.Tensor | Sequence[Any]


def resize_uint8(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 NHWC batch to ``size`` x ``size`` (bilinear, antialiased): the one resize used."""
    if batch.shape[1] == size and batch.shape[2] == size:
        return batch
    x = batch.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_unit_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float [0, 1] NCHW -> ``(x - mean) / std``, channels-last (the one normalisation, train and inference)."""
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def numpy_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` that copies read-only or non-contiguous arrays instead of warning."""
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C", copy=True)
    return torch.from_numpy(arr)


def as_uint8_batch(images: ImageBatch) -> list[np.ndarray] | np.ndarray:
    """Normalise the accepted image inputs to a uint8 NHWC array or a list of HWC uint8 arrays."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4) or images.shape[-1] != 3:  # the shape given, not one with a batch axis added
            raise ModelError(f"expected RGB images shaped (N, H, W, 3) or one (H, W, 3), got an array of shape "
                             f"{images.shape}")
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8:
            raise ModelError(f"expected uint8 RGB images, got dtype {images.dtype}")
        return images
    out = []
    for i, item in enumerate(images):
        if hasattr(item, "convert"):  # PIL image
            item = np.asarray(item.convert("RGB"))
        arr = np.asarray(item)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ModelError(f"image {i}: expected a uint8 RGB array (H, W, 3) or PIL image, got "
                             f"{arr.dtype} {arr.shape}")
        out.append(arr)
    return out
