"""The run's log file: the detail that does not belong on the terminal.

The terminal gets one ``wsi-screen:`` line per problem. Everything else a run learns goes to
``wsi-screen.log`` in its output folder (the stores folder of ``tile``, the run folder of ``infer``),
appended run after run:

* every package log record, debug detail included, with a time stamp;
* Python warnings and log records of the libraries underneath (pydicom, tifffile, zarr...), which would
  otherwise print on stderr and break a quiet run;
* the full traceback of each slide that failed with an unexpected error (:func:`record_traceback`);
* what native slide readers write to stderr (GLib's ``OpenSlide-WARNING`` lines): the slide reader's
  child process sends its stderr here (see :mod:`wsi_screen.slide.isolation`);
* the warnings and library records of the work done before the log could open (``infer`` finds its slides,
  reading DICOM headers, before it makes the run folder): :func:`held` keeps them until :func:`run_log` opens
  and writes them first.

Its lines name settings as the terminal does (:func:`wsi_screen.errors.in_user_words`: the CLI's options, where
the CLI runs), so the log and the terminal say the same thing the same way.

A log that cannot be written (read-only folder, full disk) is dropped silently: it never costs a slide.

Nor does Python's resource tracker get the last word on the terminal: :func:`untracked_semaphores`, run in the
slide reader's child and a Dask run's worker processes, keeps a child killed mid-slide from leaving "leaked
semaphore objects" to be reported after the run's last line.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsi_screen.errors import in_user_words

#: file name of the run log inside the output folder
LOG_NAME = "wsi-screen.log"

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_active: list[logging.Handler] = []
_held: list[_Held] = []
_capturing = 0


def _capture(on: bool) -> None:
    """Python warnings become ``py.warnings`` log records while any :func:`run_log` or :func:`held` is open."""
    global _capturing
    _capturing += 1 if on else -1
    logging.captureWarnings(_capturing > 0)


class _Formatter(logging.Formatter):
    """:data:`_FORMAT`, the message in the user's words (a traceback below it stays as Python wrote it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return in_user_words(super().formatMessage(record))


class _QuietFileHandler(logging.FileHandler):
    """A file handler that gives up silently when the file cannot be written."""

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)  # the output folder, as the run makes
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        # FileHandler.emit opens the file (delay=True) outside its handleError: an unwritable log (a read-only
        # output folder, a folder named wsi-screen.log) would escape from the first log call and fail the command
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError:
                self.handleError(record)
                return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.setLevel(logging.CRITICAL + 1)  # no "--- Logging error ---" on stderr, no retry per record


class _Held(logging.Handler):
    """Keeps records in memory until a run log opens (none is written while one is open)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not _active:
            self.records.append(record)


@contextmanager
def held() -> Iterator[None]:
    """Keep Python warnings and library log records off the terminal while the block runs, for the run log
    that :func:`run_log` opens later inside it (records it never takes are dropped with the block)."""
    warnings_logger = logging.getLogger("py.warnings")
    root = logging.getLogger()
    handler = _Held()
    saved = warnings_logger.propagate
    root.addHandler(handler)
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    _capture(True)
    _held.append(handler)
    try:
        yield
    finally:
        _held.remove(handler)
        _capture(False)
        warnings_logger.propagate = saved
        warnings_logger.removeHandler(handler)
        root.removeHandler(handler)


@contextmanager
def run_log(folder: str | Path | None) -> Iterator[Path | None]:
    """Append this run's detail to ``folder/wsi-screen.log`` while the block runs (None: no log file;
    warnings are still kept off the terminal)."""
    package = logging.getLogger("wsi_screen")
    warnings_logger = logging.getLogger("py.warnings")
    root = logging.getLogger()
    handler: logging.Handler
    path = Path(folder) / LOG_NAME if folder is not None else None
    handler = _QuietFileHandler(path, encoding="utf-8", delay=True) if path is not None else logging.NullHandler()
    handler.setFormatter(_Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG)
    saved = package.level, warnings_logger.propagate
    package.addHandler(handler)
    package.setLevel(logging.DEBUG)
    root.addHandler(handler)  # libraries that log (tifffile's warnings about a damaged file) go here too
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    _capture(True)
    for early in _held:  # what came before the log could open (see held)
        for record in early.records:
            handler.handle(record)
        early.records.clear()
    _active.append(handler)
    try:
        yield path
    finally:
        _active.remove(handler)
        _capture(False)
        warnings_logger.removeHandler(handler)
        warnings_logger.propagate = saved[1]
        root.removeHandler(handler)
        package.removeHandler(handler)
        package.setLevel(saved[0])
        handler.close()


def record_traceback(slide: str, text: str) -> None:
    """Write the traceback of a slide's unexpected failure to the active run log only (never the terminal)."""
    if not text:
        return
    record = logging.makeLogRecord({"name": "wsi_screen", "levelno": logging.ERROR, "levelname": "ERROR",
                                    "msg": "%s: traceback of the failure:\n%s", "args": (slide, text.rstrip())})
    for handler in _active:
        if record.levelno >= handler.level:
            handler.handle(record)


def active_path() -> Path | None:
    """The file the innermost active run log writes to (None without one)."""
    for handler in reversed(_active):
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def untracked_semaphores() -> None:
    """Make the semaphores that libraries create for themselves here (numcodecs' blosc mutex at the first store
    write: a ``multiprocessing.Lock()`` of the default context) unlinked as they are made, as under ``fork``. Under
    ``spawn`` (a spawned child's default) each is registered with the resource tracker, and a child killed mid-slide
    (after a Ctrl-C, a timeout) never unregisters it: the run's exit printed "There appear to be 1 leaked semaphore
    objects". Only the default changes: nothing in the child starts a process from it (the slide reader names spawn).
    For the slide reader's child and a Dask run's worker processes (daemonic: they cannot start processes)."""
    multiprocessing.set_start_method("fork", force=True)
