"""The grammar of a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), without importing torch.

The CLI checks its device option with it at parse time (its help and a typo never import torch);
:func:`wsi_screen.models.device.resolve_device` uses the same rule and then asks torch what is present.
"""

from __future__ import annotations

import re

from wsi_screen.errors import DeviceError

#: the device names, as ``--help`` and error messages spell them
DEVICE_NAMES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N", "mps")
_PATTERN = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def parse_device_name(text: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``, ``"cpu"`` -> ``("cpu", None)``; case and surrounding blanks are ignored.

    Raises :class:`~wsi_screen.errors.DeviceError` for anything else (only ``cuda`` takes an index).
    """
    match = _PATTERN.fullmatch(str(text).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"device {text!r} is not a device name; use one of {', '.join(DEVICE_NAMES)}")
    index = match.group(2)
    return match.group(1), None if index is None else int(index)
