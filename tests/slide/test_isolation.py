"""The slide reader's child process: a crash or a hang fails one slide, and the next slide is read as usual."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.factory import block_image, write_tiled_tiff
from wsi_screen.errors import SlideReaderCrashError, SlideTimeoutError
from wsi_screen.runlog import LOG_NAME, run_log
from wsi_screen.slide import isolation
from wsi_screen.slide.discovery import discover
from wsi_screen.tiling.pipeline import TileConfig, tile_slides
from wsi_screen.tiling.store import PatchStore


# --- functions the child runs (importable by the spawned process) -----------------------------------------
def _pid() -> int:
    return os.getpid()


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def _beating(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        isolation.heartbeat("working")
        time.sleep(0.2)
    return "done"


def _noisy() -> str:
    logging.getLogger("wsi_screen.test").warning("a warning from the child")
    logging.getLogger("tifffile").error("<TiffTag.fromfile> raised TiffFileError(...)")  # a library's own logger
    os.write(2, b"(process:1): OpenSlide-WARNING **: native noise\n")
    import warnings

    warnings.warn("a library warning", UserWarning, stacklevel=1)
    return "ok"


def _raises() -> None:
    raise ValueError("bad value in the child")


def _debug_line() -> None:
    logging.getLogger("wsi_screen.test").debug("a debug line from the child")


def _imported(*names: str) -> list[bool]:
    import sys

    return [name in sys.modules for name in names]


#: what a worker with a short limit imports before its first call: the tiler and this module, so that unpickling
#: the functions above imports nothing (pytest, the test helpers) within the call's limit on a loaded machine
PRELOAD = ("wsi_screen.tiling.pipeline", __name__)


# --- the worker -----------------------------------------------------------------------------------------------
def test_crash_fails_the_call_and_the_worker_restarts(tmp_path: Path) -> None:
    with isolation.SlideWorker(timeout=30, log_path=tmp_path / "log") as worker:
        first = worker.call(_pid)
        with pytest.raises(SlideReaderCrashError, match=r"the slide reader crashed \(signal 11, SIGSEGV\)"):
            worker.call(_segfault)
        second = worker.call(_pid)
        assert first != second and second != os.getpid()
        with pytest.raises(ValueError, match="bad value in the child"):  # ordinary exceptions come back as such
            worker.call(_raises)
        assert worker.call(_pid) == second  # an exception does not cost the process


def test_hang_is_bounded_and_heartbeats_keep_slow_work_alive(tmp_path: Path) -> None:
    with isolation.SlideWorker(timeout=1.5, preload=PRELOAD) as worker:
        started = time.monotonic()
        with pytest.raises(SlideTimeoutError, match=r"no progress for 1.5 s"):
            worker.call(_sleep, 60)
        assert time.monotonic() - started < 10
        assert worker.call(_beating, 3.0) == "done"  # longer than the limit, but progressing
        assert worker.call(_sleep, 0.1) == "slept"


def test_the_limit_counts_from_the_end_of_the_childs_imports_not_its_start() -> None:
    # the child's imports (the tiler's, this module's, then one that sleeps 3 s) take longer than this limit: they
    # must not count against the call (a fixed sleep, not the tiler's ~0.7 s, so that a loaded machine cannot
    # flip it)
    with isolation.SlideWorker(timeout=2.0, preload=(*PRELOAD, "tests.slide.slow_import")) as worker:
        assert worker.call(_sleep, 0.05) == "slept"
        assert worker.call(_imported, "wsi_screen.tiling.pipeline", "tests.slide.slow_import") == [True, True]


def test_child_output_reaches_the_log_not_the_terminal(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    log_path = tmp_path / LOG_NAME
    caplog.set_level(logging.DEBUG, logger="wsi_screen")
    with run_log(tmp_path), isolation.SlideWorker(log_path=log_path) as worker:
        assert worker.call(_noisy) == "ok"
    assert "a warning from the child" in caplog.text  # replayed through this process's logger
    text = log_path.read_text()
    assert "OpenSlide-WARNING **: native noise" in text and "a library warning" in text and "TiffFileError" in text
    captured = capfd.readouterr()
    assert "native noise" not in captured.err and "library warning" not in captured.err
    assert "TiffFileError" not in captured.err


def test_an_early_reader_has_imported_the_tiler_and_serves_the_next_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSI_SCREEN_IN_PROCESS", raising=False)
    monkeypatch.setattr(isolation, "_early", None)
    isolation.start_early("wsi_screen.tiling.pipeline", "wsi_screen.tiling.stain")
    early = isolation._early
    assert early is not None and early._proc is not None
    early_pid = early._proc.pid
    with run_log(tmp_path), isolation.slide_calls(30) as call:  # the run log opens after the child started
        assert call(_pid) == early_pid  # the same process: no second start-up
        assert call(_imported, "wsi_screen.tiling.pipeline", "zarr", "wsi_screen.tiling.stain") == [True] * 3
        assert call(_noisy) == "ok"
        call(_debug_line)
    assert isolation._early is None  # used once
    text = (tmp_path / LOG_NAME).read_text()  # native stderr and every level reach the log opened after the start
    assert "OpenSlide-WARNING **: native noise" in text and "a warning from the child" in text
    assert "a debug line from the child" in text
    with isolation.slide_calls(30) as call:  # no early reader: one starts at the first call, as before
        assert call(_pid) != early_pid


# --- whole runs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger slide (a second or more to tile) and a small one, in one folder."""
    folder = tmp_path_factory.mktemp("isolation")
    write_tiled_tiff(folder / "a-large.tif", block_image((3072, 3072), [(200, 200, 2900, 2900)], seed=3), mpp=0.5)
    write_tiled_tiff(folder / "b-small.tif", block_image((1536, 1024), [(100, 100, 1300, 900)], seed=4), mpp=0.5)
    return folder


def _signal_worker(sig: int, done: threading.Event, out: Path) -> threading.Thread:
    """Send ``sig`` to the slide reader's child process once it is busy with the first slide: past its start-up
    (a child stopped while importing would be waited for as long as a start-up may take, minutes) and holding
    the slide's store lock in ``out``."""

    def run() -> None:
        while not done.is_set():
            started = out.exists() and any(p.name != LOG_NAME for p in out.iterdir())
            for child in multiprocessing.active_children():
                if started and child.name == "wsi-screen-slide-reader" and child.pid:
                    os.kill(child.pid, sig)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("sig", "message"), [
    (signal.SIGSEGV, "the slide reader crashed (signal 11, SIGSEGV)"),
    (signal.SIGSTOP, "no progress for 3 s (a hung slide reader?)"),
])
def test_a_crashing_or_hanging_slide_fails_alone(two_slides: Path, tmp_path: Path, sig: int, message: str) -> None:
    sources, problems = discover([two_slides])
    assert [s.name for s in sources] == ["a-large", "b-small"] and not problems
    done = threading.Event()
    out = tmp_path / "out"
    watcher = _signal_worker(sig, done, out)
    with run_log(out):
        results = tile_slides(sources, out, TileConfig(slide_timeout=3), on_error="record")
    done.set()
    watcher.join(timeout=5)
    assert [r.status for r in results] == ["failed", "done"], results
    assert results[0].message.startswith(f"{two_slides / 'a-large.tif'}: {message}")
    assert not (out / "a-large.zarr").exists()  # no store marked complete (nothing left but the lock folder)
    small = PatchStore.open(out / "b-small.zarr")
    assert len(small) == results[1].n_patches > 10


def test_cli_unexpected_error_is_one_line_and_a_logged_traceback(tmp_path: Path, slides_dir: Path) -> None:
    """A damaged Aperio property key (a non-UTF-8 byte) used to stop the run with `internal error: KeyError`."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", folder / "good.svs")
    data = bytearray((slides_dir / "CMU-1-Small-Region.svs").read_bytes())
    at = data.index(b"|AppMag")
    data[at + 1] = 0xFF
    (folder / "key.svs").write_bytes(bytes(data))
    res = run_cli("tile", folder, "-o", tmp_path / "out", "--quiet")
    assert res.code == 0, res  # the damaged key is skipped; both slides tile
    assert res.err_lines == []
    assert PatchStore.open(tmp_path / "out" / "key.zarr").attrs["n_patches"] == \
        PatchStore.open(tmp_path / "out" / "good.zarr").attrs["n_patches"]


def test_a_child_that_died_between_calls_is_replaced_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Killed while idle (the OOM killer, a user's kill), the reader is replaced at the next call, which runs; the
    log says what happened. The child is named for ps and pgrep."""
    with isolation.SlideWorker(timeout=30, preload=PRELOAD) as worker:
        first = worker.call(_pid)
        assert Path(f"/proc/{first}/comm").read_text().strip() == isolation.PROCESS_NAME
        os.kill(first, signal.SIGSEGV)
        assert worker._proc is not None
        worker._proc.join(timeout=10)
        with caplog.at_level(logging.WARNING, logger="wsi_screen"):
            assert worker.call(_pid) != first
    assert "the slide reader stopped between reads (signal 11, SIGSEGV); a new one goes on" in caplog.text


def _bars_then_segfault() -> None:
    from wsi_screen import progress

    progress.set_enabled(True)
    for _ in progress.bar(range(3), desc="reading"):
        pass
    _segfault()


_CRASH_THEN_EXIT = """
from tests.slide import test_isolation as t
from wsi_screen.errors import SlideReaderCrashError
from wsi_screen.slide import isolation
with isolation.SlideWorker(timeout=30, preload=t.PRELOAD) as worker:
    try:
        worker.call(t._bars_then_segfault)
    except SlideReaderCrashError as exc:
        print(exc)
"""


_WRITE_THEN_KILL = """
import numcodecs
import numpy as np
from wsi_screen.slide import isolation
worker = isolation.SlideWorker(timeout=30)
print(len(worker.call(numcodecs.Blosc().encode, np.zeros(1000, np.uint8))) > 0)  # takes blosc's mutex there
worker._stop()  # killed mid-run, as after a Ctrl-C during `tile`
"""


def test_a_reader_killed_after_a_store_write_leaves_no_leaked_semaphore_warning_at_exit() -> None:
    """A Ctrl-C during `tile --codec jpegxl` printed the resource tracker's "1 leaked semaphore objects" after the
    interrupted line: the killed reader had made numcodecs' blosc mutex, registered under spawn."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _WRITE_THEN_KILL], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and res.stdout.split() == ["True"], res
    assert "leaked semaphore" not in res.stderr and "resource_tracker" not in res.stderr, res.stderr


def test_a_crashed_reader_leaves_no_leaked_semaphore_warning_at_exit() -> None:
    """A reader killed after showing a bar held tqdm's lock; the run's exit must not print Python's resource
    tracker warning about leaked semaphores (the child's bars use a thread lock)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _CRASH_THEN_EXIT], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert "the slide reader crashed (signal 11, SIGSEGV)" in res.stdout
    assert "leaked semaphore" not in res.stderr and "resource_tracker" not in res.stderr, res.stderr
