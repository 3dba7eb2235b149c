"""Runs a user can trust: resolution per slide, reruns that follow settings, portable run folders, one
operating point, and the small things a new user trips over (issue: runs a user can trust)."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import shutil
from pathlib import Path

import click
import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_screen.models import default_model_dir, load_model
from wsi_screen.screening import runview
from wsi_screen.tiling.store import PatchStore

WARNING = "wsi-screen: warning: "


def _rows(run: Path) -> dict[str, dict[str, str]]:
    with (run / "results.csv").open(newline="") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


@pytest.fixture
def slides(tmp_path: Path, example_slide: Path, slides_dir: Path) -> Path:
    """The CMU example (declares 0.499 um/px) and the TCGA slide (declares none)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / example_slide.name).symlink_to(example_slide)
    (folder / "TCGA-CR-7395-01A-01-TS1.svs").symlink_to(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs")
    return folder


# --- resolution ------------------------------------------------------------------------------------------
def test_slide_mpp_fills_in_only_where_the_file_declares_none(slides: Path, tmp_path: Path) -> None:
    res = run_cli("tile", slides, "-o", tmp_path / "stores", "--mpp", "2.0", "--size", "64", "--slide-mpp", "0.25",
                  "--quiet")
    assert res.code == 0, res
    cmu = PatchStore.open(tmp_path / "stores" / "CMU-1-Small-Region.zarr").attrs["slide"]
    tcga = PatchStore.open(tmp_path / "stores" / "TCGA-CR-7395-01A-01-TS1.zarr").attrs["slide"]
    assert (cmu["mpp"], cmu["mpp_source"]) == (pytest.approx(0.499, abs=1e-3), "slide")
    assert (tcga["mpp"], tcga["mpp_source"]) == (0.25, "user")


def test_slide_mpp_csv_sets_named_slides_even_over_the_file(slides: Path, tmp_path: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nCMU-1-Small-Region,0.6\nTCGA-CR-7395-01A-01-TS1.svs,0.5\n")
    res = run_cli("tile", slides, "-o", tmp_path / "stores", "--mpp", "2.0", "--size", "64", "--slide-mpp-csv",
                  table, "--quiet")
    assert res.code == 0, res
    warnings = [line for line in res.err_lines if line.startswith(WARNING)]
    assert len(warnings) == 1 and "0.6 um/px from --slide-mpp-csv" in warnings[0] and "0.499" in warnings[0]
    cmu = PatchStore.open(tmp_path / "stores" / "CMU-1-Small-Region.zarr").attrs["slide"]
    assert (cmu["mpp"], cmu["mpp_source"]) == (0.6, "user")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,mpp\nx,1\n")
    res = run_cli("tile", slides, "-o", tmp_path / "s2", "--slide-mpp-csv", bad)
    assert res.code == 1 and "needs columns 'slide' and 'mpp'" in res.err


def test_infer_warns_of_a_slide_mpp_csv_override_once_per_slide(example_slide: Path, tmp_path: Path) -> None:
    """infer opens a slide more than once (checking its store, tiling it, reading its patches in the slide reader
    and again for the report): the override was warned of on each open, three times."""
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nCMU-1-Small-Region,0.6\n")
    expected = f"{WARNING}{example_slide}: using 0.6 um/px from --slide-mpp-csv; the file declares 0.499 um/px"
    for reused in ("0", "1"):  # a fresh run, then a rerun that checks the store and reuses it
        res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--slide-mpp-csv", table, "--quiet")
        assert res.code == 0, res
        assert f"{reused} slide(s) reused" in res.out
        assert [line for line in res.err_lines if "--slide-mpp-csv" in line] == [expected]
        if reused == "0":
            assert (tmp_path / "run" / "wsi-screen.log").read_text().count("using 0.6 um/px from") == 1


def test_a_slide_reopened_in_one_process_warns_of_its_forced_mpp_once(example_slide: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import pickle

    from wsi_screen import Slide
    from wsi_screen.slide import slide as slide_module

    slide_module.forget_warnings()
    with caplog.at_level("WARNING", logger="wsi_screen.slide.slide"), Slide(example_slide, force_mpp=0.61) as first, \
            Slide(example_slide, force_mpp=0.61) as second, pickle.loads(pickle.dumps(first)) as copy:
        assert first.mpp == second.mpp == copy.mpp == 0.61  # the copy: a worker's, the same resolution, no warning
    assert [r.getMessage() for r in caplog.records] == [
        f"{example_slide}: using 0.61 um/px from `force_mpp`; the file declares 0.499 um/px"]


def test_resolution_tables_and_values_are_checked_before_they_can_mislead(slides: Path, tmp_path: Path) -> None:
    # a typo in a row: the slide keeps its own resolution, so the user is told the row named nothing
    typo = tmp_path / "typo.csv"
    typo.write_bytes("\ufeffslide,mpp\nCMU-1-Small-Regoin,0.25\nTCGA-CR-7395-01A-01-TS1,0.5\n".encode())  # Excel's BOM
    res = run_cli("tile", slides, "-o", tmp_path / "stores", "--mpp", "2.0", "--size", "64", "--slide-mpp-csv",
                  typo, "--quiet")
    assert res.code == 0, res
    warnings = [line for line in res.err_lines if line.startswith(WARNING)]
    assert warnings == [WARNING + "--slide-mpp-csv: 1 row(s) name no slide of this run (by name, file name or path): "
                        "CMU-1-Small-Regoin"]
    # two rows for one slide that disagree: which one was meant is not ours to guess
    twice = tmp_path / "twice.csv"
    twice.write_text("slide,mpp\nTCGA-CR-7395-01A-01-TS1,0.5\nTCGA-CR-7395-01A-01-TS1,0.25\n")
    res = run_cli("tile", slides, "-o", tmp_path / "s2", "--slide-mpp-csv", twice)
    assert res.code == 1
    assert "twice.csv:3: 'TCGA-CR-7395-01A-01-TS1' is given mpp 0.25 here and 0.5 on line 2" in res.err
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nCMU-1-Small-Region,tumour\nCMU-1-Small-Region,normal\n")
    res = run_cli("infer", slides, "-o", tmp_path / "run", "--labels", labels)
    assert res.code == 1 and "labels.csv:3: 'CMU-1-Small-Region' is given the label 'normal' (negative) here" in res.err
    # an impossible --slide-mpp is refused even when every slide declares its own
    res = run_cli("tile", slides / "CMU-1-Small-Region.svs", "-o", tmp_path / "s3", "--slide-mpp", "0")
    assert res.code == 2 and "0 is outside the plausible range 0.05-100 um/px" in res.err



def test_a_slide_labelled_by_two_of_its_file_names_is_refused_or_warned_of(slides: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """'a.svs' and 'a.TIF' both name the slide 'a': the first row's label won without a word."""
    from wsi_screen.screening.outputs import read_labels

    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nTCGA-CR-7395-01A-01-TS1,normal\nCMU-1-Small-Region.svs,tumour\n"
                      "CMU-1-Small-Region.TIF,normal\n")
    res = run_cli("infer", slides, "-o", tmp_path / "run", "--labels", labels)
    assert res.code == 1 and not (tmp_path / "run").exists(), res
    assert res.err_lines == [f"wsi-screen: error: {labels}:4: 'CMU-1-Small-Region.TIF' is the slide "
                             "'CMU-1-Small-Region', given the label 'normal' (negative) here and 'tumour' (positive) "
                             "on line 3 (as 'CMU-1-Small-Region.svs'); keep one"], res
    # the same label twice (by two file names, or the name and a file name): used, with a warning naming both rows
    labels.write_text("slide,label\nCMU-1-Small-Region.svs,tumour\nCMU-1-Small-Region.tiff,yes\n"
                      "CMU-1-Small-Region,tumour\n")
    with caplog.at_level("WARNING", logger="wsi_screen.screening.outputs"):
        truth = read_labels(labels, load_model(default_model_dir()))
    assert truth["CMU-1-Small-Region"] == "positive"
    assert [r.getMessage() for r in caplog.records] == [
        f"`labels`: {labels}:3: 'CMU-1-Small-Region.tiff' is the slide 'CMU-1-Small-Region', given the label "
        "'positive' here and on line 2 (as 'CMU-1-Small-Region.svs') too; one row is used",
        f"`labels`: {labels}:4: 'CMU-1-Small-Region' is given the label 'positive' here and on line 2 (as "
        "'CMU-1-Small-Region.svs') too; one row is used"]

# --- reruns follow settings -----------------------------------------------------------------------------
def test_reruns_follow_every_input(example_slide: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / example_slide.name).symlink_to(example_slide)
    run = tmp_path / "run"

    def infer(*extra: object) -> tuple[dict[str, str], str]:
        res = run_cli("infer", slides, "-o", run, "--workers", "0", *extra)
        assert res.code == 0, res
        return _rows(run)["CMU-1-Small-Region"], res.out

    first, out = infer()
    assert "0 slide(s) reused" in out and "1 (re)computed" in out
    assert (first["slide_mpp"], first["mpp_source"]) == ("0.499", "slide")
    again, out = infer()
    assert "1 slide(s) reused" in out and again == first
    # the slide's resolution (per-slide table): recomputed, and the rows say so
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nCMU-1-Small-Region,0.6\n")
    changed, out = infer("--slide-mpp-csv", table)
    assert "0 slide(s) reused" in out and (changed["slide_mpp"], changed["mpp_source"]) == ("0.6", "user")
    assert changed["n_patches"] != first["n_patches"]
    back, out = infer()  # and back: recomputed again, the same numbers as the first run
    assert "0 slide(s) reused" in out and back["n_patches"] == first["n_patches"] and back["score"] == first["score"]
    # the tiling settings
    fewer, out = infer("--min-tissue", "0.9")
    assert "0 slide(s) reused" in out and int(fewer["n_patches"]) < int(first["n_patches"])
    infer()
    # the rule: scores reused, the call recomputed from them
    ruled, out = infer("--aggregate", "mean")
    assert "1 slide(s) reused" in out and ruled["rule"] == "mean" and ruled["score"] != first["score"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["aggregate"]["rule"] == "mean" and meta["slides"][0]["mpp_source"] == "slide"
    # the model (same weights, another config: another hash)
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    config = json.loads((model / "config.json").read_text())
    config["package_version"] = "changed"
    (model / "config.json").write_text(json.dumps(config))
    other, out = infer("--model", model)
    assert "0 slide(s) reused" in out and other["score"] == first["score"]


def test_infer_never_replaces_stores_it_did_not_make(example_slide: Path, tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    assert run_cli("tile", example_slide, "-o", stores, "--mpp", "0.972", "--size", "96", "--min-tissue", "0.9",
                   "--quiet").code == 0
    before = (stores / "CMU-1-Small-Region.zarr" / "zarr.json").read_bytes()
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--stores", stores, "--quiet")
    assert res.code == 1
    line = next(x for x in res.err_lines if "CMU-1-Small-Region" in x)
    assert "does not replace stores it did not make" in line and "pass --overwrite" not in line
    assert (stores / "CMU-1-Small-Region.zarr" / "zarr.json").read_bytes() == before


# --- DICOM on a plain install ---------------------------------------------------------------------------
def test_pydicom_is_a_core_dependency() -> None:
    """A DICOM series folder is one slide on a plain install: pydicom groups its files (wsi_screen.slide.discovery)."""
    import tomllib

    from tests.conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("pydicom") for r in project["dependencies"])
    assert not any(r.startswith("pydicom") for extra in project["optional-dependencies"].values() for r in extra)
    importlib.metadata.version("pydicom")  # and it is installed


# --- portable run folders ------------------------------------------------------------------------------
def test_a_moved_run_folder_opens_from_anywhere(demo_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    slide = json.loads((demo_run / "CMU-1-Small-Region" / "slide.json").read_text())
    assert slide["store"] == "stores/CMU-1-Small-Region.zarr"
    assert _rows(demo_run)["CMU-1-Small-Region"]["store"] == "stores/CMU-1-Small-Region.zarr"
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(demo_run, moved)
    monkeypatch.chdir(tmp_path)
    view = runview.open_run(Path("elsewhere") / "run")
    assert len(runview.top_patches(view, "CMU-1-Small-Region", 4)) == 4
    assert run_cli("report", "elsewhere/run").code == 0
    html = (moved / "report.html").read_text()
    assert "top patches unavailable" not in html and html.count("data:image/webp") >= 2 + 4
    # the heatmap's link is relative: it opens the moved folder's own heatmap.png
    assert 'href="CMU-1-Small-Region/heatmap.png"' in html and (moved / "CMU-1-Small-Region" / "heatmap.png").is_file()
    # the README's notebook command: WSI_SCREEN_RUN relative to the repository, the kernel in notebooks/
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.setenv("WSI_SCREEN_RUN", "elsewhere/run")
    assert runview.default_run().resolve() == moved.resolve()


# --- one operating point --------------------------------------------------------------------------------
def test_geojson_classes_use_the_calls_threshold(demo_run: Path) -> None:
    """A slide's outputs show the patch threshold its call read (the bundled region rule's 0.8), not the model's
    (0.213, which predict and evaluate keep): issue 28 replaced 'GeoJSON classes at the model's threshold'."""
    spec = load_model(default_model_dir()).spec
    call = json.loads((demo_run / "run.json").read_text())["aggregate"]
    fc = json.loads((demo_run / "CMU-1-Small-Region" / "patches.geojson").read_text())
    assert call["rule"] == "region" and fc["wsi_screen"]["threshold"] == call["region_threshold"] == 0.8
    assert fc["wsi_screen"]["positive_class"] == "tumour" and spec.threshold is not None and spec.threshold < 0.5
    p = np.array([f["properties"]["measurements"]["tumour"] for f in fc["features"]])
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert names == ["tumour" if v >= 0.8 else "normal" for v in p]
    between = (p >= spec.threshold) & (p < 0.8)  # tumour at the model's threshold, not at the call's
    assert between.any() and all(names[i] == "normal" for i in np.flatnonzero(between))
    assert all(f["properties"]["threshold"] == 0.8 for f in fc["features"])


# --- threads ----------------------------------------------------------------------------------------------
def test_default_threads_on_small_machines() -> None:
    from wsi_screen.commands.train import default_threads

    assert default_threads(1) == 1 and default_threads(2) == 1
    assert default_threads(8) == 0  # torch's own default on bigger machines


# --- small things ---------------------------------------------------------------------------------------
def test_resolution_error_of_infer_names_no_tile_option(slides_dir: Path, tmp_path: Path) -> None:
    res = run_cli("infer", slides_dir / "camelyon-lowres.dcm", "-o", tmp_path / "run", "--quiet")
    assert res.code == 1
    line = next(x for x in res.err_lines if "finer than the slide's level 0" in x)
    assert "--mpp" not in line.replace("--slide-mpp-csv", "") and "a model trained at 28.97 um/px" in line


def test_empty_and_missing_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # one line, as infer and embed say it: no progress bar, no summary of 0 slides, no OUT/wsi-screen.log
    res = run_cli("tile", empty, tmp_path / "nope.svs", "-o", tmp_path / "stores")
    assert (res.code, res.err_lines) == (1, [f"wsi-screen: error: no slides to tile: {empty}: folder holds no slide "
                                             f"files; {tmp_path / 'nope.svs'}: no such file or folder"]), res
    assert not (tmp_path / "stores").exists()
    res = run_cli("infer", tmp_path / "nope", "-o", tmp_path / "run")
    assert res.code == 1 and "no slides to screen" in res.err and "no such file" in res.err
    assert not (tmp_path / "run").exists()


def test_info_on_a_folder_of_stores(demo_run: Path, tmp_path: Path) -> None:
    res = run_cli("info", demo_run / "stores")
    assert res.code == 0 and "CMU-1-Small-Region.zarr" in res.out and "patches    66 x 96 px" in res.out
    res = run_cli("info", tmp_path)
    assert res.code == 1 and res.err_lines == [f"wsi-screen: error: {tmp_path}: not a patch store or an embeddings "
                                               "store, and holds none (no zarr group there)"], res
    assert "No group found" not in res.err
    # a folder of `tile -o` / `embed -o` folders: info names them instead of calling it a bad patch store
    shutil.copytree(demo_run / "stores", tmp_path / "tiled" / "stores")  # a run's or embed's stores/
    shutil.copytree(demo_run / "stores", tmp_path / "embedded")  # stores at the top, as embed -o writes them
    (tmp_path / "empty").mkdir()
    res = run_cli("info", tmp_path)
    assert res.code == 1 and res.err_lines == [
        f"wsi-screen: error: {tmp_path}: not a patch store or an embeddings store, and holds none; its folders "
        f"embedded, tiled do: name them (`wsi-screen info {tmp_path}/*`)"], res
    assert run_cli("info", tmp_path / "tiled").code == 0


def test_info_on_an_interrupted_tiles_store_says_it_is_incomplete(tmp_path: Path) -> None:
    """A store an interrupted tile left (`.zarr.partial`, patches written, no coordinates yet) printed its slide
    lines, then `internal error: KeyError: 'coords'`; a folder holding only such a store said `no zarr group`."""
    from wsi_screen.tiling.store import StoreWriter, store_location

    loc = store_location(tmp_path / "out", "s")
    writer = StoreWriter(loc, n_patches=4, patch_size=32, thumbnail_shape=(2, 2),
                         attrs={"mpp": 0.5, "patch_size": 32, "slide": {"name": "s"}})
    writer.write_patches(0, np.zeros((writer.shard, 32, 32, 3), np.uint8)[:4])  # killed here: no commit
    partial = tmp_path / "out" / "s.zarr.partial"
    assert partial.is_dir() and not (partial / "coords").exists()
    said = "is an incomplete store, left by an interrupted `wsi-screen tile`; rerun tile to finish it"
    res = run_cli("info", partial)
    assert (res.code, res.out, res.err_lines) == (1, "", [f"wsi-screen: error: {partial}: {said[3:]}"]), res
    res = run_cli("info", tmp_path / "out")
    assert (res.code, res.err_lines) == (1, [f"wsi-screen: error: {tmp_path / 'out'}: not a patch store or an "
                                             f"embeddings store, and holds none complete: s.zarr.partial {said}"]), res


def test_workers_zero_means_one_reader_in_tile_and_infer(example_slide: Path, tmp_path: Path) -> None:
    assert run_cli("tile", example_slide, "-o", tmp_path / "a", "--workers", "0", "--quiet").code == 0
    assert run_cli("tile", example_slide, "-o", tmp_path / "b", "--workers", "1", "--quiet").code == 0
    a = PatchStore.open(tmp_path / "a" / "CMU-1-Small-Region.zarr")
    b = PatchStore.open(tmp_path / "b" / "CMU-1-Small-Region.zarr")
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.read(slice(0, 8)), b.read(slice(0, 8)))


def test_config_file_sections_and_options_are_checked(example_slide: Path, tmp_path: Path) -> None:
    bad_section = tmp_path / "a.toml"
    bad_section.write_text("[tiel]\nmpp = 0.5\n")
    res = run_cli("--config", bad_section, "tile", example_slide, "-o", tmp_path / "s")
    assert res.code == 1 and "unknown section(s) [tiel]" in res.err
    bad_option = tmp_path / "b.toml"
    bad_option.write_text("[tile]\nmppp = 0.5\n")
    res = run_cli("--config", bad_option, "tile", example_slide, "-o", tmp_path / "s")
    assert res.code == 1 and "[tile] has no option(s) --mppp" in res.err
    bad_value = tmp_path / "v.toml"  # a value the user did not type says where it came from
    bad_value.write_text('[tile]\nsize = "abc"\n')
    res = run_cli("--config", bad_value, "tile", example_slide, "-o", tmp_path / "s")
    assert res.code == 2 and "Invalid value for '--size'" in res.err and f"(set in {bad_value})" in res.err
    good = tmp_path / "c.toml"
    good.write_text('[tile]\nsize = 64\nslide-mpp = 0.3\n')
    assert run_cli("--config", good, "tile", example_slide, "-o", tmp_path / "s", "--quiet").code == 0
    assert PatchStore.open(tmp_path / "s" / "CMU-1-Small-Region.zarr").attrs["patch_size"] == 64


def test_interrupt_says_finished_work_is_kept(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_screen import cli

    def abort(*_a: object, **_k: object) -> None:
        raise click.exceptions.Abort()

    monkeypatch.setattr(cli.cli, "main", abort)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tile", "x", "-o", "y"])
    assert exit_info.value.code == cli.EXIT_INTERRUPTED
    assert "finished work is kept, rerun to resume" in capsys.readouterr().err
