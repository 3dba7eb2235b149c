"""Which device the models run on: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

>>> from wsi_screen.models.device import resolve_device, device_info
>>> device = resolve_device("auto")        # cuda:<current> where torch sees a CUDA GPU, else cpu
>>> device_info(device)                    # {'type': 'cpu'} or {'type': 'cuda', 'index': 0, 'name': '...'}

``auto`` takes a CUDA GPU when torch sees one and the CPU otherwise. It never picks Apple's ``mps``: some
operators still fall back to the CPU there or differ in precision, so ``mps`` is used only when asked for by
name. ``cuda`` means torch's *current* CUDA device (``cuda:0`` unless the process chose another with
``torch.cuda.set_device``, as each Dask worker does, :mod:`wsi_screen.distributed`); it is resolved to its
index so that provenance names the GPU that ran. A device that is absent raises
:class:`~wsi_screen.errors.DeviceError` in one line naming what was asked for and what is present.
"""

from __future__ import annotations

from typing import Any

import torch

from wsi_screen._device_name import DEVICE_NAMES, parse_device_name
from wsi_screen.errors import DeviceError

__all__ = ["DEVICE_NAMES", "DeviceError", "device_info", "resolve_device", "worker_device"]


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_cuda(choice: str) -> str:
    build = ("this torch build has no CUDA support" if torch.version.cuda is None
             else f"torch {torch.__version__} sees none")
    return f"device {choice!r} asked for, but this machine has no CUDA GPU ({build}); use 'cpu' or 'auto'"


def resolve_device(choice: str | torch.device = "auto") -> torch.device:
    """The :class:`torch.device` for ``choice`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    ``auto``: the current CUDA GPU where torch sees one, else the CPU. ``cuda`` without an index: the current
    CUDA device, with its index. Raises :class:`~wsi_screen.errors.DeviceError` for a name that is not a
    device, ``cuda``/``cuda:N`` without that GPU, or ``mps`` where it is not available.
    """
    text = str(choice)
    kind, index = parse_device_name(text)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if _cuda_count() else torch.device("cpu")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {text!r} asked for, but Apple's MPS is not available on this machine "
                              "(it needs Apple silicon and a torch built with MPS); use 'cpu' or 'auto'")
        return torch.device("mps")
    count = _cuda_count()
    if count == 0:
        raise DeviceError(_no_cuda(text))
    if index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if index >= count:
        raise DeviceError(f"device {text!r} asked for, but torch sees {count} CUDA GPU{'s' * (count > 1)} "
                          f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}); use one of those, 'cuda' or "
                          "'auto'")
    return torch.device("cuda", index)


def device_info(device: str | torch.device) -> dict[str, Any]:
    """What ran, for provenance (config.json, run.json): ``{"type": "cpu"}``, or for a GPU ``{"type": "cuda",
    "index": 0, "name": "NVIDIA H100 80GB HBM3"}`` (``{"type": "mps", "name": "Apple MPS"}`` on a Mac)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "index": index, "name": torch.cuda.get_device_name(index)}
    if device.type == "mps":
        return {"type": "mps", "name": "Apple MPS"}
    return {"type": device.type}


def worker_device(choice: str, ordinal: int | None) -> torch.device:
    """The device of one of several worker processes on a node (a Dask worker; ``ordinal`` its number there).

    ``auto`` and ``cuda`` on a process that sees several CUDA GPUs give each worker its own:
    ``cuda:{ordinal % count}``. A process that sees one GPU (``CUDA_VISIBLE_DEVICES`` set per worker) uses it; an
    explicit ``cuda:N``, ``cpu`` or ``mps`` is kept; ``ordinal`` None is :func:`resolve_device`.
    """
    device = resolve_device(choice)
    count = _cuda_count()
    if device.type == "cuda" and parse_device_name(choice)[1] is None and ordinal is not None and count > 1:
        return torch.device("cuda", ordinal % count)
    return device
