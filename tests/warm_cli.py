"""``wsi-screen`` processes that start warm: forked from one process that has imported torch, timm and the
commands once, instead of a fresh ``python -m wsi_screen.cli`` that imports them every time (~6 s of CPU for
``infer`` and ``embed``, which a test that kills or interrupts runs, or runs two at once, pays per process).

Each is a process of its own: its own pid, killed by a real signal (SIGKILL, SIGINT: Python's Ctrl-C handler, as
at a terminal), its exit status the command's, its stderr a file, its slide reader a spawned child of its own, as a
user's run has (whatever ``WSI_SCREEN_IN_PROCESS`` says in the test). It runs the console script's entry point
(``wsi_screen.cli.main()`` with ``sys.argv``, as ``python -m wsi_screen.cli`` does) in the test's environment, with
the test's torch thread count, multiprocessing's default start method (not the fork server's) and stdin on /dev/null,
and runs the interpreter's exit functions before it exits (tests/test_warm_cli.py compares with a fresh one). What it
does not repeat is the interpreter's start and the imports: tests about those start a fresh interpreter
(``subprocess``).

Under the hood: multiprocessing's fork server, its preload the modules above; :func:`warm_processes` stops and
reaps it when the tests that used it are done (its CPU time is then counted with theirs). Commands that must run
without root's CAP_DAC_* use :func:`tests.corpus.unprivileged_cli_runs` instead: the capabilities are dropped at
an exec, so those are forked from an interpreter exec'd after the drop, one after the other (not signalled), where
this fork server, started by the test process, would hand its children the test's capabilities.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: what the fork server imports once (an ImportError there is ignored: the process then imports it itself): only
#: modules a real ``wsi-screen`` imports (tests/test_warm_cli.py checks). Whatever they read or set when imported
#: (environment variables, matplotlib's settings, torch's threads) is as it was when the server started: a test
#: that changes such a setting for a command runs it in a fresh interpreter.
PRELOAD = ["torch", "timm", "wsi_screen.cli", "wsi_screen.commands.tile", "wsi_screen.commands.infer",
           "wsi_screen.commands.embed", "wsi_screen.tiling.pipeline", "wsi_screen.screening.run",
           "wsi_screen.embedding.slides", "matplotlib.figure", "matplotlib.backends.backend_agg", __name__]


def _command(entry: Callable[[], object], args: list[str], stderr: str, env: dict[str, str], threads: int) -> None:
    """The child: ``entry()`` (``wsi_screen.cli.main``: ``wsi-screen ARGS`` as the console script runs it) in a
    process set up as a fresh interpreter has it, stderr to ``stderr``, stdout discarded."""
    import atexit
    import threading
    from multiprocessing import resource_tracker

    import torch

    # multiprocessing's default start method, as in a fresh interpreter ('fork' on Linux up to Python 3.13): the
    # fork server's child has 'forkserver' forced on it, which would start the command's own processes otherwise
    multiprocessing.set_start_method(None, force=True)
    # a resource tracker of its own, started when needed with this stderr, as a fresh interpreter has (the fork
    # server's is the test process's: semaphores a killed command left would be reported there)
    tracker = resource_tracker._resource_tracker  # type: ignore[attr-defined]
    if tracker._fd is not None:
        os.close(tracker._fd)
    tracker._fd = tracker._pid = None
    os.environ.clear()
    os.environ.update(env)
    # Ctrl-C raises KeyboardInterrupt, as in an interpreter started at a terminal (the fork server ignores it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # stdin: /dev/null on fd 0 (what multiprocessing leaves; the subprocess.Popen calls these processes replace
    # inherited the test's, /dev/null under xdist), read through an ordinary sys.stdin instead of multiprocessing's
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = sys.__stdin__ = open(0, encoding=sys.stdout.encoding, errors=sys.stdout.errors,  # noqa: SIM115
                                     closefd=False)  # open for the process's life, as the interpreter's is
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    os.close(err)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    sys.stderr.reconfigure(write_through=True)  # unbuffered, as PYTHONUNBUFFERED=1 makes it
    torch.set_num_threads(threads)  # as OMP_NUM_THREADS does in a fresh process (torch read it before the fork)
    sys.argv = ["wsi-screen", *args]

    try:
        entry()
    finally:  # what the interpreter does at exit, in its order (multiprocessing's child ends with os._exit)
        threading._shutdown()  # type: ignore[attr-defined]  # joins the threads that are not daemons
        atexit._run_exitfuncs()


class WarmProcess:
    """A started ``wsi-screen`` command, read as a :class:`subprocess.Popen` is (``pid``, ``poll``, ``wait``,
    ``send_signal``, ``returncode``: negative for the signal that ended it)."""

    def __init__(self, proc: multiprocessing.process.BaseProcess, args: list[str]) -> None:
        self._proc = proc
        self.args = args

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)


class WarmCli:
    """Starts ``wsi-screen`` commands from the fork server (see the module docstring)."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")

    def start(self, args: list[str], stderr: Path) -> WarmProcess:
        """``wsi-screen ARGS``, its stderr to the file ``stderr``, in this process's environment (as the fork
        server's preloaded modules read it at the server's start: see ``PRELOAD``) and torch thread count (another
        rounds scores differently). It reads slides in the slide reader's child process, as a user's run does,
        whatever ``WSI_SCREEN_IN_PROCESS`` says here."""
        from wsi_screen.cli import main

        return self._start(main, args, stderr)

    def _start(self, entry: Callable[[], object], args: list[str], stderr: Path) -> WarmProcess:
        """``entry()`` (a module-level function) run as :meth:`start` runs the CLI's ``main``."""
        import torch

        env = {k: v for k, v in os.environ.items() if k != "WSI_SCREEN_IN_PROCESS"}
        proc = self._context.Process(target=_command, name="wsi-screen",
                                     args=(entry, list(args), str(stderr), env, torch.get_num_threads()))
        proc.start()
        return WarmProcess(proc, list(args))


@contextmanager
def warm_processes(preload: Sequence[str] = PRELOAD) -> Iterator[WarmCli]:
    """A :class:`WarmCli` whose fork server (importing ``preload`` once) is stopped and reaped at the end (it is
    started at the first command)."""
    server = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    before = server._preload_modules
    server.set_forkserver_preload(list(preload))
    try:
        yield WarmCli()
    finally:
        server._stop()  # multiprocessing's own shutdown of it ("used by unit tests")
        server.set_forkserver_preload(before)
