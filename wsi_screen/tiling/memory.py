"""Handing freed heap memory back to the operating system (glibc's ``malloc_trim``).

Streaming patches allocates and frees buffers of 100 kB to 8 MB on several threads (decoded tiles, patches,
shards, compressed chunks). glibc keeps freed pages in its per-thread arenas, so without trimming a long run's
resident memory creeps up to a plateau that depends on how long it ran, not on what it holds (bench/tile.py
measures peak memory against slide size; bench/RESULTS.md). Dask's workers trim the same way
(``distributed.worker_memory``). On other C libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def trim() -> None:
    """Return free heap pages to the operating system (a few milliseconds; glibc only)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
