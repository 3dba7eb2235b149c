"""Concurrent runs on one output: per-slide locks, never a corrupt store, the loser skips and says so."""

from __future__ import annotations

import csv
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, tree_digest
from tests.factory import block_image, write_tiled_tiff
from tests.warm_cli import WarmCli, warm_processes
from wsi_screen.embedding.features import FeatureStore
from wsi_screen.errors import RunError
from wsi_screen.screening.runfolder import SlideFolder
from wsi_screen.tiling.store import PatchStore, store_location, store_lock

BUSY = "another wsi-screen process is writing"


def stores_of(folder: Path) -> dict[str, dict[str, str]]:
    return {p.name: tree_digest(p) for p in sorted(folder.glob("*.zarr"))}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("concurrent") / "slides"
    folder.mkdir()
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", folder / "a.svs")
    shutil.copy(slides_dir / "CMU-1-Small-Region.pyramid.tif", folder / "b.tif")
    write_tiled_tiff(folder / "c.tif", block_image((2048, 1536), [(128, 128, 1920, 1408)], seed=4), mpp=0.5)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, slides: Path) -> dict[str, dict[str, str]]:
    out = tmp_path_factory.mktemp("single") / "stores"
    assert run_cli("tile", slides, "-o", out, "--quiet", "--workers", "1").code == 0
    return stores_of(out)


@pytest.fixture(scope="module")
def cli() -> Iterator[WarmCli]:
    with warm_processes() as warm:
        yield warm


def _run_two(cli: WarmCli, args: list[str], logs: Path) -> list[tuple[int, str]]:
    """Start ``wsi-screen ARGS`` twice at once, each a process of its own; (exit status, stderr) of each (stderr to
    files: a pipe could block them)."""
    logs.mkdir()
    procs = [cli.start(args, logs / f"{i}.stderr") for i in range(2)]
    return [(p.wait(timeout=300), (logs / f"{i}.stderr").read_text()) for i, p in enumerate(procs)]


def _summary(err: str) -> dict[str, int]:
    """Counts from tile's summary line: '3 slide(s): 2 tiled, 1 up to date, 1 busy in another process, 0 failed'."""
    line = next(line for line in err.splitlines() if " slide(s): " in line)
    return {key: int(n) for n, key in re.findall(r"(\d+) (tiled|up to date|busy|failed)", line)}


def test_two_tile_processes_on_one_output(tmp_path: Path, slides: Path, reference: dict[str, dict[str, str]],
                                          cli: WarmCli) -> None:
    out = tmp_path / "stores"
    results = _run_two(cli, ["tile", str(slides), "-o", str(out), "--workers", "1"], tmp_path / "logs")
    for code, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    counts = [_summary(err) for _, err in results]
    print(f"two tile processes: {counts}")
    # every slide tiled exactly once; the other process found it up to date or busy (and said so)
    assert sum(c["tiled"] for c in counts) == 3, results
    for c in counts:
        assert c["tiled"] + c["up to date"] + c.get("busy", 0) == 3 and c["failed"] == 0
    for (_, err), c in zip(results, counts, strict=True):
        assert err.count(BUSY) == c.get("busy", 0)
    assert stores_of(out) == reference  # complete and byte-identical to a single run
    assert not list(out.glob("*.partial"))


def test_a_busy_store_is_skipped_and_said_so(tmp_path: Path, slides: Path,
                                             reference: dict[str, dict[str, str]]) -> None:
    """Deterministic version: the test holds one store's lock while `tile` runs."""
    out = tmp_path / "stores"
    out.mkdir()
    with store_lock(store_location(out, "b")):
        res = run_cli("tile", slides, "-o", out, "--workers", "1")
    assert res.code == 0, res
    busy = [line for line in res.err_lines if BUSY in line]
    assert len(busy) == 1 and "b.zarr" in busy[0] and busy[0].startswith("wsi-screen: warning: ")
    assert "2 tiled, 0 up to date, 1 busy in another process, 0 failed" in res.err
    assert not (out / "b.zarr").exists() and not (out / "b.zarr.partial").exists()
    res = run_cli("tile", slides, "-o", out, "--workers", "1", "--quiet")  # afterwards: picked up
    assert res.code == 0, res
    assert stores_of(out) == reference


def test_slide_folder_is_locked(tmp_path: Path) -> None:
    first = SlideFolder(tmp_path, "s")
    (first.path("scores.csv")).write_text("x")
    with pytest.raises(RunError, match=BUSY):
        SlideFolder(tmp_path, "s")
    assert first.path("scores.csv").exists()  # the second writer did not wipe the first one's files
    first.commit()
    second = SlideFolder(tmp_path, "s")  # free again after commit
    second.abort()
    SlideFolder(tmp_path, "s").abort()  # and after abort
    assert (tmp_path / "s" / "scores.csv").read_text() == "x"


@pytest.mark.slow
def test_two_infer_runs_on_one_run_folder(tmp_path: Path, cli: WarmCli) -> None:
    """`infer` in another process and, once it has started writing, `infer` in this process, into one run folder:
    nothing corrupt; slides the other run holds are skipped as busy (a warning each, exit 0); a rerun settles
    them."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        write_tiled_tiff(slides / f"{name}.tif", block_image((1024, 768), [(64, 64, 960, 704)], seed=i), mpp=0.5)
    run = tmp_path / "run"
    args = ["infer", str(slides), "-o", str(run), "--workers", "0", "--quiet"]
    log = tmp_path / "other.stderr"
    other = cli.start(args, log)
    deadline = time.monotonic() + 120
    while other.poll() is None and time.monotonic() < deadline and not list(run.glob("stores/*.partial")):
        time.sleep(0.02)
    mine = run_cli(*args)  # torch is warm here: both runs work on the slides at the same time
    results = [(other.wait(timeout=300), log.read_text()), (mine.code, mine.err)]
    for code, err in results:
        assert code == 0 and "Traceback" not in err and "internal error" not in err, err
        assert not [line for line in err.splitlines() if line.startswith("wsi-screen: error: ")], err
        busy = [line for line in err.splitlines() if BUSY in line]
        assert all(line.startswith("wsi-screen: warning: ") for line in busy), busy  # slides the other run held
        print(f"infer process: exit {code}, {len(busy)} slides busy")
    for folder in (run / name for name in ("a", "b", "c")):
        if folder.exists():
            assert {p.name for p in folder.iterdir()} == {"scores.csv", "heatmap.png", "patches.geojson",
                                                          "slide.json"}
    for store in (run / "stores").glob("*.zarr"):
        assert PatchStore.open(store).attrs["complete"] is True
    res = run_cli(*args)  # settles every busy slide
    assert res.code == 0, res
    with (run / "results.csv").open(newline="", encoding="utf-8") as fh:
        assert [(r["slide"], r["status"]) for r in csv.DictReader(fh)] == [("a", "ok"), ("b", "ok"), ("c", "ok")]
    assert not list(run.glob("*.partial"))


def test_a_busy_slide_is_skipped_by_infer_on_every_count(tmp_path: Path, slides: Path) -> None:
    """The test holds b's store lock (RUN/stores) and c's slide-folder lock (RUN/.wsi-screen-locks/) while `infer`
    runs: each is one warning line saying it was skipped, a `busy` row in results.csv (diagnosis busy, the reason in
    its error column), counted as busy in the closing line and not failed, exit 0. Before, the line said 'skipped'
    while it was an error line, an `error` row, counted failed, exit 1."""
    run = tmp_path / "run"
    (run / "stores").mkdir(parents=True)
    with store_lock(store_location(run / "stores", "b")):
        folder = SlideFolder(run, "c")  # another run writing c's results
        try:
            res = run_cli("infer", slides, "-o", run, "--workers", "0")
        finally:
            folder.abort()
    assert res.code == 0, res
    assert not [line for line in res.err_lines if line.startswith("wsi-screen: error: ")], res.err
    busy = [line for line in res.err_lines if BUSY in line]
    assert len(busy) == 2 and all(line.startswith("wsi-screen: warning: ") for line in busy), res.err
    assert all(line.endswith("skipped (rerun afterwards to pick it up)") for line in busy), busy
    assert "; 2 busy in another process (skipped: rerun afterwards); 0 failed" in res.out, res.out
    with (run / "results.csv").open(newline="", encoding="utf-8") as fh:
        rows = {r["slide"]: r for r in csv.DictReader(fh)}
    assert {n: (r["status"], r["diagnosis"]) for n, r in rows.items()} == {
        "a": ("ok", rows["a"]["diagnosis"]), "b": ("busy", "busy"), "c": ("busy", "busy")}
    assert BUSY in rows["b"]["error"] and BUSY in rows["c"]["error"]
    assert not (run / "b").exists() and not (run / "c").exists()  # left to their writers
    # the report shows them as busy, not failed, and as no slide left without pictures by the large-run rule
    page = (run / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r'<tr class="busy[ "]', page)) == 2 and '<tr class="error' not in page
    assert page.count(">busy: ") == 2 and ">error: " not in page
    assert "Pictures (heatmap preview and top patches) below" not in page
    again = run_cli("infer", slides, "-o", run, "--workers", "0", "--quiet")  # locks free: picked up
    assert again.code == 0, again
    with (run / "results.csv").open(newline="", encoding="utf-8") as fh:
        assert [(r["slide"], r["status"]) for r in csv.DictReader(fh)] == [("a", "ok"), ("b", "ok"), ("c", "ok")]


def _embed_counts(err: str) -> dict[str, int]:
    """Counts from embed's summary line: '3 slide(s): 2 embedded, 0 up to date, 1 busy in another process, 0 failed;
    ...' (busy only when there is one)."""
    line = next(line for line in err.splitlines() if " slide(s): " in line)
    return {key: int(n) for n, key in re.findall(r"(\d+) (embedded|up to date|busy|failed)", line)}


def test_busy_embeddings_skip_that_slide_only(tmp_path: Path, slides: Path) -> None:
    """The test holds one slide's feature-store lock (the patch stores' lock, OUT/.wsi-screen-locks/) while `embed`
    runs: that slide is skipped as busy on one warning line saying another process is writing it, counted as busy
    (not failed: exit 0, as `tile` does), nothing of it is written or removed, the others are embedded; a rerun
    picks it up. Before, embed took no lock and wrote over the holder's work; then its line said 'skipped' while
    the summary counted it failed and the exit status was 1."""
    out = tmp_path / "emb"
    out.mkdir()
    held = out / "b.zarr"
    with store_lock(held):
        (out / "b.zarr.partial").mkdir()  # the holder's work in progress
        (out / "b.zarr.partial" / "mine").write_text("x")
        res = run_cli("embed", slides, "--encoder", "default", "-o", out, "--workers", "0")
        assert (out / "b.zarr.partial" / "mine").read_text() == "x"  # left to the process that holds the lock
    assert res.code == 0, res
    assert not [line for line in res.err_lines if line.startswith("wsi-screen: error: ")], res.err
    busy = [line for line in res.err_lines if BUSY in line]
    assert len(busy) == 1 and busy[0].startswith("wsi-screen: warning: ") and str(held) in busy[0], res.err
    assert busy[0].endswith("skipped (rerun afterwards to pick it up)") and "Traceback" not in res.err
    assert _embed_counts(res.err) == {"embedded": 2, "up to date": 0, "busy": 1, "failed": 0}
    assert not held.exists()
    assert {p.name for p in out.glob("*.zarr")} == {"a.zarr", "c.zarr"}
    shutil.rmtree(out / "b.zarr.partial")
    again = run_cli("embed", slides, "--encoder", "default", "-o", out, "--workers", "0")  # lock free: picked up
    assert again.code == 0, again
    assert _embed_counts(again.err) == {"embedded": 1, "up to date": 2, "failed": 0}
    assert FeatureStore(held).attrs["complete"] is True


@pytest.mark.slow
def test_two_embed_processes_on_one_output(tmp_path: Path, slides: Path, cli: WarmCli) -> None:
    """Two `embed` runs of the same patch stores into one OUT at once (no tiling, whose lock would keep them
    apart): each slide's embeddings are written by one of them (the other finds them up to date, or busy and says
    so on one warning line, exit 0); none is written twice, no `.partial` is left, and a rerun finds every slide up
    to date. Before, both embedded every slide, each deleting or replacing the other's work."""
    first = tmp_path / "first"
    assert run_cli("embed", slides, "--encoder", "default", "-o", first, "--workers", "0", "--quiet").code == 0
    out = tmp_path / "emb"
    results = _run_two(cli, ["embed", str(first / "stores"), "--encoder", "default", "-o", str(out)],
                       tmp_path / "logs")
    counts = [_embed_counts(err) for _, err in results]
    print(f"two embed processes: {counts}")
    for (code, err), c in zip(results, counts, strict=True):
        assert "Traceback" not in err and "internal error" not in err, err
        assert not [line for line in err.splitlines() if line.startswith("wsi-screen: error: ")], err
        busy = [line for line in err.splitlines() if BUSY in line]
        assert all(line.startswith("wsi-screen: warning: ") for line in busy), busy  # slides the other run held
        assert c.get("busy", 0) == len(busy) and c["failed"] == 0 and code == 0
        assert c["embedded"] + c["up to date"] + c.get("busy", 0) == 3
    assert sum(c["embedded"] for c in counts) == 3, results  # every slide embedded exactly once
    assert {p.name for p in out.glob("*.zarr")} == {"a.zarr", "b.zarr", "c.zarr"}
    assert not list(out.glob("*.partial"))
    again = run_cli("embed", first / "stores", "--encoder", "default", "-o", out)
    assert again.code == 0 and _embed_counts(again.err) == {"embedded": 0, "up to date": 3, "failed": 0}, again
