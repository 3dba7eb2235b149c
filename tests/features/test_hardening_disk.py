"""Disk full and write errors, injected: ``OSError(ENOSPC)`` from zarr's file writer or from ``fsync`` (where
network filesystems report a full disk or quota), or from matplotlib writing the heatmap.

Each must give clean error lines (no traceback, no "internal error"), exit 1, leave nothing marked complete
that is not, and a rerun once space is back must give the uninterrupted result.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr.storage._local as zarr_local

from tests.conftest import run_cli, tree_digest
from tests.factory import block_image, write_tiled_tiff
from wsi_screen.screening import runfolder
from wsi_screen.tiling.store import PatchStore, read_attrs

ERROR = "wsi-screen: error: "


@pytest.fixture(autouse=True)
def _read_slides_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The faults are patched into this process: read slides here, not in the slide reader's child process."""
    monkeypatch.setenv("WSI_SCREEN_IN_PROCESS", "1")


def enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("disk") / "slides"
    folder.mkdir()
    write_tiled_tiff(folder / "s.tif", block_image((1536, 1024), [(64, 64, 1472, 960)], seed=2), mpp=0.5)
    return folder


class ZarrWrites:
    """Counts zarr's file writes; makes write number ``fail_at`` (1-based) raise ENOSPC."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self._put = zarr_local._put

    def __call__(self, path: Path, value: object, exclusive: bool = False) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            raise enospc(path)
        return self._put(path, value, exclusive=exclusive)  # type: ignore[arg-type]


def _no_complete_store(out: Path) -> None:
    for p in out.glob("*.zarr*"):
        if p.name.endswith(".zarr"):
            pytest.fail(f"{p} exists after a failed write")
        attrs = read_attrs(p)
        assert attrs is None or attrs.get("complete") is False, p


def test_disk_full_while_tiling(tmp_path: Path, slide_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = tmp_path / "clean"
    counter = ZarrWrites()
    monkeypatch.setattr(zarr_local, "_put", counter)
    assert run_cli("tile", slide_dir, "-o", clean, "--quiet").code == 0
    n = counter.calls
    assert n >= 10
    # the first write (the group), one in the middle (a patch shard or table), the last (the "complete" flag)
    for fail_at in sorted({1, n // 2, n - 1, n}):
        out = tmp_path / f"fail{fail_at}"
        monkeypatch.setattr(zarr_local, "_put", ZarrWrites(fail_at))
        res = run_cli("tile", slide_dir, "-o", out, "--quiet")
        assert res.code == 1, (fail_at, res)
        assert res.err_lines == [f"{ERROR}{out / 's.zarr'}: disk full while writing the store; nothing was marked "
                                 "complete"], (fail_at, res.err)
        _no_complete_store(out)
        monkeypatch.setattr(zarr_local, "_put", counter._put)
        assert run_cli("tile", slide_dir, "-o", out, "--quiet").code == 0
        assert tree_digest(out / "s.zarr") == tree_digest(clean / "s.zarr")


def test_disk_full_writing_a_patch_shard(tmp_path: Path, slide_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """store.StoreWriter writes whole patch shards itself (not through zarr): the same guarantee there."""
    from wsi_screen.tiling import store

    out = tmp_path / "out"
    real = store._write_parts
    hits = []

    def write_parts(path: Path, parts: list[bytes]) -> None:
        if f"{os.sep}patches{os.sep}c" in str(path):
            hits.append(path)
            raise enospc(path)
        real(path, parts)

    monkeypatch.setattr(store, "_write_parts", write_parts)
    res = run_cli("tile", slide_dir, "-o", out, "--quiet")
    assert hits  # the shard writer was reached and failed
    assert res.code == 1, res
    assert res.err_lines == [f"{ERROR}{out / 's.zarr'}: disk full while writing the store; nothing was marked "
                             "complete"]
    _no_complete_store(out)
    monkeypatch.undo()
    assert run_cli("tile", slide_dir, "-o", out, "--quiet").code == 0


class FsyncFails:
    """``os.fsync`` raising ENOSPC for files whose path ``matches`` (the path read back from /proc/self/fd)."""

    def __init__(self, matches: Callable[[str], bool]) -> None:
        self.matches = matches
        self.hits = 0
        self._fsync = os.fsync

    def __call__(self, fd: int) -> None:
        try:
            path = str(Path(f"/proc/self/fd/{fd}").readlink())
        except OSError:
            path = ""
        if self.matches(path):
            self.hits += 1
            raise enospc()
        self._fsync(fd)


def test_disk_full_when_committing_a_store(tmp_path: Path, slide_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    fails = FsyncFails(lambda p: "/patches/" in p and ".zarr.partial/" in p)
    monkeypatch.setattr(os, "fsync", fails)
    res = run_cli("tile", slide_dir, "-o", out, "--quiet")
    assert fails.hits == 1 and res.code == 1, res
    assert res.err_lines == [f"{ERROR}{out / 's.zarr'}: disk full while writing the store; nothing was marked "
                             "complete"]
    _no_complete_store(out)
    monkeypatch.setattr(os, "fsync", fails._fsync)
    assert run_cli("tile", slide_dir, "-o", out, "--quiet").code == 0
    assert PatchStore.open(out / "s.zarr").attrs["complete"] is True


def _run_files(run: Path) -> dict[str, str]:
    """What a finished run holds, timestamps aside: per-slide files, results.csv (run.json, report.html: present)."""
    files = tree_digest(run / "s") if (run / "s").exists() else {}
    files = {f"s/{k}": v for k, v in files.items() if k != runfolder.SLIDE_JSON}
    if (run / runfolder.RESULTS_CSV).exists():
        files["results.csv"] = (run / runfolder.RESULTS_CSV).read_text().replace(str(run), "RUN")
    for name in (runfolder.RUN_JSON, runfolder.REPORT_HTML):
        if (run / name).exists():
            files[name] = "present"
    return files


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled model: runs compared with each other must use the same model."""
    from wsi_screen.models import default_model_dir

    return Path(shutil.copytree(default_model_dir(), tmp_path_factory.mktemp("model") / "default"))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, slide_dir: Path, model: Path) -> dict[str, str]:
    run = tmp_path_factory.mktemp("disk-clean") / "run"
    assert run_cli("infer", slide_dir, "-o", run, "--quiet", "--workers", "0", "--model", model).code == 0
    return _run_files(run)


def _raise_on_savefig(*_args: object, **_kwargs: object) -> None:
    raise enospc("heatmap.png")


@pytest.mark.parametrize("target", ["slide folder", "heatmap", "results.csv", "report.html"])
def test_disk_full_while_writing_the_run_folder(tmp_path: Path, slide_dir: Path, clean_run: dict[str, str],
                                                model: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    run = tmp_path / "run"
    if target == "heatmap":
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        monkeypatch.setattr(Figure, "savefig", _raise_on_savefig)
        monkeypatch.setattr(FigureCanvasAgg, "print_png", _raise_on_savefig)  # heatmap.save_png's one-draw path
    else:
        pattern = {"slide folder": "/s.partial/", "results.csv": "/.results.csv.",
                   "report.html": "/.report.html."}[target]
        monkeypatch.setattr(os, "fsync", FsyncFails(lambda p: pattern in p))
    res = run_cli("infer", slide_dir, "-o", run, "--quiet", "--workers", "0", "--model", model)
    assert res.code == 1, res
    assert "Traceback" not in res.err and "internal error" not in res.err
    errors = [line for line in res.err_lines if line.startswith(ERROR)]
    assert len(errors) == 1 and "disk full" in errors[0], res.err
    assert not [line for line in res.err_lines if not line.startswith(("wsi-screen: error: ",
                                                                       "wsi-screen: warning: "))]
    # nothing looks finished that is not: no slide folder unless whole, no partial, no stray temporary file
    if (run / "s").exists():
        assert {p.name for p in (run / "s").iterdir()} == {"scores.csv", "heatmap.png", "patches.geojson",
                                                           "slide.json"}
    assert not list(run.glob("*.partial")) and not list(run.glob(".*.tmp"))
    if target == "results.csv":  # the run stopped there: no report of a run that did not finish
        assert not (run / runfolder.REPORT_HTML).exists()
    if target in ("slide folder", "heatmap"):  # the slide failed, the run went on and says so
        assert "s,error," in (run / runfolder.RESULTS_CSV).read_text()
    monkeypatch.undo()
    res = run_cli("infer", slide_dir, "-o", run, "--quiet", "--workers", "0", "--model", model)
    assert res.code == 0, res
    assert _run_files(run) == clean_run


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_slide(tmp_path: Path, cmu_svs: Path) -> None:
    """A read-only output folder failed every slide on its own line (`out/<slide>.zarr: cannot write the store:
    Permission denied`, and for `infer` `results.csv` too: a cohort of 1,000 slides gave 1,001 lines), and a file
    where the folder should be gave `tile` "cannot create the output folder: File exists". Now each command stops
    on one line naming the folder before its first slide, exit 1."""
    from tests.corpus import can_drop_privileges, restore_permissions, unprivileged_cli

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = run_cli("tile", cmu_svs, "-o", blocker, "--mpp", "0.972", "--size", "96", "--quiet")
    assert res.code == 1 and res.err_lines == [f"{ERROR}{blocker}: cannot write in the output folder: a file of that "
                                               "name is in the way"], res
    # the probe leaves nothing behind, and nothing of another run's is in its way (a fixed name was: a folder or
    # another user's file of that name refused a folder that can be written)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".wsi-screen-probe").mkdir()
    tiled = run_cli("tile", cmu_svs, "-o", out, "--mpp", "0.972", "--size", "96", "--pixels", "none", "--quiet")
    assert tiled.code == 0, tiled
    assert sorted(p.name for p in out.iterdir()) == [".wsi-screen-locks", ".wsi-screen-probe",
                                                     "CMU-1-Small-Region.zarr", "wsi-screen.log"]
    if not can_drop_privileges():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to apply")
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.svs", "b.svs"):
        (slides / name).symlink_to(cmu_svs)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for command, what in (("tile", "output folder"), ("infer", "run folder")):
            proc = unprivileged_cli([command, str(slides), "-o", str(locked), "--quiet"])
            assert proc.returncode == 1 and proc.stderr.splitlines() == [
                f"{ERROR}{locked}: cannot write in the {what}: Permission denied"], (command, proc.stderr)
        assert list(locked.iterdir()) == []
    finally:
        restore_permissions(tmp_path)


#: runs the CLI (argv[1:]) as `python -m wsi_screen.cli` does, then prints on stdout whether torch was imported
_CLI_THEN_TORCH = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules))
sys.argv = ["wsi-screen", *sys.argv[1:]]
import wsi_screen.cli
wsi_screen.cli.main()
"""


def test_an_output_folder_that_cannot_be_made_is_refused_before_torch_loads(tmp_path: Path, cmu_svs: Path) -> None:
    """infer refused a run folder it cannot make on one line, but only after importing torch and loading the model
    (~6.8 s of CPU; tile refused it in 1.4 s), embed after loading its encoder, train and tune after decoding the
    whole dataset (their line said only `Permission denied`). Each now refuses it first, naming the folder, with
    torch not yet imported and nothing made."""
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    data = tmp_path / "data"
    data.mkdir()
    for args, what in ((["infer", cmu_svs], "run folder"),
                       (["embed", cmu_svs, "--encoder", "default"], "output folder"),
                       (["train", data, "--arch", "screen_cnn32"], "model folder"),
                       (["tune", data, "--arch", "screen_cnn32", "--lr", "1e-3,1e-4"], "tuning folder")):
        proc = subprocess.run([sys.executable, "-c", _CLI_THEN_TORCH, *map(str, args), "-o", str(out), "--quiet"],
                              capture_output=True, text=True, timeout=300)
        assert (proc.returncode, proc.stderr.splitlines(), proc.stdout.splitlines()) == (
            1, [f"{ERROR}{out}: cannot write in the {what}: Not a directory"], ["torch imported: False"]), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "data"] and list(data.iterdir()) == []
