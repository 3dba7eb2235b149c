"""Killed runs: SIGKILL `tile` and `infer` at every stage of a run, check nothing incomplete looks complete,
resume, and compare with an uninterrupted run. SIGINT exits 130 with a message.

Each trial starts a ``wsi-screen`` process (:mod:`tests.warm_cli`: a process of its own, forked with torch already
imported, so that the trials pay for the work they interrupt rather than for importing torch) on a fresh output and
SIGKILLs it the moment its output shows that a stage has begun: one trial per stage, the stages read from what the
run writes, in order (a store begun, a store finished, a slide folder begun, a slide folder finished, results.csv,
report.html), so that every stage is hit whatever the machine's speed. ``WSI_SCREEN_KILL_TRIALS=N`` adds N kills
of each command at seeded random moments, drawn over the working time of an uninterrupted run (a soak). Each trial
then inspects what the process left, reruns to completion in-process and compares with an uninterrupted run:

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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import run_cli, tree_digest
from tests.factory import block_image, write_tiled_tiff
from tests.warm_cli import WarmCli, WarmProcess, warm_processes
from wsi_screen.errors import IncompleteStoreError
from wsi_screen.screening import runfolder
from wsi_screen.tiling.store import PatchStore, read_attrs

pytestmark = pytest.mark.slow

SEED = 1234
SLIDE_FILES = ("scan.svs", "block.tif")
#: WSI_SCREEN_KILL_TRIALS=N: N kills of each command at random moments after the one per stage (a soak run, as
#: quoted in docs/reliability.md)
SOAK_TRIALS = int(os.environ.get("WSI_SCREEN_KILL_TRIALS") or 0)


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
    """For infer and embed, whose every patch goes through a model: a smaller second slide."""
    return _two_slides(tmp_path_factory.mktemp("kill") / "small", cmu_svs, (1536, 1024))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled model: runs compared with each other must use the same model, even if the bundled
    one is replaced while the tests run."""
    from wsi_screen.models import default_model_dir

    return Path(shutil.copytree(default_model_dir(), tmp_path_factory.mktemp("model") / "default"))


@pytest.fixture(scope="module")
def cli() -> Iterator[WarmCli]:
    with warm_processes() as warm:
        yield warm


# ------------------------------------------------------------------------------------------ when to kill
def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


def _slide_folders(run: Path) -> list[Path]:
    """A run folder's finished slide folders."""
    if not run.exists():
        return []
    return [p for p in run.iterdir() if p.is_dir() and p.name != runfolder.STORES_DIR
            and not p.name.startswith(".") and not p.name.endswith((runfolder.PARTIAL, ".old"))]


def _began(out: Path) -> bool:
    """Work under way: ``out`` holds a ``*.partial``."""
    return out.exists() and any(out.rglob("*.partial"))


@dataclass(frozen=True)
class Moment:
    """When a trial's process is killed: ``delay`` seconds after its output first shows ``marker`` (``name``);
    ``aim``: the stage that a kill then lands in, as the trial's phase check names it (none for the soak's);
    ``or_before``: the stage before it, which a kill as a store is begun may read as: the ``.zarr.partial`` seen
    can be gone when the phase is checked (zarr's ``mode="w"`` clears the folder it has just made), and nothing
    else on disk tells the two apart."""

    name: str
    marker: Callable[[Path], bool]
    delay: float = 0.0
    aim: str | None = None
    or_before: str | None = None

    def landed(self, phase: str) -> bool:
        """Whether a kill whose trial reads ``phase`` landed in the stage it aimed at."""
        return phase in (self.aim, self.or_before)


#: `tile OUT`, by stage: each kill as soon as the stage's first write is on disk
TILE_MOMENTS = (
    Moment("slide 1's store begun", lambda out: _count(out, "*.zarr.partial") >= 1, aim="slide 1: writing its store",
           or_before="slide 1: thumbnail and grid"),
    Moment("slide 1's store done", lambda out: _count(out, "*.zarr") >= 1, aim="slide 2: thumbnail and grid"),
    Moment("slide 2's store begun", lambda out: _count(out, "*.zarr") >= 1 and _count(out, "*.zarr.partial") >= 1,
           aim="slide 2: writing its store", or_before="slide 2: thumbnail and grid"),
    Moment("both stores done", lambda out: _count(out, "*.zarr") >= 2, aim="both stores done"),
)


def _stores(run: Path) -> Path:
    return run / runfolder.STORES_DIR


#: `infer -o RUN`, by stage (slide 2's store, scoring and folder repeat slide 1's: killing there too adds only a
#: resumed slide 1, which "slide 1's folder done" has)
INFER_MOMENTS = (
    Moment("slide 1's store begun", lambda run: _count(_stores(run), "*.zarr.partial") >= 1,
           aim="slide 1: writing its store", or_before="slide 1: thumbnail and grid"),
    Moment("slide 1's store done", lambda run: _count(_stores(run), "*.zarr") >= 1, aim="slide 1: scoring"),
    Moment("slide 1's folder begun", lambda run: _count(run, f"*{runfolder.PARTIAL}") >= 1,
           aim="slide 1: writing its folder"),
    Moment("slide 1's folder done", lambda run: len(_slide_folders(run)) >= 1, aim="slide 2: thumbnail and grid"),
    Moment("results.csv written", lambda run: (run / runfolder.RESULTS_CSV).exists(),
           aim="writing run.json and the report"),
    Moment("report written", lambda run: (run / runfolder.REPORT_HTML).exists(), aim="exiting (all written)"),
)


@dataclass
class Timeline:
    """When an uninterrupted run first wrote under its output, and when it had written everything (seconds
    since it started)."""

    first_write: float
    end: float

    @property
    def work(self) -> float:
        """From the first write to the end: the window the soak's random kills are drawn from."""
        return self.end - self.first_write


def _timed_run(cli: WarmCli, args: list[str], watch: Path, last: str | None = None) -> Timeline:
    """Run to completion: when it first wrote under ``watch`` and when it ended (when ``watch/last`` appeared,
    if given: a process that has written everything may take a while to exit)."""
    start = time.monotonic()
    log = watch.with_name(watch.name + ".stderr")
    proc = cli.start(args, log)
    first = _wait_for(proc, watch, _began)
    end = None
    while proc.poll() is None:
        if end is None and last is not None and (watch / last).exists():
            end = time.monotonic() - start
        time.sleep(0.02)
    assert proc.returncode == 0, log.read_text()
    return Timeline(first, end if end is not None else time.monotonic() - start)


@dataclass
class Kill:
    """One kill: at which moment, whether the process was still running, when (seconds since its start and since
    its marker)."""

    moment: Moment
    mid_run: bool
    seconds: float
    after_marker: float


class Window:
    """Where the soak's kills are drawn: from a trial's first write to the end of the reference run's work,
    shrunk to what a trial that finished before its kill actually took (the machine may have sped up). Trial
    ``i`` of the first ``strata`` lands in the ``i``-th of that many equal parts of the window, uniformly after."""

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
            self.span = min(self.span, kill.after_marker)


@dataclass
class Trials:
    """What the kill trials met (printed, and quoted in docs/reliability.md)."""

    command: str
    kills: list[Kill] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def killed_mid_run(self) -> int:
        return sum(k.mid_run for k in self.kills)

    def summary(self) -> str:
        kills = "; ".join(f"{k.moment.name} +{k.moment.delay:.2f} s -> {phase} at {k.seconds:.2f} s"
                          for k, phase in zip(self.kills, self.phases, strict=True))
        return (f"{self.command}: {len(self.kills)} kills, {self.killed_mid_run} mid-run: {kills}; trials took "
                f"{time.monotonic() - self.started:.0f} s")


def _soak(cli: WarmCli, args: list[str], watch: Path, last: str | None, seed: int,
          trials: Trials) -> Iterator[Moment]:
    """``SOAK_TRIALS`` random moments over an uninterrupted run's working time (stratified: the first few one in
    each part of it), each after the process's first write."""
    window = Window(_timed_run(cli, args, watch, last), seed, strata=4)
    for i in range(SOAK_TRIALS):
        if i:
            window.update(trials.kills[-1])
        yield Moment(f"random {i}", _began, window.draw(i))


def _wait_for(proc: WarmProcess, out: Path, marker: Callable[[Path], bool], timeout: float = 120) -> float:
    """Wait until ``marker(out)`` holds or the process ended; the time it took."""
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        if marker(out):
            break
        time.sleep(0.005)
    return time.monotonic() - start


def _kill_at(cli: WarmCli, args: list[str], out: Path, moment: Moment, log: Path) -> Kill:
    """Run, SIGKILL ``moment.delay`` seconds after ``moment.marker`` holds on ``out`` (unless it has finished)."""
    start = time.monotonic()
    proc = cli.start(args, log)
    reached = _wait_for(proc, out, moment.marker)
    try:
        if moment.delay:
            proc.wait(timeout=moment.delay)
        mid = proc.poll() is None
    except subprocess.TimeoutExpired:
        mid = True
    if mid:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    now = time.monotonic() - start
    return Kill(moment, mid, now, now - reached)


def _kill_and_resume(tmp_path: Path, cli: WarmCli, command: str, args_for: Callable[[Path], list[str]],
                     moments: Sequence[Moment], soak: Callable[[Trials], Iterator[Moment]],
                     phase_after_kill: Callable[[Path], str], outputs: Callable[[Path], object], reference: object,
                     partials: Callable[[Path], list[Path]]) -> None:
    """Kill ``command`` at each of ``moments`` (then at the soak's), check what the kill left
    (``phase_after_kill`` asserts and names the stage), rerun to completion and require the uninterrupted run's
    ``outputs``."""
    trials = Trials(command)

    def every() -> Iterator[Moment]:
        yield from moments
        if SOAK_TRIALS:
            yield from soak(trials)

    for i, moment in enumerate(every()):
        out = tmp_path / f"trial{i}"
        args = args_for(out)
        kill = _kill_at(cli, args, out, moment, tmp_path / f"trial{i}.stderr")
        phase = phase_after_kill(out)
        trials.kills.append(kill)
        trials.phases.append(phase if kill.mid_run else "finished")
        res = run_cli(*args)
        assert res.code == 0, res
        assert outputs(out) == reference, f"trial {i} ({moment.name}): resumed {command} differs from the " \
                                          "uninterrupted run"
        assert not partials(out)
    print(trials.summary())
    # one kill per stage, each as the stage begins: each lands mid-run in the stage it aims at, but the last, which
    # aims at a process that has written everything and is exiting, and may have exited before the kill arrives
    landed = list(zip(moments, trials.phases, strict=False))
    *before_last, (last, last_phase) = landed
    assert [(m.name, phase) for m, phase in before_last if not m.landed(phase)] == [], trials.summary()
    assert last.landed(last_phase) or last_phase == "finished", trials.summary()


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


def test_kill_tile_at_every_stage(tmp_path: Path, slides: Path, cli: WarmCli) -> None:
    common = ["--size", "224", "--workers", "1", "--quiet"]
    ref_out = tmp_path / "reference"
    assert run_cli("tile", slides, "-o", ref_out, *common).code == 0
    reference = stores_of(ref_out)
    assert sorted(reference) == ["block.zarr", "scan.zarr"]

    def phase(out: Path) -> str:
        done, writing = _check_stores_after_kill(out, reference)
        return "both stores done" if done == 2 else \
            f"slide {done + 1}: " + ("writing its store" if writing else "thumbnail and grid")

    def args(out: Path) -> list[str]:
        return ["tile", str(slides), "-o", str(out), *common]

    _kill_and_resume(tmp_path, cli, "tile", args, TILE_MOMENTS,
                     lambda trials: _soak(cli, args(tmp_path / "timed"), tmp_path / "timed", None, SEED, trials),
                     phase, stores_of, reference, lambda out: list(out.glob("*.partial")))


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
    folders = _slide_folders(run)
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


def test_kill_infer_at_every_stage(tmp_path: Path, small_slides: Path, model: Path, cli: WarmCli) -> None:
    slides = small_slides
    common = ["--workers", "0", "--quiet", "--model", str(model)]
    ref_run = tmp_path / "reference"
    assert run_cli("infer", slides, "-o", ref_run, *common).code == 0
    reference = _infer_outputs(ref_run)

    def args(run: Path) -> list[str]:
        return ["infer", str(slides), "-o", str(run), *common]

    _kill_and_resume(tmp_path, cli, "infer", args, INFER_MOMENTS,
                     lambda trials: _soak(cli, args(tmp_path / "timed"), tmp_path / "timed", runfolder.REPORT_HTML,
                                          SEED + 1, trials),
                     lambda run: _check_run_after_kill(run, reference), _infer_outputs, reference,
                     lambda run: [*run.glob("*.partial"), *(run / runfolder.STORES_DIR).glob("*.partial")])


# ------------------------------------------------------------------------------------------------- SIGINT
def _interrupt_when(cli: WarmCli, args: list[str], ready: Path, pattern: str, log: Path,
                    timeout: float = 120) -> tuple[int, str]:
    """Run, wait until ``ready`` holds ``pattern`` (work under way), send SIGINT (Ctrl-C)."""
    proc = cli.start(args, log)
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
def test_sigint_exits_130_cleanly(tmp_path: Path, slides: Path, small_slides: Path, cli: WarmCli,
                                  command: str) -> None:
    if command != "tile":  # each patch is scored or embedded, in the rerun too: the smaller slides
        slides = small_slides
    out = tmp_path / "out"
    stores = out if command == "tile" else out / runfolder.STORES_DIR
    args = [command, str(slides), "-o", str(out), "--workers", "1" if command != "infer" else "0"]
    args += ["--encoder", "default"] if command == "embed" else []
    code, err = _interrupt_when(cli, args, stores, "*.partial", tmp_path / "stderr")
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
