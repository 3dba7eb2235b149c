"""Running independent pieces of one job on a few threads (numpy, scipy, PIL and the codecs release the GIL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def run_each(fn: Callable[[T], object], items: Sequence[T], *, workers: int, name: str) -> None:
    """Call ``fn(item)`` for every item, on ``workers`` threads (in this thread when one suffices); the first
    error is raised here. ``fn`` must write its result somewhere of its own (e.g. its slice of an array)."""
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
            for done in [pool.submit(fn, item) for item in items]:
                done.result()
    else:
        for item in items:
            fn(item)
