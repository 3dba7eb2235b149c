"""Shared fixtures. Tests use the real data in ../shared/data (or $WSI_SCREEN_DATA)."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

# No model hub, ever: a pretrained=True call must fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Several xdist workers on a small machine: each takes its share of the cores for torch and OpenMP. Left at
# torch's default (every core, per process) they oversubscribe them: on 2 cores the suite took 8 min 31 s with
# 2 threads in each of the 2 workers, 7 min 37 s with 1. Subprocesses the tests start inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    if "torch" in sys.modules:  # imported before this file (a plugin): the variable came too late for it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

#: test modules that read slides in the supervised child process, as a user's run does (crash and hang
#: containment, corrupt and hostile files); every other test reads slides in the test's own process
#: (WSI_SCREEN_IN_PROCESS=1: the same code, ~1 s less per `tile`/`infer` call). The processes the kill and
#: concurrency tests kill or race (tests/warm_cli.py) read in the child, as a user's do, wherever they run.
CHILD_PROCESS_MODULES = frozenset({
    "tests.slide.test_isolation", "tests.slide.test_discovery", "tests.slide.readers.test_sanity",
    "tests.features.test_fuzz", "tests.features.test_hardening_unsafe",
})

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSI_SCREEN_DATA", REPO.parent / "shared" / "data"))
SLIDES = DATA / "slides"
PATCHES = DATA / "patches"
EXAMPLE_SLIDE = REPO / "examples" / "CMU-1-Small-Region.svs"


class BackgroundCheck:
    """A command started now, whose exit status and output a test collects later (:meth:`result`)."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, scratch: Path | None = None) -> None:
        # a file, not a pipe: a full pipe would stop the command until collected; closed by stop()
        self.output = tempfile.TemporaryFile()  # noqa: SIM115
        self.scratch = scratch  # a folder of the command's own, removed by stop()
        # niced: it takes the time the tests leave idle, not the time of tests that measure their own
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.output, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=lambda: os.nice(10))

    def result(self, timeout: float) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.output.seek(0)
        return code, self.output.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.output.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _mypy() -> BackgroundCheck:
    return BackgroundCheck([sys.executable, "-m", "mypy"])


def _embed_with_the_hub_unreachable() -> BackgroundCheck:
    """`embed` online (HF_HUB_OFFLINE unset) with the hub unreachable (a closed local port as HF_ENDPOINT): a
    process of its own, as huggingface_hub reads HF_ENDPOINT when imported. It spends ~25 s waiting between
    huggingface_hub's retries, so it runs beside the tests before its own."""
    scratch = Path(tempfile.mkdtemp(prefix="wsi-screen-unreachable-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(scratch / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(REPO))
    return BackgroundCheck([sys.executable, "-m", "wsi_screen.cli", "embed", str(EXAMPLE_SLIDE), "--encoder",
                            "hf-hub:nobody/absent", "-o", str(scratch / "e")], env=env, scratch=scratch)


#: commands that mostly wait on one core (mypy) or on nothing (huggingface_hub's back-off), by the test that
#: collects them: started once the session's tests are chosen, when they include that test
BACKGROUND = {"tests/test_quality.py::test_mypy": _mypy,
              "tests/models/test_encoder.py::test_unreachable_hub_is_one_line": _embed_with_the_hub_unreachable}
_started: dict[str, BackgroundCheck] = {}
#: under pytest-xdist the controller runs them (once, whichever worker collects the test) and writes what they
#: printed and their exit status into this folder, which the workers inherit
_SHARED = "WSI_SCREEN_TEST_BACKGROUND"


class _SharedCheck:
    """A background check the xdist controller runs, collected from its files by the worker that runs the test."""

    def __init__(self, folder: Path, nodeid: str) -> None:
        self.stem = folder / hashlib.sha256(nodeid.encode()).hexdigest()[:16]

    def result(self, timeout: float) -> tuple[int, str]:
        status = self.stem.with_suffix(".rc")
        for _ in range(int(timeout * 10)):
            if status.exists():
                return int(status.read_text()), self.stem.with_suffix(".out").read_bytes().decode(errors="replace")
            time.sleep(0.1)
        raise TimeoutError(f"{self.stem}: no exit status after {timeout} s")


def _worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def background(nodeid: str) -> BackgroundCheck | _SharedCheck:
    """The session's run of ``BACKGROUND[nodeid]``: started when the tests were chosen (by the xdist controller
    when there is one), or now."""
    if _worker() and os.environ.get(_SHARED):
        return _SharedCheck(Path(os.environ[_SHARED]), nodeid)
    if nodeid not in _started:
        _started[nodeid] = BACKGROUND[nodeid]()
    return _started[nodeid]


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist 3.8 hands the modules out in an order of its own (most tests first, --loadscope-reorder, on by
    # default), which put most of LONGEST_MODULES last; the order pytest_collection_modifyitems gives them stands
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False
    if not _worker():
        os.environ[_SHARED] = tempfile.mkdtemp(prefix="wsi-screen-tests-")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """The controller: start each chosen background check once, its output and status going to the shared folder."""
    folder = Path(os.environ[_SHARED])
    for nodeid in ids:
        if nodeid in BACKGROUND and nodeid not in _started:
            check = _started[nodeid] = BACKGROUND[nodeid]()
            threading.Thread(target=_write_result, args=(check, _SharedCheck(folder, nodeid).stem),
                             daemon=True).start()


def _write_result(check: BackgroundCheck, stem: Path) -> None:
    code, output = check.result(timeout=3600)
    stem.with_suffix(".out").write_text(output)
    stem.with_suffix(".rc.tmp").write_text(str(code))
    stem.with_suffix(".rc.tmp").rename(stem.with_suffix(".rc"))  # the status last: the output is complete


#: session fixtures too costly to build on each xdist worker, by the test modules that use them: each group of
#: modules is one unit of work (:func:`scope`), run on one worker, so the fixture is built once a session (with
#: --dist loadscope, the README's command; pytest_collection_modifyitems refuses a module that uses one and is not
#: listed). `synthetic` (tests/screening/conftest.py): six slides written and `infer` on them, ~20 s.
SHARED_FIXTURES = {"synthetic": ("tests/screening/test_run.py", "tests/screening/test_runview.py",
                                 "tests/screening/test_report.py")}
_UNIT = {module: modules[0] for modules in SHARED_FIXTURES.values() for module in modules}


def scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or the first module of its SHARED_FIXTURES group."""
    module = nodeid.split("::", 1)[0]
    return _UNIT.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadscope over :func:`scope`: whole modules, and each SHARED_FIXTURES group as one (xdist's own
    splits at the last '::', a test id with '::' in its parameters included)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

    return UnitScheduling(config, log)


#: the units of work (:func:`scope`) that take longest, longest first: run first, then the others by how many tests
#: they hold (most first), so that the two xdist workers, which take whole units in this order, end together on
#: short ones rather than one of them still running a long one while the other idles. Every unit over 10 s, with
#: its seconds (the sum of its tests' durations) in two runs of the whole suite at c5e737e on 2 cores (~1000 s in
#: all; test_run.py's unit with one build of `synthetic`); the others take under 10 s each.
LONGEST_MODULES = (
    "tests/features/test_hardening_kill.py",           # 91
    "tests/screening/test_run.py",                     # 88
    "tests/test_distributed.py",                       # 72
    "tests/test_api.py",                               # 59
    "tests/tiling/test_pipeline.py",                   # 59
    "tests/screening/test_recalibrate.py",             # 52
    "tests/features/test_hardening_concurrency.py",    # 49
    "tests/embedding/test_embed.py",                   # 45
    "tests/features/test_slide_rule_size.py",          # 40
    "tests/training/test_heads.py",                    # 36
    "tests/features/test_hardening_disk.py",           # 34
    "tests/slide/test_isolation.py",                   # 33
    "tests/features/test_trust.py",                    # 27
    "tests/tiling/test_stain.py",                      # 21
    "tests/features/test_hardening_inputs.py",         # 21
    "tests/training/test_checkpoint.py",               # 21
    "tests/features/test_notebook.py",                 # 19
    "tests/training/test_train.py",                    # 16
    "tests/commands/test_classifier.py",               # 16
    "tests/screening/test_streaming_isolation.py",     # 15
    "tests/features/test_fuzz.py",                     # 14
    "tests/screening/test_callview.py",                # 14
    "tests/slide/test_slide.py",                       # 11
)


def _check_the_lists(items: list[pytest.Item]) -> None:
    """LONGEST_MODULES and SHARED_FIXTURES name test modules that exist, the latter every one that uses its fixture."""
    missing = [module for module in (*LONGEST_MODULES, *_UNIT) if not (REPO / module).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py names test modules that do not exist: {', '.join(missing)}")
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        for name, modules in SHARED_FIXTURES.items():
            if name in getattr(item, "fixturenames", ()) and module not in modules:
                raise pytest.UsageError(f"{module} uses the fixture {name!r}: add it to tests/conftest.py's "
                                        f"SHARED_FIXTURES[{name!r}] (or it is built again on another worker)")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _check_the_lists(items)
    rank = {unit: i for i, unit in enumerate(LONGEST_MODULES)}
    sizes = Counter(scope(item.nodeid) for item in items)

    def order(item: pytest.Item) -> tuple[int, int, str]:
        unit = scope(item.nodeid)
        return rank.get(unit, len(rank)), -sizes[unit], unit

    items.sort(key=order)  # stable: a module's tests stay together, in their order, and a unit's modules too
    if _worker():  # under xdist the controller starts them (pytest_xdist_node_collection_finished)
        return
    for item in items:
        if item.nodeid in BACKGROUND:
            background(item.nodeid)


def pytest_sessionfinish() -> None:
    for check in _started.values():
        check.stop()


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _worker():
        shutil.rmtree(os.environ.pop(_SHARED, ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _slide_reader_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.module.__name__ not in CHILD_PROCESS_MODULES:
        monkeypatch.setenv("WSI_SCREEN_IN_PROCESS", "1")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set WSI_SCREEN_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return _require(SLIDES)


@pytest.fixture(scope="session")
def patches_dir() -> Path:
    return _require(PATCHES)


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    return _require(SLIDES / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def example_slide() -> Path:
    return _require(EXAMPLE_SLIDE)


class CliResult:
    """Exit code and captured streams of one in-process ``wsi-screen`` invocation."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


def run_cli(*args: str) -> CliResult:
    """Run the real console-script entry point (``wsi_screen.cli.main``) in-process (it leaves the process's
    logging, bars and slide reader as it found them: tests/test_cli.py checks that)."""
    import contextlib
    import io

    from wsi_screen.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def coordinates_only_store_of_a_moved_slide(slide: Path, tmp_path: Path) -> tuple[Path, Path]:
    """``slide`` copied to ``tmp_path/a``, tiled there into a coordinates-only store (``tmp_path/stores``, the
    bundled model's 96 px at 0.972 um/px), then moved to ``tmp_path/b`` under the same name: (stores, moved slide)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(slide, tmp_path / "a" / slide.name)
    stores = tmp_path / "stores"
    assert run_cli("tile", tmp_path / "a" / slide.name, "-o", stores, "--pixels", "none", "--mpp", "0.972",
                   "--size", "96", "--quiet").code == 0
    return stores, (tmp_path / "a" / slide.name).rename(tmp_path / "b" / slide.name)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory, example_slide: Path) -> Path:
    """A fresh `wsi-screen infer` run of the bundled example slide with the bundled model."""
    run = tmp_path_factory.mktemp("demo") / "run"
    res = run_cli("infer", example_slide.parent, "-o", run, "--workers", "0", "--quiet")
    if res.code != 0:
        pytest.fail(f"demo infer failed: {res}")
    return run


def tree_digest(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path, except ``skip`` and the run log (an append-only
    diary with time stamps, see wsi_screen.runlog): what "byte-identical outputs" compares."""
    from wsi_screen.runlog import LOG_NAME

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOG_NAME and str(p.relative_to(root)) not in skip}


def read_results(run: Path) -> dict[str, dict[str, str]]:
    """A run folder's results.csv, by slide name."""
    with (run / "results.csv").open(newline="", encoding="utf-8") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


def dicom_series_copy(slides_dir: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of the CMU DICOM series in ``folder``; returns it and its level-0 (largest) file."""
    shutil.copytree(slides_dir / "CMU-1-Small-Region dicom", folder)
    return folder, max(folder.glob("*.dcm"), key=lambda p: p.stat().st_size)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local Hugging Face hub cache as HF_HOME, offline (tests/hub.py writes models into it)."""
    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
