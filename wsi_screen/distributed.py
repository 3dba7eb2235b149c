"""Run the per-slide unit of work on a Dask distributed cluster (the CLI's ``dask`` setting: an address).

``wsi-screen tile`` and ``wsi-screen infer`` hand each slide to a worker as one task: the worker opens the
slide by path and writes the store (and, for ``infer``, the slide's run folder) to the output location itself;
only the small result object travels back. The client keeps everything that is not per slide: discovery,
the summary, aggregation and the run's files. See docs/cluster.md for what must be shared.

The unit is one slide, never a region of one. A store is one zarr group with one writer: it is locked with
``flock`` by the writing process, written under ``<name>.zarr.partial`` and renamed when complete. Splitting
a slide over tasks would need a plan task, shard-aligned region tasks writing into a shared ``.partial``
store across processes (and hosts, with no lock held between them) and a commit task; the gain is small,
since a slide's patches are already read by ``config.workers`` threads and a cohort has many more slides
than a cluster has workers.

Usage from Python::

    with connect("tcp://10.0.0.5:8786") as dask:
        results = tile_slides(sources, "/shared/stores", config, on_error="record", dask=dask)

GPUs: with device ``auto`` (or ``cuda``) each ``infer`` worker scores on a GPU of its own: a worker that sees
one GPU (``CUDA_VISIBLE_DEVICES`` set per worker, as dask-cuda's ``LocalCUDACluster`` and ``dask cuda worker``
do) uses it; a worker that sees several takes ``cuda:{i % count}``, ``i`` being its number on the node
(:func:`worker_ordinal`). See docs/cluster.md, "GPUs".

Log records a task emits on the worker (``wsi_screen.*`` loggers, e.g. "no tissue found") are captured with
its result and re-emitted on the client when the result arrives, so a cluster run reports exactly what a
local run does, on the client's terminal, at the client's verbosity.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from wsi_screen import progress
from wsi_screen.errors import ConfigError, SchedulerError

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster

log = logging.getLogger(__name__)

#: a ``local`` address starts this many single-threaded worker processes
DEFAULT_LOCAL_WORKERS = 2
#: seconds to wait for an existing scheduler before giving up with a :class:`SchedulerError`
CONNECT_TIMEOUT_S = 5.0
#: the package logger whose records are captured on workers and re-emitted on the client
PACKAGE_LOGGER = "wsi_screen"

_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?):(?P<port>\d{1,5})")
_LOCAL = re.compile(r"local(?::(?P<n>\d{1,4}))?")

R = TypeVar("R")


@dataclass(frozen=True)
class DaskAddress:
    """Where to run: an existing scheduler (``tcp://host:port``) or a LocalCluster of ``n_workers``."""

    scheduler: str | None = None
    n_workers: int = DEFAULT_LOCAL_WORKERS

    @property
    def local(self) -> bool:
        return self.scheduler is None

    def __str__(self) -> str:
        return self.scheduler or f"local:{self.n_workers}"


def parse_address(text: str) -> DaskAddress:
    """``tcp://host:port`` | ``local`` | ``local:N`` -> :class:`DaskAddress`; anything else is a ConfigError."""
    value = text.strip()
    if m := _LOCAL.fullmatch(value):
        n = int(m["n"]) if m["n"] is not None else DEFAULT_LOCAL_WORKERS
        if n < 1:
            raise ConfigError(f"`dask` {text}: a local cluster needs at least 1 worker (local:N with N >= 1)")
        return DaskAddress(None, n)
    if m := _TCP.fullmatch(value):
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ConfigError(f"`dask` {text}: port {port} is out of range (1-65535)")
        return DaskAddress(value)
    raise ConfigError(f"`dask` {text!r}: expected tcp://HOST:PORT (a running `dask scheduler`), local or "
                      "local:N (start N worker processes here)")


@dataclass(frozen=True)
class Call:
    """One task: ``fn(*args, **kwargs)`` under a scheduler key that is stable and unique per slide."""

    key: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def task_key(kind: str, name: str, *inputs: object) -> str:
    """``wsi-screen-<kind>-<slide name>-<digest of the inputs>``: the same work gets the same key.

    The digest covers everything the task depends on (slide path, output location, configuration), so two
    different jobs for one slide never share a key, while resubmitting identical work is recognised.
    """
    digest = hashlib.sha256(repr(inputs).encode()).hexdigest()[:16]
    return f"wsi-screen-{kind}-{name}-{digest}"


class DaskRunner:
    """A connected Dask client (and the LocalCluster it started, if any); see :func:`connect`."""

    def __init__(self, client: Client, address: DaskAddress, cluster: LocalCluster | None = None) -> None:
        self.client = client
        self.address = address
        self._cluster = cluster

    def __repr__(self) -> str:
        return f"DaskRunner({str(self.address)!r})"

    def run(self, fn: Callable[..., R], calls: Sequence[Call], *, failed: Callable[[int, str], R],
            on_result: Callable[[int, R], R] | None = None, reraise: bool = False, desc: str = "slides",
            unit: str = "slide") -> list[R]:
        """Submit one task per call, show a bar as they finish, and return their results in call order.

        A task that raised (or whose worker died) becomes ``failed(index, one-line reason)`` unless
        ``reraise`` (debugging), which re-raises the worker's exception here. ``on_result(index, result)``
        sees every result as it arrives (after the task's log records were re-emitted) and may replace it.
        On KeyboardInterrupt (or any error) every task still queued is cancelled before re-raising; tasks
        already running finish on their worker (and commit their store atomically or not at all).
        """
        from distributed import as_completed

        index = {call.key: i for i, call in enumerate(calls)}
        if len(index) != len(calls):
            raise ConfigError("two slides were given the same Dask task key; slide names must be unique")
        level = logging.getLogger(PACKAGE_LOGGER).getEffectiveLevel()
        futures: list[Future] = []
        try:
            for call in calls:
                futures.append(self.client.submit(_run_captured, fn, level, call.args, dict(call.kwargs),
                                                  key=call.key, pure=False))
            results: dict[int, R] = {}
            with progress.bar(total=len(futures), desc=desc, unit=unit) as bar:
                for future in as_completed(futures, loop=self.client.loop):
                    i = index[future.key]
                    result: R
                    if future.status == "finished":
                        result, records = future.result()
                        progress.replay(records)
                    else:
                        exc = future.exception() if future.status == "error" else None
                        if reraise and isinstance(exc, BaseException):
                            raise exc
                        result = failed(i, _reason(future.status, exc))
                    if on_result is not None:
                        result = on_result(i, result)
                    results[i] = result
                    future.release()
                    bar.update(1)
        except BaseException:
            if futures:
                log.debug("cancelling %d Dask tasks", len(futures))
                try:
                    self.client.cancel(futures)
                except Exception as exc:  # a lost scheduler must not hide the interrupt or error being raised
                    log.debug("could not cancel the Dask tasks: %s", exc)
            raise
        return [results[i] for i in range(len(futures))]

    def close(self) -> None:
        """Close the client, and the LocalCluster if this runner started one."""
        try:
            self.client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str | DaskAddress, *, timeout_s: float = CONNECT_TIMEOUT_S) -> DaskRunner:
    """Connect to a running scheduler, or start a LocalCluster for ``local[:N]``.

    An unreachable scheduler is a :class:`SchedulerError` naming the address, after ``timeout_s`` seconds.
    """
    target = parse_address(address) if isinstance(address, str) else address
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ConfigError('running on a Dask cluster needs Dask, which is not installed here: '
                          'pip install "wsi-screen[dask]"') from exc

    if target.scheduler is None:
        # single-threaded worker processes (a slide's reader threads are its parallelism), no fixed
        # dashboard port (8787 may be taken), only errors from distributed's own loggers
        with _sigint_ignored():  # Ctrl-C is the client's to handle: it cancels the tasks, then closes the cluster
            cluster = LocalCluster(n_workers=target.n_workers, processes=True, threads_per_worker=1,
                                   dashboard_address="127.0.0.1:0", host="127.0.0.1",
                                   silence_logs=logging.CRITICAL)
        try:
            client = Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        log.info("local Dask cluster: %d worker process%s at %s", target.n_workers,
                 "" if target.n_workers == 1 else "es", cluster.scheduler_address)
        return DaskRunner(client, target, cluster)
    try:
        # distributed's Client waits forever on a server that accepts the connection but never answers as a
        # scheduler (a dashboard port, a web server): ask who is there first, under the timeout
        _expect_scheduler(target.scheduler, timeout_s)
        client = Client(target.scheduler, timeout=timeout_s, set_as_default=False)
    except SchedulerError:
        raise
    except (OSError, TimeoutError) as exc:
        text = " ".join(str(exc).split())
        reason = f"no answer within {timeout_s:g} s" if not text or "timed out" in text.lower() else text
        raise SchedulerError(f"cannot reach the Dask scheduler at {target.scheduler} ({reason}); start one with "
                             "`dask scheduler` (see docs/cluster.md) or check the address and firewall") from None
    try:
        n_workers = len(client.nthreads())
    except BaseException:
        client.close()
        raise
    if n_workers:
        log.info("Dask scheduler at %s with %d workers", target.scheduler, n_workers)
    else:
        log.warning("the Dask scheduler at %s has no workers yet; the slides wait until some join", target.scheduler)
    return DaskRunner(client, target)


def _expect_scheduler(address: str, timeout_s: float) -> None:
    """Ask ``address`` for its identity within ``timeout_s`` seconds; raise unless a Dask scheduler answers.

    TimeoutError when nothing answers in time, OSError when the connection fails, SchedulerError when something
    other than a scheduler answers. Runs on its own event loop in a thread of its own, so it also works where
    the calling thread already runs one (a notebook's).
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect as open_comm

    async def identity() -> object:
        comm = await open_comm(address, timeout=timeout_s)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    def ask() -> object:
        return asyncio.run(asyncio.wait_for(identity(), timeout_s))

    with ThreadPoolExecutor(1, thread_name_prefix="wsi-screen-dask-probe") as pool:
        try:
            reply = pool.submit(ask).result()
        except (OSError, TimeoutError):
            raise
        except Exception as exc:  # bytes that are no Dask message (an HTTP reply read as a frame length...)
            reply = f"{type(exc).__name__}"
    if not (isinstance(reply, Mapping) and reply.get("type") == "Scheduler"):
        what = reply.get("type") if isinstance(reply, Mapping) else None
        raise SchedulerError(f"{address} answered, but not as a Dask scheduler"
                             f"{f' (a {what})' if isinstance(what, str) and what else ''}; give the address "
                             "`dask scheduler` prints (port 8786 by default; 8787 is its dashboard)")


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes are spawned, so that they inherit "ignore" (a terminal's Ctrl-C
    reaches the whole process group: without this every worker would print a KeyboardInterrupt traceback)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def maybe_connect(address: str | DaskAddress | None) -> Iterator[DaskRunner | None]:
    """``connect(address)`` as a context manager, or None for a local run (``address`` None)."""
    if address is None:
        yield None
        return
    with connect(address) as runner:
        yield runner


# ------------------------------------------------------------------------------------------ worker side
_ORDINAL = re.compile(r".+-(?P<i>\d{1,4})")


def ordinal_from_name(name: object) -> int | None:
    """A worker's number on its node, from its Dask name: LocalCluster names workers ``0``, ``1``...;
    ``dask worker`` given the name W and N workers names them ``W-0`` ... ``W-(N-1)``; dask-jobqueue ``Cluster-J-i``.
    None for a name that carries no number (a bare address such as ``tcp://10.0.0.5:40331``)."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name if name >= 0 else None
    text = str(name)
    if text.isdigit():
        return int(text)
    match = _ORDINAL.fullmatch(text) if "://" not in text else None
    return int(match["i"]) if match else None


def worker_ordinal() -> int | None:
    """This Dask worker's number on its node (:func:`ordinal_from_name`); None outside a Dask worker."""
    try:
        from distributed import get_worker

        return ordinal_from_name(get_worker().name)
    except (ImportError, ValueError):  # not running inside a Dask worker
        return None


class _ThreadCapture(logging.Handler):
    """Collects the records one task's thread emits (other tasks may run in other threads)."""

    def __init__(self, thread: int) -> None:
        super().__init__(logging.NOTSET)
        self.thread = thread
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(progress.capture_record(record))


def _run_captured(fn: Callable[..., R], level: int, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[R, list[dict[str, Any]]]:
    """The task that runs on a worker: ``fn(*args, **kwargs)`` and the package log records it emitted.

    In a daemonic worker process (a nanny's, as a local cluster's: it cannot start processes) the semaphores that
    libraries make are made untracked first (:func:`~wsi_screen.runlog.untracked_semaphores`): a worker
    killed mid-slide, as an interrupted run closes its local cluster, left Python's resource tracker printing
    "There appear to be 4 leaked semaphore objects" after the run's last line."""
    if multiprocessing.current_process().daemon:
        from wsi_screen.runlog import untracked_semaphores

        untracked_semaphores()
    logger = logging.getLogger(PACKAGE_LOGGER)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    handler = _ThreadCapture(threading.get_ident())
    logger.addHandler(handler)  # also keeps logging's last-resort handler from printing on the worker
    try:
        result = fn(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    return result, handler.records


def _reason(status: str, exc: BaseException | None) -> str:
    """One line saying why a task did not return a result."""
    from distributed import KilledWorker

    if exc is None:
        return f"its Dask task was {status} (scheduler restarted or lost?); rerun to resume"
    if isinstance(exc, KilledWorker):
        return ("the slide reader crashed or ran out of memory (Dask workers died while running it); see the "
                "worker logs")
    msg = " ".join(str(exc).split()) or "no message"
    return f"failed on a Dask worker: {type(exc).__name__}: {msg}"
