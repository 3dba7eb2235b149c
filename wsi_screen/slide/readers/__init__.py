"""Pixel readers behind :class:`wsi_screen.slide.slide.Slide`.

A reader exposes a pyramid (level dimensions and downsamples), optional level-0 mpp, vendor properties and
``read_region(level, xy_l0, size)`` returning RGB uint8 with white where the slide has no data. Readers are
opened by path and hold their own handles; :mod:`wsi_screen.slide.slide` chooses which one serves a file.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Reader(Protocol):
    """What :class:`~wsi_screen.slide.slide.Slide` needs from a pixel reader."""

    name: str  # "openslide" or "tifffile"
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def mpp(self) -> tuple[float, float] | None:
        """Level-0 microns per pixel (x, y) as declared by the file, or None."""
        ...

    def properties(self) -> dict[str, str]:
        """Vendor metadata worth recording (string values)."""
        ...

    def read_region(self, level: int, xy_l0: tuple[int, int], size: tuple[int, int],
                    out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` (w, h) pixels of ``level``, top-left at level-0 ``xy_l0``;
        written into and returned as ``out`` when given (readers that can decode straight into it do)."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


def into(out: np.ndarray | None, pixels: np.ndarray) -> np.ndarray:
    """``pixels``, or copied into ``out`` and ``out`` returned when the caller gave one (the ``out``
    convention of :meth:`Reader.read_region` and :meth:`Slide.read`)."""
    if out is None:
        return pixels
    out[...] = pixels
    return out
