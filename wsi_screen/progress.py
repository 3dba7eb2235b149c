"""Progress bars on stderr, switched on by the CLI only.

The library never prints: bars are disabled unless :func:`set_enabled` was called (the CLI does so unless
the run is quiet). Log records are routed through ``tqdm.write`` by :func:`install_log_handler` so they do not
tear the bars apart.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

from wsi_screen.errors import in_user_words

T = TypeVar("T")

_enabled = False


def set_enabled(flag: bool) -> None:
    """Turn progress bars on or off for this process."""
    global _enabled
    _enabled = flag


def thread_lock_only() -> None:
    """Make this process's bars share a thread lock instead of tqdm's default, which also holds a
    multiprocessing semaphore: a process killed by a signal (the slide reader child after a native crash) never
    releases that semaphore, and Python's resource tracker then warns of a leak when the run exits."""
    tqdm.set_lock(threading.RLock())


def enabled() -> bool:
    """Whether progress bars are shown."""
    return _enabled


def duration(seconds: float) -> str:
    """A duration in seconds as a summary says it: one decimal under 10 s (a head's sub-second training read
    "0 s"), whole seconds above."""
    return f"{seconds:.1f}" if seconds < 9.95 else f"{seconds:.0f}"


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", leave: bool = True, position: int | None = None, disable: bool = False) -> Any:
    """A tqdm bar on stderr (a silent one when bars are disabled, or ``disable``: nothing worth a bar)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, position=position,
                disable=disable or not _enabled, file=sys.stderr, dynamic_ncols=True)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"wsi-screen: {record.levelname.lower()}: {in_user_words(record.getMessage())}"
        if record.exc_info and terminal_level() <= logging.DEBUG:
            text += "\n" + self.formatException(record.exc_info)
        return text


def install_log_handler(level: int) -> None:
    """Send the package's log records of ``level`` and above to stderr as ``wsi-screen: level: message``
    lines (a run log, see :mod:`wsi_screen.runlog`, may take more detail from the same logger)."""
    logger = logging.getLogger("wsi_screen")
    for handler in list(logger.handlers):
        if isinstance(handler, _TqdmHandler):
            logger.removeHandler(handler)
    handler = _TqdmHandler(level)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


@contextmanager
def output_restored(*library_loggers: str) -> Iterator[None]:
    """When the block ends, put back what a command changes in this process's output: the package logger's
    handlers, level and propagation (:func:`install_log_handler`), the levels of ``library_loggers``, and whether
    bars are shown. A command run in-process (``wsi_screen.cli.main`` from a notebook or a test) then leaves the
    rest of the process logging as it did before."""
    package = logging.getLogger("wsi_screen")
    libraries = [logging.getLogger(name) for name in library_loggers]
    handlers, level, propagate = list(package.handlers), package.level, package.propagate
    levels, bars = [lib.level for lib in libraries], _enabled
    try:
        yield
    finally:
        for handler in [h for h in package.handlers if h not in handlers]:
            package.removeHandler(handler)
        for handler in [h for h in handlers if h not in package.handlers]:
            package.addHandler(handler)
        package.setLevel(level)
        package.propagate = propagate
        for lib, lib_level in zip(libraries, levels, strict=True):
            lib.setLevel(lib_level)
        set_enabled(bars)


def terminal_level() -> int:
    """The level of records shown on stderr (WARNING when no handler was installed)."""
    for handler in logging.getLogger("wsi_screen").handlers:
        if isinstance(handler, _TqdmHandler):
            return handler.level
    return logging.WARNING


def capture_record(record: logging.LogRecord) -> dict[str, object]:
    """A log record as plain data, to send to another process (see :func:`replay`)."""
    return {"name": record.name, "levelno": record.levelno, "msg": record.getMessage()}


def replay(records: Sequence[Mapping[str, object]]) -> None:
    """Re-emit records captured in another process (a Dask worker, the slide reader's child process)
    through this process's loggers of the same names."""
    root = logging.getLogger()
    for rec in records:
        name = str(rec["name"])
        level = int(rec["levelno"])  # type: ignore[call-overload]
        record = logging.makeLogRecord({"name": name, "levelno": level, "msg": str(rec["msg"]),
                                        "levelname": logging.getLevelName(level)})
        if name == "wsi_screen" or name.startswith(("wsi_screen.", "py.warnings")):
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                logger.handle(record)
        elif level >= root.getEffectiveLevel():
            # a library's record (tifffile's warnings): to the root handlers (the run log) directly, so a
            # library logger another package switched off (logging.config.dictConfig does) cannot drop it
            root.handle(record)
