"""Slide reading in a supervised child process: a crash or a hang in a native reader fails one slide.

OpenSlide, libdicom, libtiff and the image codecs are C libraries: a corrupt file can make them segfault,
abort or loop forever, and inside the main process that would end the whole run. :class:`SlideWorker`
runs the calls that open and read slides (tiling one slide, checking a store against its slide) in one
spawned child process, kept from slide to slide and started again only after it died or hung:

* the child dies (a signal such as SIGSEGV or SIGABRT, or any exit): :class:`SlideReaderCrashError`,
  "the slide reader crashed (signal 11, SIGSEGV)";
* the child stops making progress: work reports a :func:`heartbeat` at each step (slide opened,
  thumbnail read, tissue found, every shard of patches); when none comes for ``timeout`` seconds the
  child is killed and the call raises :class:`SlideTimeoutError`. Opening a slide is the first step, so
  no header can keep a run waiting longer than that.

The child's log records are re-emitted through this process's loggers (same lines, same run log); Python
warnings there become log records; and what native code writes to the child's stderr goes to the run log
(see :mod:`wsi_screen.runlog`), never to the terminal. The child ignores Ctrl-C (the parent stops it) and
dies with its parent, so a killed run leaves no orphan holding a store's lock.

Starting the child costs an interpreter and the tiler's imports (zarr, scipy: ~0.7 s here). The caller names
what a new child imports before its first call (``preload``: the tiler, which every slide call runs; this module
knows nothing above the slide). A command that will read slides calls :func:`start_early` first thing: the child
imports those modules while this process goes on with its own imports (on another core), and the next
:func:`slide_calls` uses that child; :func:`stop_early` when the command ends stops one left unused.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from wsi_screen import progress, runlog
from wsi_screen.errors import SlideReaderCrashError, SlideTimeoutError

R = TypeVar("R")

#: the child's name in ps, top and pgrep (Linux keeps 15 characters)
PROCESS_NAME = "wsi-screen-read"
#: default seconds a slide may go without progress (see the module docstring)
DEFAULT_TIMEOUT = 600.0
#: how often the parent looks at the child while waiting (seconds)
_POLL = 0.2
#: seconds a new child may take to start and import its ``preload`` modules before a call's own limit starts
STARTUP_TIMEOUT = 120.0

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ child side
_channel: _Channel | None = None


class _Channel:
    """The child's end of the pipe; sends from several threads (reader threads log too)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)


class _PipeHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if _channel is not None:  # logging must never raise, even when the parent went away
            with contextlib.suppress(Exception):
                _channel.send(("log", progress.capture_record(record)))


def heartbeat(step: str = "") -> None:
    """Tell the supervising process that work is progressing (a no-op outside a slide worker)."""
    if _channel is not None:
        with contextlib.suppress(OSError, ValueError):
            _channel.send(("beat", step))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed run must not leave a worker
    behind holding a store lock); elsewhere a thread watches the parent's pid."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _name_process() -> None:
    """Name this process :data:`PROCESS_NAME` where ps, top and pgrep look (Linux; elsewhere it stays python)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, PROCESS_NAME.encode()[:15])  # PR_SET_NAME


def _keep_terminal() -> None:
    """Python's ``sys.stderr`` (progress bars) keeps the terminal whatever file descriptor 2 becomes."""
    terminal = os.dup(2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding="utf-8", errors="backslashreplace")


def _native_stderr_to(log_path: str | None) -> None:
    """File descriptor 2 (where C libraries print) -> the run log (None or unwritable: discarded)."""
    try:
        target = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else -1
    except OSError:
        target = -1
    if target < 0:
        target = os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 2)
    os.close(target)


def _log_level(handler: logging.Handler, level: int) -> None:
    handler.setLevel(level)
    for name in ("wsi_screen", "py.warnings"):
        logging.getLogger(name).setLevel(level)


def _child_main(conn: Connection, level: int, bars: bool, preload: tuple[str, ...]) -> None:
    """The child's loop: import ``preload``, then run each call sent and send back its result or exception.

    Messages: ``("attach", path, level)``: native stderr to the run log at ``path``, records from ``level`` up
    sent to the parent; ``("call", fn, args, kwargs)``; ``None`` ends the loop."""
    global _channel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _name_process()
    _keep_terminal()
    _native_stderr_to(None)  # until the parent names its run log
    _channel = _Channel(conn)
    handler = _PipeHandler()
    _log_level(handler, level)
    for name in ("wsi_screen", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.getLogger().handlers[:] = [handler]  # libraries' records (tifffile warns about damaged files)
    logging.captureWarnings(True)
    progress.set_enabled(bars)
    progress.thread_lock_only()
    runlog.untracked_semaphores()
    for module in preload:  # a failure here shows again, as the call's own error, when the call imports it
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    _channel.send(("ready", None))  # a call's time limit starts now, not during the imports
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if message[0] == "attach":
            _native_stderr_to(message[1])
            _log_level(handler, message[2])
            continue
        _, fn, args, kwargs = message
        try:
            reply: tuple[Any, ...] = ("result", fn(*args, **kwargs))
        except BaseException as exc:
            reply = ("error", exc)
        try:
            _channel.send(reply)
        except Exception as exc:  # an unpicklable result or exception: say what it was
            _channel.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


# ----------------------------------------------------------------------------------------------- parent side
class SlideWorker:
    """Runs slide calls in a child process (see the module docstring). Use as a context manager.

    ``timeout`` is the most seconds a call may go without a :func:`heartbeat` (a new child first has up to
    :data:`STARTUP_TIMEOUT` to start and import ``preload``); ``log_path`` receives what native code prints to the
    child's stderr (None: discarded).
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, log_path: Path | None = None,
                 preload: tuple[str, ...] = ()) -> None:
        self.timeout = float(timeout)
        self.log_path = log_path
        self.preload = tuple(preload)
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False  # the child has started and imported ``preload``
        self._lock = threading.Lock()  # one call at a time on the pipe (scoring reads from a background thread)

    def __enter__(self) -> SlideWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the child now (it imports ``preload`` at once) rather than at the first call. A child that died
        between calls (nothing of it was lost: its last call had returned) is replaced, and a warning says so."""
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                log.warning("the slide reader stopped between reads (%s); a new one goes on",
                            _exit_status(self._proc.exitcode))
            self._stop()
            self._start()

    def attach(self, log_path: Path | None) -> None:
        """From now on, the child's native stderr goes to ``log_path`` and its log records are those this
        process's ``wsi_screen`` logger takes now (a run log takes every level)."""
        self.log_path = log_path
        if self._conn is not None:
            level = logging.getLogger("wsi_screen").getEffectiveLevel()
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(("attach", str(log_path) if log_path else None, level))

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # zarr's event-loop thread and OpenSlide must not be forked
        parent, child = ctx.Pipe()
        level = logging.getLogger("wsi_screen").getEffectiveLevel()
        proc = ctx.Process(target=_child_main, name="wsi-screen-slide-reader", daemon=True,
                           args=(child, level, progress.enabled(), self.preload))
        proc.start()
        child.close()
        self._proc, self._conn, self._ready = proc, parent, False
        self.attach(self.log_path)

    def call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)`` in the child; its exception is raised here. A dead or hung child raises
        :class:`SlideReaderCrashError` or :class:`SlideTimeoutError` (and is replaced for the next call)."""
        with self._lock:
            return self._call(fn, *args, **kwargs)

    def _call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        self.start()
        assert self._conn is not None and self._proc is not None
        try:
            self._conn.send(("call", fn, args, kwargs))
        except (OSError, ValueError):
            return self._crashed()
        deadline = time.monotonic() + self.timeout + (0.0 if self._ready else STARTUP_TIMEOUT)
        while True:
            if self._conn.poll(_POLL):
                try:
                    kind, value = self._conn.recv()
                except (EOFError, OSError):
                    return self._crashed()
                if kind == "ready":
                    self._ready = True
                    deadline = time.monotonic() + self.timeout
                elif kind == "beat":
                    deadline = time.monotonic() + self.timeout
                elif kind == "log":
                    progress.replay([value])
                elif kind == "result":
                    return value
                else:
                    raise value
            elif not self._proc.is_alive():
                return self._crashed()
            elif time.monotonic() > deadline:
                self._stop()
                raise SlideTimeoutError(f"no progress for {self.timeout:g} s (a hung slide reader?); stopped. "
                                        "Raise the limit (`slide_timeout`) if the slide is only slow")

    def _crashed(self) -> Any:
        proc = self._proc
        code = None
        if proc is not None:
            proc.join(timeout=5)
            code = proc.exitcode
        self._stop()
        if code is not None and code < 0:
            raise SlideReaderCrashError(f"the slide reader crashed ({_exit_status(code)})")
        raise SlideReaderCrashError(f"the slide reader stopped unexpectedly ({_exit_status(code)})")

    def _stop(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)

    def close(self) -> None:
        """Ask the child to finish, and stop it if it does not."""
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)
            self._proc.join(timeout=2)
        self._stop()


def _exit_status(code: int | None) -> str:
    """A child's exit code in words: ``signal 11, SIGSEGV`` or ``exit status 1``."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"signal {-code}, {name}"
    return f"exit status {code}"


def in_process() -> bool:
    """Whether slides are read in this process (``WSI_SCREEN_IN_PROCESS=1``: debugging, profiling)."""
    return os.environ.get("WSI_SCREEN_IN_PROCESS", "") not in ("", "0")


Caller = Callable[..., Any]


def direct(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run ``fn`` here (a :data:`Caller` without isolation: Dask workers, debugging)."""
    return fn(*args, **kwargs)


_early: SlideWorker | None = None


def start_early(*modules: str) -> None:
    """Start the slide reader now, so that its start-up (importing ``modules``) overlaps this process's; the
    next :func:`slide_calls` uses it (see the module docstring). A no-op where slides are read in this process."""
    global _early
    if _early is None and not in_process():
        _early = SlideWorker(preload=modules)
        _early.start()  # one never used dies with this process (a daemon, and PR_SET_PDEATHSIG)


def stop_early() -> None:
    """Stop the reader :func:`start_early` started if no :func:`slide_calls` took it (the command ended before
    reading a slide: a bad option, a model that would not load), so that it cannot serve a later command of this
    process with the settings of this one. ``tile`` and ``infer`` call it when their command ends."""
    global _early
    worker, _early = _early, None
    if worker is not None:
        worker.close()


@contextlib.contextmanager
def slide_calls(timeout: float = DEFAULT_TIMEOUT, *, isolate: bool = True,
                preload: tuple[str, ...] = ()) -> Iterator[Caller]:
    """A function ``call(fn, *args, **kwargs)`` that runs slide work in a :class:`SlideWorker` (the one
    :func:`start_early` started, if any; its native stderr to the active run log), or in this process when
    ``isolate`` is false (debugging: tracebacks reach the terminal) or ``WSI_SCREEN_IN_PROCESS=1``."""
    global _early
    worker, _early = _early, None
    if not isolate or in_process():
        if worker is not None:
            worker.close()
        from wsi_screen.slide.slide import forget_warnings

        forget_warnings()  # a run in this process warns as a run in a new child does
        yield direct
        return
    if worker is None:
        worker = SlideWorker(timeout=timeout, preload=preload)
    worker.timeout = float(timeout)
    worker.attach(runlog.active_path())
    with worker:
        yield worker.call
