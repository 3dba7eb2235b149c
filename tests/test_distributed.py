"""``--dask``: ``tile`` and ``infer`` on a Dask cluster write what a local run writes, byte for byte.

Three kinds of cluster: an in-process LocalCluster started by the CLI (``--dask local:2``), a real
``dask scheduler`` with two ``dask worker`` processes on 127.0.0.1 started here, and (for the client-side
bookkeeping: order, failures, Ctrl-C) a threads-only cluster inside the test process.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, tree_digest
from tests.factory import GLASS, block_image, write_plain_tiff, write_tiled_tiff
from wsi_screen.distributed import Call, DaskAddress, DaskRunner, _reason, parse_address, task_key
from wsi_screen.errors import ConfigError
from wsi_screen.slide.discovery import SlideSource

#: files of a run folder that record when and how the run was started, so they differ between two runs
RUN_STAMPED = frozenset({"run.json", "report.html"})


def error_lines(err: str) -> list[str]:
    return sorted(line.strip() for line in err.splitlines() if "wsi-screen: error:" in line)


def warning_lines(err: str) -> list[str]:
    return sorted(line.strip() for line in err.splitlines() if "wsi-screen: warning:" in line)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    """Two written H&E slides, the real CMU SVS, a glass-only slide and one without mpp (fails)."""
    root = tmp_path_factory.mktemp("dask-slides")
    write_tiled_tiff(root / "block_a.tif", block_image((2048, 1536), [(256, 256, 1280, 1024)], seed=1), mpp=0.5)
    write_tiled_tiff(root / "block_b.tif", block_image((1536, 1536), [(128, 512, 1408, 1280)], seed=2), mpp=0.5)
    glass = np.empty((1024, 1024, 3), dtype=np.uint8)
    glass[:] = GLASS
    write_tiled_tiff(root / "glass.tif", glass, mpp=0.5)
    write_plain_tiff(root / "no_mpp.tif", block_image((512, 512), [(0, 0, 512, 512)]))
    shutil.copy(cmu_svs, root / "cmu.svs")
    return root


@pytest.fixture(scope="module")
def local_tiles(tmp_path_factory: pytest.TempPathFactory, slides: Path) -> tuple[Path, str]:
    """`tile SLIDES --size 128` without Dask, once for the module: the stores every Dask tile run must equal, and
    what it printed on stderr (the warnings and errors a Dask run must repeat)."""
    out = tmp_path_factory.mktemp("dask-local-tiles") / "local"
    res = run_cli("tile", slides, "-o", out, "--size", "128")
    assert res.code == 1, res  # no_mpp.tif fails
    assert "5 slide(s): 4 tiled, 0 up to date, 1 failed" in res.err, res
    return out, res.err


# ------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(("text", "expected"), [
    ("local", DaskAddress(None, 2)),
    ("local:3", DaskAddress(None, 3)),
    ("tcp://127.0.0.1:8786", DaskAddress("tcp://127.0.0.1:8786")),
    ("tcp://node-07.cluster.example:40123", DaskAddress("tcp://node-07.cluster.example:40123")),
    ("tcp://[::1]:8786", DaskAddress("tcp://[::1]:8786")),
])
def test_parse_address(text: str, expected: DaskAddress) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "foo", "local:0", "local:x", "127.0.0.1:8786", "tcp://host", "tcp://:8786",
                                  "tcp://host:0", "tcp://host:99999", "tls://host:8786", "http://host:8786"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="`dask`"):
        parse_address(text)


def test_task_keys_are_stable_and_unique(tmp_path: Path) -> None:
    a, b = SlideSource(tmp_path / "a.svs", "a"), SlideSource(tmp_path / "b.svs", "b")
    assert task_key("tile", "a", a, "/out") == task_key("tile", "a", a, "/out")
    assert len({task_key("tile", "a", a, "/out"), task_key("tile", "b", b, "/out"),
                task_key("tile", "a", a, "/other"), task_key("infer", "a", a, "/out")}) == 4


def test_reason_is_one_line() -> None:
    from distributed import KilledWorker

    assert "died" in _reason("error", KilledWorker("k", "tcp://w", 3))
    assert _reason("error", ValueError("bad\n  thing")) == "failed on a Dask worker: ValueError: bad thing"
    assert "cancelled" in _reason("cancelled", None)


# ------------------------------------------------------------------------- client-side bookkeeping (threads)
def _square(x: int) -> int:
    time.sleep(0.05 * (3 - x % 3))  # finish out of order
    return x * x


def _boom(x: int) -> int:
    raise ValueError(f"slide {x}\nis broken")


def _slow(x: int) -> int:
    time.sleep(0.3)
    return x


@pytest.fixture(scope="module")
def thread_runner() -> Iterator[DaskRunner]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0")
    client = Client(cluster, set_as_default=False)
    with DaskRunner(client, DaskAddress(cluster.scheduler_address), cluster) as runner:
        yield runner


def test_results_in_call_order_and_failures_as_results(thread_runner: DaskRunner) -> None:
    calls = [Call(f"sq-{i}", (i,)) for i in range(6)]
    assert thread_runner.run(_square, calls, failed=lambda i, r: -1) == [i * i for i in range(6)]
    seen: list[int] = []

    def arrived(i: int, result: str | int) -> str | int:
        seen.append(i)
        return result

    out = thread_runner.run(_boom, [Call(f"boom-{i}", (i,)) for i in range(2)], failed=lambda i, r: f"{i}: {r}",
                            on_result=arrived)
    assert out == ["0: failed on a Dask worker: ValueError: slide 0 is broken",
                   "1: failed on a Dask worker: ValueError: slide 1 is broken"]
    assert sorted(seen) == [0, 1]
    with pytest.raises(ConfigError, match="same Dask task key"):
        thread_runner.run(_square, [Call("same", (1,)), Call("same", (2,))], failed=lambda i, r: -1)
    with pytest.raises(ValueError, match="slide 0"):  # --debug: the worker's exception itself
        thread_runner.run(_boom, [Call("boom-debug", (0,))], failed=lambda i, r: r, reraise=True)


def test_interrupt_cancels_every_task(thread_runner: DaskRunner) -> None:
    def interrupt(i: int, result: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        thread_runner.run(_slow, [Call(f"slow-{i}", (i,)) for i in range(8)], failed=lambda i, r: -1,
                          on_result=interrupt)
    deadline = time.monotonic() + 10
    while thread_runner.client.futures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not thread_runner.client.futures  # nothing left queued for this client


# ---------------------------------------------------------------------------------------- CLI edge cases
def test_unreachable_scheduler_is_one_line(tmp_path: Path, slides: Path) -> None:
    start = time.monotonic()
    res = run_cli("tile", slides / "block_a.tif", "-o", tmp_path / "out", "--dask", "tcp://127.0.0.1:1")
    seconds = time.monotonic() - start
    assert res.code == 1, res
    assert len(res.err_lines) == 1, res
    assert res.err_lines[0].startswith("wsi-screen: error: cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    assert "Traceback" not in res.err and seconds < 15
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def _not_a_scheduler(kind: str) -> Iterator[int]:
    """A port on 127.0.0.1 where something that is not a Dask scheduler listens: "silent" accepts connections
    and never answers (a server waiting for its own protocol); "http" answers every connection with an HTTP
    error page, as a dashboard or web server does."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def answer() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/html\r\n\r\n<html>bad</html>" * 20)

    thread = threading.Thread(target=answer, daemon=True) if kind == "http" else None
    if thread is not None:
        thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        server.close()


@pytest.mark.parametrize(("kind", "says"), [
    ("silent", "cannot reach the Dask scheduler at tcp://127.0.0.1:{port} (no answer within 5 s)"),
    ("http", "tcp://127.0.0.1:{port} answered, but not as a Dask scheduler"),
])
def test_a_port_where_no_scheduler_answers_is_one_line(tmp_path: Path, slides: Path, kind: str, says: str) -> None:
    """distributed's Client waited forever on a port that accepts but never answers (a dashboard, a web server),
    and read an HTTP reply as a frame length (an internal MemoryError); now one line and exit status 1."""
    with _not_a_scheduler(kind) as port:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "wsi_screen.cli", "tile", str(slides / "block_a.tif"), "-o",
                               str(tmp_path / "out"), "--dask", f"tcp://127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=90)
        seconds = time.monotonic() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"wsi-screen: error: {says.format(port=port)}"), proc.stderr
    assert seconds < 30
    assert not (tmp_path / "out").exists()


def test_the_docs_python_example_runs_as_a_script_on_a_local_cluster(tmp_path: Path, slides: Path) -> None:
    """docs/cluster.md's "From Python" block, saved as a script with its "local:N" alternative, failed with a
    multiprocessing RuntimeError (spawned workers import the script again) until it gained its main guard."""
    text = (Path(__file__).parents[1] / "docs" / "cluster.md").read_text(encoding="utf-8")
    block = text.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "in").mkdir()
    shutil.copy(slides / "block_a.tif", tmp_path / "in" / "block_a.tif")
    script = (block.replace('"/shared/slides"', repr(str(tmp_path / "in")))
              .replace('"/shared/stores"', repr(str(tmp_path / "stores")))
              .replace('connect("tcp://10.0.0.5:8786")', 'connect("local:1")'))
    assert 'connect("local:1")' in script and str(tmp_path / "stores") in script
    (tmp_path / "example.py").write_text(script + "\n    print(results)\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(tmp_path / "example.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RuntimeError" not in proc.stderr
    assert (tmp_path / "stores" / "block_a.zarr" / "zarr.json").is_file()


def test_bad_address_and_memory_url_fail_before_any_cluster(tmp_path: Path, slides: Path) -> None:
    res = run_cli("tile", slides / "block_a.tif", "-o", tmp_path / "out", "--dask", "127.0.0.1:8786")
    assert res.code == 1 and len(res.err_lines) == 1 and "expected tcp://HOST:PORT" in res.err, res
    res = run_cli("tile", slides / "block_a.tif", "-o", "memory://stores", "--dask", "local")
    assert res.code == 1 and len(res.err_lines) == 1 and "memory://" in res.err_lines[0], res


def test_a_local_cluster_of_one_says_one_worker_process(tmp_path: Path, slides: Path) -> None:
    """`--dask local:1` said "1 worker processes"."""
    res = run_cli("tile", slides / "block_a.tif", "-o", tmp_path / "out", "--size", "256", "--dask", "local:1")
    assert res.code == 0, res
    lines = [t for t in res.err_lines if "local Dask cluster" in t]
    assert len(lines) == 1 and lines[0].startswith(
        "wsi-screen: info: local Dask cluster: 1 worker process at tcp://127.0.0.1:"), res


def test_file_url_output_is_the_folder(tmp_path: Path, slides: Path) -> None:
    res = run_cli("tile", slides / "block_a.tif", "-o", (tmp_path / "out").as_uri(), "--size", "256", "--quiet")
    assert res.code == 0, res
    assert (tmp_path / "out" / "block_a.zarr" / "zarr.json").exists()


# ----------------------------------------------------------------------------- LocalCluster: tile and infer
def test_tile_local_cluster_same_stores(tmp_path: Path, slides: Path, local_tiles: tuple[Path, str]) -> None:
    local, local_err = local_tiles
    dask = run_cli("tile", slides, "-o", tmp_path / "dask", "--size", "128", "--dask", "local:2")
    assert dask.code == 1, dask  # no_mpp.tif fails, as in the local run
    assert "5 slide(s): 4 tiled, 0 up to date, 1 failed" in dask.err, dask
    # failures and warnings (logged on the workers) reach the client's terminal as in a local run
    errors = error_lines(dask.err)
    assert errors == error_lines(local_err) and len(errors) == 1 and "no_mpp.tif" in errors[0]
    assert warning_lines(dask.err) == warning_lines(local_err) and any("glass" in w for w in warning_lines(dask.err))
    a, b = tree_digest(local), tree_digest(tmp_path / "dask")
    assert len(a) > 40 and a == b


def _results(run: Path) -> list[dict[str, str]]:
    with (run / "results.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _run_json(run: Path) -> dict[str, object]:
    data = json.loads((run / "run.json").read_text())
    for key in ("command", "started", "seconds", "total_seconds", "stages"):
        data.pop(key)
    for slide in data["slides"]:  # timings, and where a Dask worker scored it
        slide.pop("seconds")
        slide.pop("device", None)
    return data


def test_infer_local_cluster_same_run(tmp_path: Path, slides: Path) -> None:
    # the same run folder path for both runs (results.csv and slide.json name it): run, move away, rerun.
    # Small batches: torch's CPU kernels then round differently with one thread than with several, so this
    # also checks that workers (started by Dask with OMP_NUM_THREADS=1) score with the client's thread count.
    run = tmp_path / "run"
    args = ("infer", slides, "-o", run, "--workers", "0", "--batch-size", "8", "--quiet")
    local = run_cli(*args)
    assert local.code == 1, local  # no_mpp.tif is an error row
    run.rename(tmp_path / "local")
    dask = run_cli(*args, "--dask", "local:2")
    assert dask.code == 1, dask
    assert (run / "results.csv").read_bytes() == (tmp_path / "local" / "results.csv").read_bytes()
    assert [(r["slide"], r["status"]) for r in _results(run)] == [
        ("block_a", "ok"), ("block_b", "ok"), ("cmu", "ok"), ("glass", "no tissue"), ("no_mpp", "error")]
    assert error_lines(dask.err) == error_lines(local.err) and len(error_lines(dask.err)) == 1
    a, b = tree_digest(tmp_path / "local", RUN_STAMPED), tree_digest(run, RUN_STAMPED)
    assert len(a) > 50 and a == b  # stores, scores, heatmaps, GeoJSON, slide.json: byte for byte
    assert _run_json(run) == _run_json(tmp_path / "local")
    assert dask.out == local.out  # the printed table
    scored_on = {s["slide"]: s.get("device") for s in json.loads((run / "run.json").read_text())["slides"]}
    assert scored_on["cmu"] == scored_on["block_a"] == {"type": "cpu"}  # each Dask worker's own device


def test_worker_with_another_model_refuses(tmp_path: Path, slides: Path) -> None:
    from wsi_screen.models import load_model
    from wsi_screen.screening.run import InferConfig, SlideJob, screen_slide_task, tile_config_for

    classifier = load_model(None)
    job = SlideJob(run=tmp_path / "run", stores=str(tmp_path / "stores"),
                   tile=tile_config_for(classifier, InferConfig()), model_id={"sha256": "0" * 64},
                   on_error="record")
    row = screen_slide_task(SlideSource(slides / "block_a.tif", "block_a"), job, None, "0" * 64)
    assert row.status == "error" and "not the client's" in row.error and "\n" not in row.error
    assert not (tmp_path / "stores").exists()


# --------------------------------------------------------------- a real scheduler and two worker processes
def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` + two ``dask worker`` processes on 127.0.0.1; the scheduler's address."""
    from distributed import Client

    dask = [sys.executable, "-m", "dask"]
    file = tmp_path / "scheduler.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [_start([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                     "127.0.0.1:0", "--scheduler-file", str(file)], logs / "scheduler.log")]

    def tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(logs.iterdir()))

    try:
        deadline = time.monotonic() + 60
        address = None
        while address is None:  # the scheduler writes its file in place: it can exist and still be empty or partial
            if time.monotonic() > deadline or procs[0].poll() is not None:
                pytest.fail(f"dask scheduler did not start:\n{tails()}")
            try:
                address = json.loads(file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.2)
        for i in range(2):
            procs.append(_start([*dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                 "--nworkers", "1", "--dashboard-address", "127.0.0.1:0", "--name", f"w{i}",
                                 "--local-directory", str(tmp_path / f"w{i}")], logs / f"worker{i}.log"))
        with Client(address, timeout=30, set_as_default=False) as client:
            try:
                client.wait_for_workers(2, timeout=90)
            except TimeoutError:
                pytest.fail(f"dask workers did not join:\n{tails()}")
        yield address
    finally:
        _stop(procs)


@pytest.mark.slow
def test_tile_on_a_real_scheduler_with_two_workers(tmp_path: Path, slides: Path, scheduler: str,
                                                   local_tiles: tuple[Path, str]) -> None:
    local, local_err = local_tiles
    dask = run_cli("tile", slides, "-o", tmp_path / "dask", "--size", "128", "--dask", scheduler)
    assert dask.code == 1, dask
    assert "5 slide(s): 4 tiled, 0 up to date, 1 failed" in dask.err, dask
    assert error_lines(dask.err) == error_lines(local_err) and len(error_lines(dask.err)) == 1
    a, b = tree_digest(local), tree_digest(tmp_path / "dask")
    assert len(a) > 40 and a == b
    # a rerun finds every store up to date (the workers' stores are the client's)
    again = run_cli("tile", slides, "-o", tmp_path / "dask", "--size", "128", "--dask", scheduler)
    assert "5 slide(s): 0 tiled, 4 up to date, 1 failed" in again.err, again


def test_dask_missing_says_how_to_install_it(tmp_path: Path, slides: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the dask extra, --dask is one line that says what to install (the import failure simulated)."""
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # "import distributed" raises ImportError
    res = run_cli("tile", slides / "block_a.tif", "-o", tmp_path / "stores", "--dask", "local:1", "--quiet")
    assert res.code == 1 and res.err_lines == ['wsi-screen: error: running on a Dask cluster needs Dask, which is '
                                               'not installed here: pip install "wsi-screen[dask]"'], res
    assert not (tmp_path / "stores").exists()


@pytest.mark.parametrize(("name", "expected"), [
    (0, 0), (3, 3), ("2", 2), ("gpu-node-1", 1), ("SLURMCluster-4-3", 3), ("tcp://10.0.0.5:40331", None),
    ("worker", None), (True, None), (-1, None)])
def test_worker_ordinal_from_its_name(name: object, expected: int | None) -> None:
    from wsi_screen.distributed import ordinal_from_name, worker_ordinal

    assert ordinal_from_name(name) == expected
    assert worker_ordinal() is None  # not inside a Dask worker


# ------------------------------------------------------------------------------------------- interrupted runs
class _InterruptedRunner:
    """Stands for a Dask run the user interrupts (Ctrl-C while the slides are out on the workers): the workers had
    made the work folders ``made`` when they were killed."""

    def __init__(self, made: Sequence[Path]) -> None:
        self.made = made
        self.closed = False

    def run(self, *args: object, **kwargs: object) -> list[object]:
        for folder in self.made:
            folder.mkdir(parents=True)
            (folder / "zarr.json").write_text("{}")
        raise KeyboardInterrupt

    def close(self) -> None:
        self.closed = True


def test_an_interrupted_dask_run_leaves_no_partial_slide_folders(tmp_path: Path) -> None:
    """`infer --dask local:2` interrupted left RUN/<slide>.partial/ and stores/<slide>.zarr.partial (it cleaned only
    the first) of the slides its killed workers were writing; a local run's Ctrl-C leaves none. Those of slides
    another process is writing are its own, and one an earlier run left (there before this one began) stays."""
    from wsi_screen._safe_write import acquire
    from wsi_screen.models import default_model_dir, load_model
    from wsi_screen.screening.run import InferConfig, SlideJob, _screen_on_dask, tile_config_for

    run = tmp_path / "run"
    stores = run / "stores"
    names = ["block_a", "block_b", "cmu"]
    (stores / "block_b.zarr.partial").mkdir(parents=True)  # an earlier run's
    made = [*(run / f"{n}.partial" for n in names), stores / "block_a.zarr.partial", stores / "cmu.zarr.partial"]
    busy = acquire(run / "cmu")  # another process is writing cmu's results
    classifier = load_model(None)
    job = SlideJob(run=run, stores=str(stores), tile=tile_config_for(classifier, InferConfig()),
                   model_id={"sha256": "0" * 64})
    runner = _InterruptedRunner(made)
    try:
        with pytest.raises(KeyboardInterrupt):
            _screen_on_dask(runner, [SlideSource(tmp_path / f"{n}.tif", n) for n in names], job,  # type: ignore[arg-type]
                            default_model_dir())
    finally:
        busy.release()
    assert runner.closed  # the local cluster's workers are stopped before their folders are removed
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["cmu.partial", "stores"]
    assert sorted(p.name for p in stores.iterdir() if not p.name.startswith(".")) == ["block_b.zarr.partial"]


def test_an_interrupted_dask_tile_run_leaves_no_partial_stores(tmp_path: Path) -> None:
    """`tile --dask local:2` interrupted left the <slide>.zarr.partial stores its killed workers were writing."""
    from wsi_screen.tiling.grid import TileSpec
    from wsi_screen.tiling.pipeline import TileConfig, _tile_on_dask

    out = tmp_path / "stores"
    (out / "b.zarr.partial").mkdir(parents=True)  # an earlier run's
    (out / "c.zarr").mkdir()  # a finished store
    runner = _InterruptedRunner([out / "a.zarr.partial", out / "c.zarr.partial"])
    with pytest.raises(KeyboardInterrupt):
        _tile_on_dask(runner, [SlideSource(tmp_path / f"{n}.tif", n) for n in "abc"], str(out),  # type: ignore[arg-type]
                      str(out), TileConfig(spec=TileSpec(mpp=0.5, size_px=64)), on_error="record")
    assert runner.closed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["b.zarr.partial", "c.zarr"]


_KILLED_WORKER = """
import logging, sys, time
from pathlib import Path

def task(flag):
    import time
    import numcodecs, numpy as np
    numcodecs.Blosc().encode(np.zeros(1000, np.uint8))  # takes blosc's mutex on the worker
    flag.write_text("written")
    time.sleep(120)

if __name__ == "__main__":
    from wsi_screen.distributed import _run_captured, connect
    flag = Path(sys.argv[1])
    runner = connect("local:1")
    runner.client.submit(_run_captured, task, logging.WARNING, (flag,), {}, pure=False)
    start = time.time()
    while not flag.exists() and time.time() - start < 120:
        time.sleep(0.2)
    print(flag.exists())
    runner.close()  # as an interrupted run closes its local cluster: the worker dies mid-task
"""


def test_a_worker_killed_mid_slide_leaves_no_leaked_semaphore_warning_at_exit(tmp_path: Path) -> None:
    """Ctrl-C during `infer --dask local:2` printed the resource tracker's "There appear to be 4 leaked semaphore
    objects" after the interrupted line: each killed worker had made numcodecs' blosc mutex, registered under
    spawn (the fix of the slide reader's child, runlog.untracked_semaphores, now runs on the workers too)."""
    res = subprocess.run([sys.executable, "-c", _KILLED_WORKER, str(tmp_path / "flag")], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and res.stdout.split() == ["True"], res
    assert "leaked semaphore" not in res.stderr and "resource_tracker" not in res.stderr, res.stderr
