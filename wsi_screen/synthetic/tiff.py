"""The one pyramid-TIFF writer: synthetic slides, the tests' slides and the benchmark's mosaic all use it.

A level is an array, or ``(shape, tiles)`` with the tiles in row-major order (so a slide larger than memory
is written band by band). Levels after the first are written as reduced-resolution images
(``SubFileType`` 1), one IFD each: the generic tiled TIFF layout that OpenSlide opens as ``generic-tiff``.
``levels`` is consumed lazily, so a level may be computed while the one before it is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

Level = np.ndarray | tuple[tuple[int, int, int], Iterator[np.ndarray]]


def write_pyramid(path: str | os.PathLike[str], levels: Iterable[Level], *, mpp: float | None, tile: int = 256,
                  compression: str = "jpeg", bigtiff: bool = False, description: str | None = None,
                  **options: Any) -> list[tuple[int, int]]:
    """Write ``levels`` to ``path``; returns each level's (width, height).

    ``mpp`` is stored as the TIFF resolution in pixels per centimetre (none when ``None``); ``description``
    goes on level 0; ``options`` are passed to every level's ``tifffile.TiffWriter.write`` (e.g.
    ``compressionargs``, ``subsampling``, ``software``)."""
    import tifffile

    res: dict[str, Any] = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    dims: list[tuple[int, int]] = []
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for i, level in enumerate(levels):
            if isinstance(level, np.ndarray):
                data: Any = level
                shape = level.shape
                extra: dict[str, Any] = {}
            else:
                shape, data = level
                extra = {"shape": shape, "dtype": np.uint8}
            if i == 0 and description is not None:
                extra["description"] = description
            if i:
                extra["subfiletype"] = 1
            tw.write(data, tile=(tile, tile), compression=compression, photometric="rgb", metadata=None, **res,
                     **extra, **options)
            dims.append((int(shape[1]), int(shape[0])))
    return dims


def tiles_of(a: np.ndarray, tile: int = 256) -> Iterator[np.ndarray]:
    """The ``tile`` x ``tile`` tiles of an image, row-major (edge tiles smaller)."""
    for y in range(0, a.shape[0], tile):
        for x in range(0, a.shape[1], tile):
            yield a[y:y + tile, x:x + tile]
