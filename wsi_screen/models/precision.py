"""The arithmetic a model scores in: ``fp32``, or ``bf16`` where the hardware computes it natively.

``bf16`` runs the forward pass under ``torch.autocast`` (convolutions and matrix products in bfloat16, with
float32 accumulation; the softmax and the domain distance's maths stay float32). On a CPU with AMX or
AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later) oneDNN runs it ~2x faster than float32;
on other CPUs bfloat16 is emulated and slower, so ``auto`` picks it only where it is native (and on CUDA GPUs
that support it). Scores within :data:`REFINE_BAND` of a decision threshold are rescored in float32
(:meth:`~wsi_screen.models.classifier.PatchClassifier.score_tensor`), so decisions at those thresholds are
float32's. Measured on the bundled model in docs/default-model.md and bench/RESULTS.md. This is a setting of
scoring (``infer``, ``predict``, ``evaluate``, the Python API).

Training on a CPU runs in float32. Training on a CUDA GPU runs its forward pass and loss in mixed precision
(:func:`training_dtype`: bfloat16 where the GPU supports it, else float16 with a gradient scaler); its
validation, and so the best epoch and the threshold, stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from wsi_screen.errors import ModelError

#: the choices of ``precision``
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: in bf16, a probability this close to a decision threshold is rescored in float32 (bfloat16 moved the bundled
#: model's PCam valid probabilities by 0.0203 at most, 0.0016 on average: a margin of 1.5x the largest)
REFINE_BAND = 0.03
#: the same for the domain distance, relative to the domain threshold (its whitening amplifies bfloat16's error:
#: up to 10 % of the threshold on PCam valid, 8 % near it)
DOMAIN_REFINE_BAND = 0.15


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (so autocasting to it is faster, not slower)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(check()) for check in checks if callable(check))
    except RuntimeError:  # an unusual build without these probes: float32 is always correct
        return False


def resolve(choice: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where native on ``device``, else ``fp32``; an explicit choice is kept."""
    if choice not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    if choice == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return choice


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward pass's arithmetic: nothing for ``fp32``, bfloat16 autocast for ``bf16``."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def training_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type of training's forward pass on ``device``: None (float32) off CUDA; on a CUDA GPU
    bfloat16 where it computes it (Ampere and later), else float16 (which needs a gradient scaler)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: how provenance names an autocast type (None: float32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
