"""Progress bars on stderr, switched on by the CLI only.

The library never prints: bars are disabled unless :func:`set_enabled` was called (the CLI does so unless
``--quiet``). Log records are routed through ``tqdm.write`` by :func:`install_log_handler` so they do not
tear the bars apart.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled = False


def set_enabled(flag: bool) -> None:
    """Turn progress bars on or off for this process."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    """Whether progress bars are shown."""
    return _enabled


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", leave: bool = True, position: int | None = None) -> Any:
    """A tqdm bar on stderr (a silent one when bars are disabled)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, position=position,
                disable=not _enabled, file=sys.stderr, dynamic_ncols=True)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"wsi-screen: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and logging.getLogger("wsi_screen").level <= logging.DEBUG:
            text += "\n" + self.formatException(record.exc_info)
        return text


def install_log_handler(level: int) -> None:
    """Send the package's log records to stderr as ``wsi-screen: level: message`` lines."""
    logger = logging.getLogger("wsi_screen")
    for handler in list(logger.handlers):
        if isinstance(handler, _TqdmHandler):
            logger.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
