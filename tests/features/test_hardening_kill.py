"""Killed runs: SIGKILL `tile` and `infer` at random moments, check nothing incomplete looks complete, resume,
and compare with an uninterrupted run. SIGINT exits 130 with a message.

Each trial starts a fresh ``python -m wsi_screen.cli`` process on a fresh output and kills it a delay after its
first write (the first ``*.partial``): the delay is drawn (seeded) over the working time of an uninterrupted
reference run (first write to exit), stratified (trial i of the first n in the i-th n-th of that time, uniformly
after), so that a few kills land in every stage rather than in the import of torch. It then inspects what the
process left, reruns to completion in-process and compares:

* ``tile``: every store byte for byte (every file of the zarr tree) with the uninterrupted run's;
* ``infer``: every store byte for byte; ``results.csv`` exactly (the ``store`` column with the run folder
  replaced by ``RUN``); each slide's ``scores.csv``, ``patches.geojson`` and ``heatmap.png`` byte for byte and its
  ``slide.json`` without the store path; ``run.json`` without its timings, command line and which slides were
  reused. ``report.html`` holds a timestamp and the provenance (timings): it is checked to be whole and to name
  every slide, not compared.

Right after a kill: a ``<name>.zarr`` that exists opens as complete and equals the reference store; a
``<name>.zarr.partial`` is marked incomplete (or, in the instant between marking and renaming, is already
identical to the reference); a slide folder that exists holds all four files with the reference's scores;
``results.csv`` and ``run.json``, when present, parse.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import run_cli, tree_digest
from tests.factory import block_image, write_tiled_tiff
from wsi_screen.errors import IncompleteStoreError
from wsi_screen.screening import runfolder
from wsi_screen.tiling.store import PatchStore, read_attrs

pytestmark = pytest.mark.slow

SEED = 1234
SLIDE_FILES = ("scan.svs", "block.tif")
#: trials per command: at least MIN (one in each MIN-th of the window), at most MAX, and no new trial once BUDGET
#: seconds have passed; WSI_SCREEN_KILL_TRIALS=N runs exactly N of each (a soak run, as quoted in
#: docs/reliability.md). The suite runs the stratified trials only (MAX = MIN): they already put one kill in each
#: quarter (tile) or third (infer) of the working time, so every stage is within reach; the uniform extra trials
#: added no stage the stratified ones miss and cost a subprocess start (and, for infer, a torch import) each.
TILE_TRIALS, INFER_TRIALS = (4, 4, 20.0), (3, 3, 30.0)
if os.environ.get("WSI_SCREEN_KILL_TRIALS"):
    _n = int(os.environ["WSI_SCREEN_KILL_TRIALS"])
    TILE_TRIALS = INFER_TRIALS = (_n, _n, float("inf"))


def stores_of(folder: Path) -> dict[str, dict[str, str]]:
    return {p.name: tree_digest(p) for p in sorted(folder.glob("*.zarr"))}


def _two_slides(folder: Path, cmu_svs: Path, size: tuple[int, int]) -> Path:
    """The real CMU SVS and a tiled TIFF of ``size`` with tissue nearly everywhere."""
    folder.mkdir(parents=True)
    shutil.copy(cmu_svs, folder / SLIDE_FILES[0])
    w, h = size
    write_tiled_tiff(folder / SLIDE_FILES[1], block_image(size, [(128, 128, w - 128, h - 128)], seed=9), mpp=0.5)
    return folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    return _two_slides(tmp_path_factory.mktemp("kill") / "slides", cmu_svs, (2560, 2048))


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    """For infer and embed, whose every trial pays for importing torch and whose every patch goes through a model: a
    smaller second slide."""
    return _two_slides(tmp_path_factory.mktemp("kill") / "small", cmu_svs, (1536, 1024))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled model: runs compared with each other must use the same model, even if the bundled
    one is replaced while the tests run."""
    from wsi_screen.models import default_model_dir

    return Path(shutil.copytree(default_model_dir(), tmp_path_factory.mktemp("model") / "default"))


def _spawn(args: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    """``python -m wsi_screen.cli ARGS`` with stderr going to a file (a pipe could fill up and block it).

    The child scores with this process's torch thread count (the in-process reruns' count): another count
    rounds the last digits of the probabilities differently.
    """
    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with stderr.open("wb") as err:
        # Ctrl-C as a user at a terminal has it: a test runner started in the background (`cmd &` in a script)
        # ignores SIGINT, and an ignored signal stays ignored across exec
        return subprocess.Popen([sys.executable, "-m", "wsi_screen.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=err, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@dataclass
class Timeline:
    """When an uninterrupted subprocess run first wrote under its output, and when it had written everything
    (seconds since it started)."""

    first_write: float
    end: float

    @property
    def work(self) -> float:
        """From the first write to the end: the window the kills are drawn from."""
        return self.end - self.first_write


def _timed_run(args: list[str], watch: Path, last: str | None = None) -> Timeline:
    """Run to completion: when it first wrote under ``watch`` and when it ended (when ``watch/last`` appeared,
    if given: a process that has written everything may take a while to exit)."""
    start = time.monotonic()
    log = watch.with_name(watch.name + ".stderr")
    proc = _spawn(args, log)
    first = _first_write(proc, watch)
    end = None
    while proc.poll() is None:
        if end is None and last is not None and (watch / last).exists():
            end = time.monotonic() - start
        time.sleep(0.02)
    assert proc.returncode == 0, log.read_text()
    return Timeline(first, end if end is not None else time.monotonic() - start)


@dataclass
class Trials:
    """What the kill trials met (printed, and quoted in docs/reliability.md)."""

    command: str
    timeline: Timeline
    moments: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    killed_mid_run: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        return (f"{self.command}: uninterrupted run wrote first at {self.timeline.first_write:.1f} s, everything "
                f"by {self.timeline.end:.1f} s; {len(self.moments)} kills at "
                f"{', '.join(f'{m:.2f}' for m in self.moments)} s; {self.killed_mid_run} mid-run; phases: "
                f"{'; '.join(self.phases)}; trials took {time.monotonic() - self.started:.0f} s")


def _kill_and_resume(tmp_path: Path, command: str, args_for: Callable[[Path], list[str]], timeline: Timeline,
                     window: Window, limits: tuple[int, int, float], phase_after_kill: Callable[[Path], str],
                     outputs: Callable[[Path], object], reference: object,
                     partials: Callable[[Path], list[Path]]) -> None:
    """Kill ``command`` at moments drawn from ``window``, check what the kill left (``phase_after_kill``
    asserts and names the stage), rerun to completion and require the uninterrupted run's ``outputs``."""
    trials = Trials(command, timeline)
    min_trials, max_trials, budget = limits
    for i in range(max_trials):
        if i >= min_trials and time.monotonic() - trials.started > budget:
            break
        out = tmp_path / f"trial{i}"
        args = args_for(out)
        kill = _kill_at(args, out, window.draw(i), tmp_path / f"trial{i}.stderr")
        window.update(kill)
        phase = phase_after_kill(out)
        trials.moments.append(kill.moment)
        trials.killed_mid_run += kill.mid_run
        trials.phases.append(phase if kill.mid_run else "finished")
        res = run_cli(*args)
        assert res.code == 0, res
        assert outputs(out) == reference, f"trial {i}: resumed {command} differs from the uninterrupted run"
        assert not partials(out)
    print(trials.summary())
    assert trials.killed_mid_run >= min_trials // 2


def _first_write(proc: subprocess.Popen[bytes], watch: Path, timeout: float = 120) -> float:
    """Wait until ``watch`` holds a ``*.partial`` (work under way) or the process ended; the time it took."""
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        if watch.exists() and any(watch.rglob("*.partial")):
            break
        time.sleep(0.02)
    return time.monotonic() - start


@dataclass
class Kill:
    """One kill: whether the process was still running, when (seconds since its start and since its first
    write)."""

    mid_run: bool
    moment: float
    after_first_write: float


def _kill_at(args: list[str], watch: Path, delay: float, log: Path) -> Kill:
    """Run, SIGKILL ``delay`` seconds after its first write under ``watch`` (unless it has finished by then)."""
    start = time.monotonic()
    proc = _spawn(args, log)
    first = _first_write(proc, watch)
    try:
        proc.wait(timeout=delay)
        mid = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid = True
    now = time.monotonic() - start
    return Kill(mid, now, now - first)


class Window:
    """Where kills are drawn: from a trial's first write to the end of the reference run's work, shrunk to
    what a trial that finished before its kill actually took (the machine may have sped up). Trial ``i`` of
    the first ``strata`` lands in the ``i``-th of that many equal parts of the window: few trials, every stage."""

    def __init__(self, timeline: Timeline, seed: int, strata: int) -> None:
        self.span = timeline.work
        self.rng = random.Random(seed)
        self.strata = strata

    def draw(self, i: int) -> float:
        if i < self.strata:
            return self.span * (i + self.rng.random()) / self.strata
        return self.rng.uniform(0, self.span)

    def update(self, kill: Kill) -> None:
        if not kill.mid_run:
            self.span = min(self.span, kill.after_first_write)


def _check_stores_after_kill(folder: Path, reference: dict[str, dict[str, str]]) -> tuple[int, bool]:
    """Nothing incomplete looks complete; returns (finished stores, a store was being written)."""
    if not folder.exists():
        return 0, False
    done = 0
    for store in folder.glob("*.zarr"):
        assert PatchStore.open(store).attrs["complete"] is True  # opens only when complete
        assert tree_digest(store) == reference[store.name], f"{store} looks complete but differs"
        done += 1
    partials = list(folder.glob("*.zarr.partial"))
    for partial in partials:
        attrs = read_attrs(partial)
        if attrs is not None and attrs.get("complete") is True:  # killed between marking and renaming
            assert tree_digest(partial) == reference[partial.name.removesuffix(".partial")]
        else:
            with pytest.raises((IncompleteStoreError, OSError)):
                PatchStore.open(partial)
    return done, bool(partials)


def test_kill_tile_at_random_moments(tmp_path: Path, slides: Path) -> None:
    common = ["--size", "224", "--workers", "1", "--quiet"]
    ref_out = tmp_path / "reference"
    timeline = _timed_run(["tile", str(slides), "-o", str(ref_out), *common], ref_out)
    reference = stores_of(ref_out)
    assert sorted(reference) == ["block.zarr", "scan.zarr"]

    def phase(out: Path) -> str:
        done, writing = _check_stores_after_kill(out, reference)
        return "both stores done" if done == 2 else \
            f"slide {done + 1}: " + ("writing its store" if writing else "thumbnail and grid")

    _kill_and_resume(tmp_path, "tile", lambda out: ["tile", str(slides), "-o", str(out), *common], timeline,
                     Window(timeline, SEED, TILE_TRIALS[0]), TILE_TRIALS, phase, stores_of, reference,
                     lambda out: list(out.glob("*.partial")))


# --------------------------------------------------------------------------------------------------- infer
def _results_normalised(run: Path) -> list[dict[str, str]]:
    with (run / runfolder.RESULTS_CSV).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["store"] = r["store"].replace(str(run), "RUN")
    return rows


def _slide_outputs(run: Path, name: str) -> dict[str, object]:
    folder = run / name
    out: dict[str, object] = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
                              for f in (runfolder.SCORES_CSV, runfolder.GEOJSON, runfolder.HEATMAP_PNG)}
    info = json.loads((folder / runfolder.SLIDE_JSON).read_text())
    info.pop("store")
    out["slide.json"] = info
    return out


def _run_json(run: Path) -> dict[str, object]:
    info = json.loads((run / runfolder.RUN_JSON).read_text())
    for key in ("started", "seconds", "total_seconds", "stages", "command"):
        info.pop(key)
    for slide in info["slides"]:  # whether a slide's scores came from an earlier (killed) run: history, as timings
        slide.pop("reused")
        slide.pop("seconds")
    return info


def _infer_outputs(run: Path) -> dict[str, object]:
    rows = _results_normalised(run)
    report = (run / runfolder.REPORT_HTML).read_text(encoding="utf-8")
    assert report.rstrip().endswith("</html>") and all(r["slide"] in report for r in rows)
    return {"results": rows, "run": _run_json(run), "stores": stores_of(run / runfolder.STORES_DIR),
            "slides": {r["slide"]: _slide_outputs(run, r["slide"]) for r in rows}}


def _check_run_after_kill(run: Path, reference: dict[str, object]) -> str:
    """Nothing incomplete looks complete in a killed run folder; returns the phase the kill hit."""
    ref_stores = reference["stores"]
    assert isinstance(ref_stores, dict)
    stores_done, storing = _check_stores_after_kill(run / runfolder.STORES_DIR, ref_stores)
    if not run.exists():
        return "startup"
    ref_slides = reference["slides"]
    assert isinstance(ref_slides, dict)
    folders = [p for p in run.iterdir() if p.is_dir() and p.name != runfolder.STORES_DIR
               and not p.name.startswith(".") and not p.name.endswith((runfolder.PARTIAL, ".old"))]
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == {runfolder.SCORES_CSV, runfolder.HEATMAP_PNG,
                                                      runfolder.GEOJSON, runfolder.SLIDE_JSON}, folder
        assert _slide_outputs(run, folder.name) == ref_slides[folder.name]
    writing_folder = any(run.glob(f"*{runfolder.PARTIAL}"))
    if (run / runfolder.RESULTS_CSV).exists():  # written last but one, atomically: whole or absent
        assert list(csv.DictReader(io.StringIO((run / runfolder.RESULTS_CSV).read_text(encoding="utf-8"))))
    if (run / runfolder.RUN_JSON).exists():
        json.loads((run / runfolder.RUN_JSON).read_text())
    if (run / runfolder.REPORT_HTML).exists():
        return "exiting (all written)"
    if (run / runfolder.RESULTS_CSV).exists():
        return "writing run.json and the report"
    if writing_folder:
        return f"slide {len(folders) + 1}: writing its folder"
    if storing:
        return f"slide {stores_done + 1}: writing its store"
    if stores_done > len(folders):
        return f"slide {len(folders) + 1}: scoring"
    if len(folders) == len(ref_slides):
        return "aggregating, writing results.csv"
    return f"slide {len(folders) + 1}: thumbnail and grid"


def test_kill_infer_at_random_moments(tmp_path: Path, small_slides: Path, model: Path) -> None:
    slides = small_slides
    common = ["--workers", "0", "--quiet", "--model", str(model)]
    ref_run = tmp_path / "reference"
    timeline = _timed_run(["infer", str(slides), "-o", str(ref_run), *common], ref_run, runfolder.REPORT_HTML)
    reference = _infer_outputs(ref_run)
    _kill_and_resume(tmp_path, "infer", lambda run: ["infer", str(slides), "-o", str(run), *common], timeline,
                     Window(timeline, SEED + 1, INFER_TRIALS[0]), INFER_TRIALS,
                     lambda run: _check_run_after_kill(run, reference),
                     _infer_outputs, reference,
                     lambda run: [*run.glob("*.partial"), *(run / runfolder.STORES_DIR).glob("*.partial")])


# ------------------------------------------------------------------------------------------------- SIGINT
def _interrupt_when(args: list[str], ready: Path, pattern: str, log: Path, timeout: float = 120) -> tuple[int, str]:
    """Run, wait until ``ready`` holds ``pattern`` (work under way), send SIGINT (Ctrl-C)."""
    proc = _spawn(args, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready.exists() and any(ready.glob(pattern)):
            break
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return proc.returncode, log.read_text()


@pytest.mark.parametrize("command", ["tile", "infer", "embed"])
def test_sigint_exits_130_cleanly(tmp_path: Path, slides: Path, small_slides: Path, command: str) -> None:
    if command != "tile":  # each patch is scored or embedded, in the rerun too: the smaller slides
        slides = small_slides
    out = tmp_path / "out"
    stores = out if command == "tile" else out / runfolder.STORES_DIR
    args = [command, str(slides), "-o", str(out), "--workers", "1" if command != "infer" else "0"]
    args += ["--encoder", "default"] if command == "embed" else []
    code, err = _interrupt_when(args, stores, "*.partial", tmp_path / "stderr")
    if command == "embed":  # its slide's patch store (tiled in the slide reader's child) and embeddings: no partial
        assert not [*out.glob("*.partial"), *stores.glob("*.partial")], err
    assert code == 130, err
    assert "Traceback" not in err
    assert "wsi-screen: interrupted" in err
    for partial in stores.glob("*.partial"):  # aborted: removed, or at least not marked complete
        attrs = read_attrs(partial)
        assert attrs is None or attrs.get("complete") is False
    for store in stores.glob("*.zarr"):
        assert PatchStore.open(store).attrs["complete"] is True
    res = run_cli(*args, "--quiet")
    assert res.code == 0, res
    assert not list(stores.glob("*.partial"))
    if command == "embed":
        assert sorted(p.name for p in out.glob("*.zarr*")) == ["block.zarr", "scan.zarr"]
