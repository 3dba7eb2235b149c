"""``wsi-screen infer`` with the bundled default model: real slide, synthetic slides with known truth,
resume, failures, mismatched stores."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import coordinates_only_store_of_a_moved_slide, read_results, run_cli
from tests.factory import block_image, write_tiled_tiff
from wsi_screen.errors import ConfigError
from wsi_screen.models import default_model_dir, load_model
from wsi_screen.screening import runfolder
from wsi_screen.screening.geojson import geojson_to_coords
from wsi_screen.tiling.store import PatchStore


def test_default_model_is_bundled_and_small() -> None:
    d = default_model_dir()
    assert (d / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    model = load_model()
    assert model.spec.classes == ["normal", "tumour"] and model.spec.positive_class == "tumour"
    assert model.spec.input_size == 96 and model.spec.mpp == pytest.approx(0.972)


def test_demo_slide(tmp_path: Path, example_slide: Path) -> None:
    run = tmp_path / "demo"
    res = run_cli("infer", example_slide.parent, "-o", run, "--workers", "0")
    assert res.code == 0, res
    assert "CMU-1-Small-Region" in res.out and "heatmap:" in res.out
    assert f"report: {run / 'report.html'}" in res.out.splitlines() and (run / "report.html").is_file()
    row = read_results(run)["CMU-1-Small-Region"]
    assert row["store"] == "stores/CMU-1-Small-Region.zarr"  # relative to the run folder
    store = PatchStore.open(run / row["store"])
    assert row["status"] == "ok" and int(row["n_patches"]) == len(store) > 30
    assert float(row["score"]) >= 0.0 and row["diagnosis"] in ("tumour", "normal")
    # the score is in the rule's unit: a probability, or mm² for the region rule
    if row["rule"] != "region":
        assert float(row["score"]) <= 1.0
    assert store.patch_size == 96 and store.mpp == pytest.approx(0.972)
    # top patch coordinates are a real patch of the store
    assert [int(row["top_x"]), int(row["top_y"])] in store.coords.tolist()
    folder = run / "CMU-1-Small-Region"
    scores = runfolder.read_scores(folder / "scores.csv")
    assert np.array_equal(scores.coords, store.coords)
    assert np.allclose(scores.probs.sum(axis=1), 1.0, atol=1e-4)
    heat = np.asarray(Image.open(folder / "heatmap.png").convert("RGB"))
    assert heat.shape[0] > 400 and heat.std() > 20
    fc = json.loads((folder / "patches.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(store)
    props = fc["features"][0]["properties"]
    assert props["objectType"] == "tile" and set(props["measurements"]) == {"normal", "tumour"}
    assert props["classification"]["name"] in ("normal", "tumour") and len(props["classification"]["color"]) == 3
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["sha256"] and info["model"]["arch"] == load_model().spec.arch
    assert info["model"]["numeric_precision"] == load_model().precision
    assert info["settings"] == {"batch_size": 128, "workers": 0, "loader_workers": 0, "stores": None,
                                "slide_mpp": None, "slide_mpp_csv": {}, "labels": None, "device": "auto",
                                "keep_patches": False, "report_top": 50, "overrides": {}}
    # where the time went: the run's stages and each slide's (open, tile, score, outputs)
    stages, (slide,) = info["stages"], info["slides"]
    # start-up counts from infer's entry point here (the test process is not the command), never from its start
    assert set(stages) == {"start_up", "slides", "run_outputs"} and 0 < stages["start_up"] < 30
    assert set(slide["seconds"]) == {"open", "tile", "score", "outputs"}
    assert all(v >= 0 for v in slide["seconds"].values()) and slide["seconds"]["score"] > 0
    assert sum(slide["seconds"].values()) <= stages["slides"] + 0.5 <= info["seconds"] + 0.5
    assert info["total_seconds"] == pytest.approx(info["seconds"] + stages["start_up"], abs=0.02)  # the command's
    assert (run / "report.html").exists()
    assert not list(run.glob("*.partial"))


def test_a_slides_call_is_made_once_for_its_row_and_its_pictures(tmp_path: Path, example_slide: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_screen.screening import outputs
    from wsi_screen.screening.callview import views_key
    from wsi_screen.screening.heatmap import drawn_with
    from wsi_screen.screening.runview import open_run, slide_call

    calls: list[int] = []
    real = outputs.diagnose

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "diagnose", counted)
    run = tmp_path / "run"
    assert run_cli("infer", example_slide.parent, "-o", run, "--workers", "0", "--quiet").code == 0
    assert len(calls) == 1  # write_slide_folder's call serves results.csv too
    ctx = slide_call(open_run(run), "CMU-1-Small-Region")
    assert views_key(ctx) == drawn_with(run / "CMU-1-Small-Region" / "heatmap.png")
    assert run_cli("infer", example_slide.parent, "-o", run, "--workers", "0", "--quiet").code == 0
    assert len(calls) == 2  # a reused slide's call is made afresh (the rule may have changed), its pictures kept


def test_positive_slides_outrank_negative(synthetic_run: Path) -> None:
    rows = read_results(synthetic_run)
    pos = [float(rows[f"case{i}"]["score"]) for i in (0, 2, 4)]
    neg = [float(rows[f"case{i}"]["score"]) for i in (1, 3, 5)]
    assert min(pos) > max(neg), (pos, neg)
    metrics = json.loads((synthetic_run / "slide_metrics.json").read_text())
    assert metrics["auc"] == 1.0 and metrics["n_positive"] == 3 and metrics["n_negative"] == 3
    assert (synthetic_run / "slide_roc.png").stat().st_size > 1000
    assert {rows[f"case{i}"]["label"] for i in (0, 2, 4)} == {"positive"}


def test_top_patches_lie_in_the_tumour(synthetic: Path, synthetic_run: Path) -> None:
    from wsi_screen.synthetic.slides import SyntheticTruth

    truths = {k: SyntheticTruth.from_json(v) for k, v in json.loads((synthetic / "truth.json").read_text()).items()}
    for name in ("case0", "case2", "case4"):
        scores = runfolder.read_scores(synthetic_run / name / "scores.csv")
        p = scores.probs[:, scores.classes.index("tumour")]
        inside = truths[name].tumour_overlap(scores.coords, 96) > 0.5
        assert 0.15 < inside.mean() < 0.25  # a fifth of the tissue is tumour: chance puts 2 of the top 10 inside
        top = np.argsort(-p, kind="stable")[:10]
        assert inside[top].sum() >= 6, (name, inside[top])  # at least three times chance
        assert p[inside].mean() > p[~inside].mean() + 0.2, name


def test_geojson_round_trips_to_store_coordinates(synthetic_run: Path) -> None:
    for name in ("case0", "case1"):
        fc = json.loads((synthetic_run / name / "patches.geojson").read_text())
        coords, sizes = geojson_to_coords(fc)
        store = PatchStore.open(runfolder.resolve_path(runfolder.read_slide(synthetic_run, name)["store"],
                                                       synthetic_run))
        assert np.array_equal(coords, store.coords)
        assert set(np.asarray(sizes).tolist()) == {store.tile_size_l0}


def test_rerun_reuses_scores_and_reaggregates(tmp_path: Path, synthetic: Path, synthetic_run: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(synthetic_run, run)
    before = {p: p.stat().st_mtime_ns for p in run.glob("case*/scores.csv")}
    res = run_cli("infer", synthetic / "slides", "-o", run, "--aggregate", "max", "--threshold", "0.99",
                  "--workers", "0", "--quiet")
    assert res.code == 0, res
    assert {p: p.stat().st_mtime_ns for p in run.glob("case*/scores.csv")} == before  # nothing rescored
    assert not any("modification time" in line for line in res.err_lines)  # the slides are as they were
    rows = read_results(run)
    assert {r["rule"] for r in rows.values()} == {"max"} and {r["threshold"] for r in rows.values()} == {"0.99"}
    for name, r in rows.items():
        p = runfolder.read_scores(run / name / "scores.csv").probs[:, 1]
        assert float(r["score"]) == pytest.approx(p.max(), abs=1e-6)


def test_a_slide_touched_since_its_scores_keeps_them_and_is_warned_of(tmp_path: Path, example_slide: Path) -> None:
    """A slide whose file time changed but whose fingerprint (name, size, first and last MiB) did not is reused (a
    copy without -p, a touch), with one warning saying what was compared and how to rescore it; following that
    advice rescores it and records the new time. It used to be reused silently."""
    import os

    slides, run = tmp_path / "slides", tmp_path / "run"
    slides.mkdir()
    slide = Path(shutil.copy(example_slide, slides / example_slide.name))
    name = slide.stem
    assert run_cli("infer", slides, "-o", run, "--workers", "0", "--quiet").code == 0
    scores = (run / name / "scores.csv").stat().st_mtime_ns
    later = int(slide.stat().st_mtime) + 3600
    os.utime(slide, (later, later))
    res = run_cli("infer", slides, "-o", run, "--workers", "0", "--quiet")
    assert res.code == 0, res
    assert json.loads((run / "run.json").read_text())["slides"][0]["reused"]
    assert (run / name / "scores.csv").stat().st_mtime_ns == scores
    (line,) = [line for line in res.err_lines if "modification time" in line]
    assert line.startswith(f"wsi-screen: warning: {name}: the slide file's modification time changed since its "
                           "scores were made")
    assert "only its size and first and last MiB were compared" in line
    assert f"delete {run / name} and {run / 'stores' / name}.zarr" in line and "--overwrite" in line
    shutil.rmtree(run / name)
    shutil.rmtree(run / "stores" / f"{name}.zarr")
    res = run_cli("infer", slides, "-o", run, "--workers", "0", "--quiet")
    assert res.code == 0 and not json.loads((run / "run.json").read_text())["slides"][0]["reused"]
    assert runfolder.read_slide(run, name)["slide_info"]["mtime"] == later  # a rerun now would not warn


def test_failed_and_empty_slides_are_rows(tmp_path: Path, cmu_svs: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(cmu_svs, src / "good.svs")
    (src / "broken.svs").write_bytes(cmu_svs.read_bytes()[:5000])
    write_tiled_tiff(src / "glass.tif", block_image((1024, 1024), []), mpp=0.5)
    write_tiled_tiff(src / "nompp.tif", block_image((1024, 1024), [(0, 0, 512, 512)]), mpp=None)
    res = run_cli("infer", src, "-o", tmp_path / "run", "--workers", "0", "--quiet")
    assert res.code == 1
    assert "Traceback" not in res.err
    rows = read_results(tmp_path / "run")
    assert rows["good"]["status"] == "ok"
    assert rows["broken"]["status"] == "error" and "broken.svs" in rows["broken"]["error"]
    assert rows["broken"]["diagnosis"] == "error"
    # failed before tiling: no store was made, and the row names none (it used to name stores/<name>.zarr)
    assert rows["nompp"]["status"] == "error" and "mpp" in rows["nompp"]["error"]
    for name in ("broken", "nompp"):
        assert rows[name]["store"] == "" and not (tmp_path / "run" / "stores" / f"{name}.zarr").exists()
    assert rows["good"]["store"] == "stores/good.zarr" and (tmp_path / "run" / rows["good"]["store"]).exists()
    assert rows["glass"]["status"] == "no tissue" and rows["glass"]["diagnosis"] == "no tissue"
    assert rows["glass"]["n_patches"] == "0"
    # a slide without tissue has no call: the closing line counts it apart from those with one (not a failure)
    assert "; 2 (re)computed; 1 without a call (no tissue); 2 failed" in res.out
    assert "calls: 2 error, 1 no tissue, 1 normal (1 out of domain)" in res.out
    assert not list((tmp_path / "run").glob("*.partial"))


def test_a_slide_that_fails_on_a_rerun_has_its_earlier_results_moved_aside(tmp_path: Path, example_slide: Path,
                                                                           demo_run: Path) -> None:
    """A rerun on a slide since truncated used to leave the first run's heatmap, GeoJSON and scores in RUN/<slide>/
    beside an error row, without a word: they are moved to RUN/<slide>/stale/, named in one warning."""
    name = example_slide.stem
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("stores"))
    before = {f: (run / name / f).read_bytes() for f in runfolder.SLIDE_FILES}
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(example_slide, src / example_slide.name)
    with (src / example_slide.name).open("r+b") as fh:
        fh.truncate(100_000)
    res = run_cli("infer", src, "-o", run, "--workers", "0", "--quiet")
    assert res.code == 1 and "Traceback" not in res.err
    row = read_results(run)[name]
    assert row["status"] == "error" and "truncated or corrupt TIFF" in row["error"]
    stale = run / name / "stale"
    assert sorted(p.name for p in (run / name).iterdir()) == ["stale"]  # nothing left that looks current
    assert {f: (stale / f).read_bytes() for f in runfolder.SLIDE_FILES} == before  # nothing lost
    moved = [line for line in res.err_lines if "moved to" in line]
    assert len(moved) == 1 and name in moved[0] and str(stale) in moved[0], res.err
    assert runfolder.slide_folders(run) == []
    assert f"heatmap of {name}" not in (run / "report.html").read_text(encoding="utf-8")
    # a second failing run finds nothing more to move, and says nothing of it
    again = run_cli("infer", src, "-o", run, "--workers", "0", "--quiet")
    assert again.code == 1 and not any("moved to" in line for line in again.err_lines)
    assert {f: (stale / f).read_bytes() for f in runfolder.SLIDE_FILES} == before


def test_a_slide_skipped_as_busy_keeps_the_other_runs_results(tmp_path: Path, example_slide: Path,
                                                               demo_run: Path) -> None:
    """A slide another run was writing (its results or its store) is a busy row of this run, not the slide's
    failure: its folder, which the other run has just written, must not be moved to stale/ (two infer runs
    on one run folder lost each other's results so)."""
    from wsi_screen.screening.aggregate import STATUS_BUSY
    from wsi_screen.screening.outputs import STATUS_ERROR, SlideRow
    from wsi_screen.screening.run import set_aside_failed

    name = example_slide.stem
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("stores"))
    before = {f: (run / name / f).read_bytes() for f in runfolder.SLIDE_FILES}
    set_aside_failed(run, [SlideRow(name, str(example_slide), status=STATUS_BUSY, error="busy")])
    assert {f: (run / name / f).read_bytes() for f in runfolder.SLIDE_FILES} == before
    assert not (run / name / "stale").exists()
    set_aside_failed(run, [SlideRow(name, str(example_slide), status=STATUS_ERROR, error="corrupt")])
    assert sorted(p.name for p in (run / name).iterdir()) == ["stale"]  # the slide's own failure: moved aside


def test_bad_labels_file(tmp_path: Path, example_slide: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("name,truth\nx,1\n")
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--labels", bad, "--quiet")
    errors = [line for line in res.err_lines if line.startswith("wsi-screen: error:")]
    assert res.code == 1 and len(errors) == 1 and "'slide' and 'label'" in errors[0]



def test_a_label_of_neither_kind_names_the_words_of_both(tmp_path: Path, example_slide: Path) -> None:
    """'malignant' was refused naming only the negative words: what a positive label may say was not said."""
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide,label\n{example_slide.stem},malignant\n")
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--labels", labels, "--quiet")
    assert res.code == 1 and res.err_lines == [
        f"wsi-screen: error: {labels}:2: label 'malignant' is neither positive (the positive class 'tumour', or 1, "
        "abnormal, cancer, pos, positive, true, tumor, yes) nor negative (0, benign, false, neg, negative, no, "
        "normal)"], res
    assert not (tmp_path / "run" / "results.csv").exists()


def test_a_rerun_with_stray_labels_and_fewer_slides_is_whole_and_says_so(tmp_path: Path, example_slide: Path,
                                                                        demo_run: Path) -> None:
    """Label rows naming no slide used to end the run with an internal error before results.csv; and a rerun on
    fewer slides dropped the others from results.csv without a word. One rerun has both."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("stores"))
    shutil.copytree(run / example_slide.stem, run / "an earlier slide")  # a slide screened before, not now
    (run / "slide_metrics.json").write_text("{}")  # an earlier run's metrics, which would look current
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nCMU-1-Small-Regoin,tumour\nother.svs,normal\ncmu-1-small-region.SVS,normal\n")
    res = run_cli("infer", example_slide, "-o", run, "--stores", demo_run / "stores", "--labels", labels, "--quiet")
    assert res.code == 0, res
    # a slip of typing or case is named with the slide it nearly names (it named none: the user had to find it)
    assert "--labels: 3 row(s) name no slide of this run: CMU-1-Small-Regoin (CMU-1-Small-Region?), " \
           "cmu-1-small-region.SVS (CMU-1-Small-Region?), other.svs" in res.err
    assert "no labelled slide was scored in this run" in res.err
    assert any("1 slide folder(s) of an earlier run are not in this run's results.csv (kept as they are): "
               "an earlier slide" in line for line in res.err_lines)
    assert list(read_results(run)) == [example_slide.stem] and read_results(run)[example_slide.stem]["status"] == "ok"
    assert (run / "an earlier slide" / "slide.json").exists()  # kept
    assert (run / "run.json").exists() and (run / "report.html").exists() and not (run / "slide_metrics.json").exists()


def test_labelled_slides_the_run_did_not_score_are_named_by_the_slide_metrics(tmp_path: Path, example_slide: Path,
                                                                              demo_run: Path) -> None:
    """A labelled slide that failed left the slide metrics over fewer slides without a word on the terminal (only
    slide_metrics.json's unscored_labelled knew), while calibrate on the same run warns: the same warning."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("stores"))
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(example_slide, slides / example_slide.name)
    (slides / "broken.svs").write_bytes(example_slide.read_bytes()[:4096])  # its first IFD is missing
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide,label\n{example_slide.stem},normal\nbroken,tumour\n")
    res = run_cli("infer", slides, "-o", run, "--stores", demo_run / "stores", "--labels", labels, "--quiet")
    assert res.code == 1, res  # broken.svs is an error row
    said = "1 labelled slide(s) were not scored in the run and are left out: broken"
    assert f"wsi-screen: warning: slide metrics: {said}" in res.err_lines, res
    m = json.loads((run / "slide_metrics.json").read_text())
    assert m["n_slides"] == 1 and m["unscored_labelled"] == ["broken"] and said in m["warnings"]
    assert html.escape(said) in (run / "report.html").read_text(encoding="utf-8")


def test_a_rerun_without_labels_drops_the_earlier_runs_slide_metrics(tmp_path: Path, example_slide: Path,
                                                                     demo_run: Path) -> None:
    """A rerun without --labels (after new slides came in, say) left the labelled run's slide_metrics.json and
    slide_roc.png in the run folder, and report.html showed them as the run's "Slide-level evaluation": an AUC and
    rates of other slides and labels than its results.csv holds."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("stores"))
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nCMU-1-Small-Region,normal\n")
    labelled = run_cli("infer", example_slide, "-o", run, "--stores", demo_run / "stores", "--labels", labels,
                       "--quiet")
    assert labelled.code == 0 and (run / "slide_metrics.json").exists(), labelled
    assert "Slide-level evaluation" in (run / "report.html").read_text(encoding="utf-8")
    shutil.copy(run / "CMU-1-Small-Region" / "heatmap.png", run / "slide_roc.png")  # as a two-class run leaves it
    plain = run_cli("infer", example_slide, "-o", run, "--stores", demo_run / "stores", "--quiet")
    assert plain.code == 0, plain
    assert not (run / "slide_metrics.json").exists() and not (run / "slide_roc.png").exists()
    assert "Slide-level evaluation" not in (run / "report.html").read_text(encoding="utf-8")
    assert read_results(run)["CMU-1-Small-Region"]["label"] == ""


def test_labels_of_one_class_give_the_one_rate_and_say_why(tmp_path: Path, example_slide: Path,
                                                          demo_run: Path) -> None:
    """A cohort labelled normal only (to see how many slides a rule calls positive): the terminal printed no
    slide-metrics line at all, the report an empty "AUC" and the warning "only 0 positive slide(s): the slide
    sensitivity is measured on them (see its 95 % interval)", of a sensitivity nobody measured."""
    import html
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("stores"))
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nCMU-1-Small-Region,normal\n")
    res = run_cli("infer", example_slide, "-o", run, "--stores", demo_run / "stores", "--labels", labels, "--quiet")
    assert res.code == 0, res
    m = json.loads((run / "slide_metrics.json").read_text())
    assert (m["n_positive"], m["n_negative"], m["auc"], m["sensitivity"], m["specificity"]) == (0, 1, None, None, 1.0)
    why = "no positive slide among the labelled one: no AUC and no sensitivity, the specificity only"
    assert m["warnings"] == [why] and f"slide metrics: {why}" in res.err and "only 0 positive" not in res.err
    (line,) = [x for x in res.out.splitlines() if x.startswith("slide AUC")]
    assert line.startswith("slide AUC n/a, sensitivity n/a, specificity 1/1 (95 % CI 0.21-1.00)"), line
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "AUC n/a &middot; sensitivity n/a &middot; specificity 1/1 (95 % CI 0.21-1.00)" in page
    assert html.escape(why) in page


def test_a_run_keeps_no_patch_pixels_unless_asked_and_both_score_alike(demo_run: Path, example_slide: Path,
                                                                        tmp_path: Path) -> None:
    """By default infer streams: its stores are coordinates-only (no pixel array anywhere in the run folder), the
    report's patches are read from the slide, and --keep-patches (lz4 pixel stores) gives the same scores."""
    from wsi_screen.screening import runview

    def pixel_arrays(root: Path) -> list[Path]:
        found = []
        for meta in root.rglob("zarr.json"):
            node = json.loads(meta.read_text())
            if node.get("node_type") == "array" and len(node.get("shape", ())) == 4:
                found.append(meta.parent)
        return found + [p for p in root.rglob("*") if p.suffix in (".npy", ".npz", ".h5")]

    assert pixel_arrays(demo_run) == []
    stores = list((demo_run / "stores").glob("*.zarr"))
    assert stores and all(not PatchStore.open(s).has_pixels for s in stores)
    kept = tmp_path / "kept"
    res = run_cli("infer", example_slide.parent, "-o", kept, "--workers", "0", "--keep-patches", "--quiet")
    assert res.code == 0, res
    (pixels,) = pixel_arrays(kept)
    assert PatchStore.open(pixels.parent).codec.name == "lz4"  # type: ignore[union-attr]
    name = "CMU-1-Small-Region"
    assert (kept / name / "scores.csv").read_bytes() == (demo_run / name / "scores.csv").read_bytes()
    # a plain rerun into that run keeps its pixel stores and its scores (the same patches)
    again = run_cli("infer", example_slide.parent, "-o", kept, "--workers", "0", "--quiet")
    assert again.code == 0, again
    assert all(s["reused"] for s in json.loads((kept / "run.json").read_text())["slides"])
    assert pixel_arrays(kept) == [pixels]
    streamed = runview.top_patches(runview.open_run(demo_run), name, 4)
    stored = runview.top_patches(runview.open_run(kept), name, 4)
    assert all(a.image is not None and b.image is not None and np.array_equal(a.image, b.image)
               for a, b in zip(streamed, stored, strict=True))


def test_infer_stores_reuses_a_store_of_any_codec(tmp_path: Path, example_slide: Path, demo_run: Path) -> None:
    """`tile`'s default stores are JPEG: `infer --stores` reuses them (the same patches, kept another way); a plain
    rerun into that run folder does not reuse its JPEG-derived scores (it used to: "1 slide(s) reused")."""
    stores = tmp_path / "stores"
    assert run_cli("tile", example_slide, "-o", stores, "--mpp", "0.972", "--size", "96", "--quiet").code == 0
    store = stores / "CMU-1-Small-Region.zarr"
    before = (store / "zarr.json").read_bytes()
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--stores", stores, "--workers", "0", "--quiet")
    assert res.code == 0, res
    assert (store / "zarr.json").read_bytes() == before  # reused, not re-tiled
    assert PatchStore.open(store).codec.name == "jpeg"  # type: ignore[union-attr]
    # the scores came from JPEG patches: the run says so (they differ from a run on the slide, and may flip the
    # slide's domain flag: a TCGA slide was in domain at 53 % from its JPEG store, out at 49 % streamed)
    jpeg = {"pixels": "store", "codec": {"name": "jpeg", "quality": 90}}
    warnings = [line for line in res.err_lines if "JPEG-compressed patches" in line]
    assert len(warnings) == 1 and "CMU-1-Small-Region" in warnings[0] and "jpeg quality 90" in warnings[0]
    assert "their scores differ from a run on the slides, and a slide's out-of-domain flag (or a call near the " \
        "threshold) can differ too" in warnings[0] and "slightly" not in warnings[0]  # was "and its ... flag"
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["tiling"]["scored_from"] == [{**jpeg, "n_slides": 1}]
    assert [s["store_pixels"] for s in run_json["slides"]] == [jpeg]
    assert runfolder.read_slide(tmp_path / "run", "CMU-1-Small-Region")["store_pixels"] == jpeg
    report = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "Scored from lossy patches of reused stores: jpeg quality 90 (1 slide(s))" in report
    # a rerun that reuses those scores still says where they came from
    again = run_cli("infer", example_slide, "-o", tmp_path / "run", "--stores", stores, "--workers", "0", "--quiet")
    assert again.code == 0, again
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["slides"][0]["reused"] and run_json["slides"][0]["store_pixels"] == jpeg
    assert sum("JPEG-compressed patches" in line for line in again.err_lines) == 1
    # a plain rerun reads its own stores (coordinates-only, the slide's pixels), so it rescores
    plain = run_cli("infer", example_slide, "-o", tmp_path / "run", "--workers", "0")
    assert plain.code == 0, plain
    assert "0 slide(s) reused" in plain.out and not any("compressed patches" in line for line in plain.err_lines)
    name = "CMU-1-Small-Region"
    assert (tmp_path / "run" / name / "scores.csv").read_bytes() == (demo_run / name / "scores.csv").read_bytes()
    assert read_results(tmp_path / "run")[name]["store"] == f"stores/{name}.zarr"
    assert not PatchStore.open(tmp_path / "run" / "stores" / f"{name}.zarr").has_pixels
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["tiling"]["scored_from"] == [{"pixels": "none", "codec": None, "n_slides": 1}]
    assert not run_json["slides"][0]["reused"]


def test_infer_stores_of_lz4_patches_score_exactly_as_a_run_on_the_slide(tmp_path: Path, example_slide: Path,
                                                                          demo_run: Path) -> None:
    """An lz4 store holds the slide's patches byte for byte: `infer --stores` gives a plain run's scores, and
    no warning about lossy patches."""
    stores = tmp_path / "stores"
    assert run_cli("tile", example_slide, "-o", stores, "--mpp", "0.972", "--size", "96", "--codec", "lz4",
                   "--quiet").code == 0
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--stores", stores, "--workers", "0", "--quiet")
    assert res.code == 0, res
    assert not any("compressed patches" in line for line in res.err_lines)
    assert "lossy patches" not in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    name = "CMU-1-Small-Region"
    assert (tmp_path / "run" / name / "scores.csv").read_bytes() == (demo_run / name / "scores.csv").read_bytes()
    assert read_results(tmp_path / "run")[name]["score"] == read_results(demo_run)[name]["score"]
    lz4 = {"pixels": "store", "codec": {"name": "lz4", "quality": None}}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["tiling"]["scored_from"] == [{**lz4, "n_slides": 1}]
    streamed = json.loads((demo_run / "run.json").read_text())
    assert streamed["tiling"]["scored_from"] == [{"pixels": "none", "codec": None, "n_slides": 1}]


def test_infer_stores_reads_a_coordinates_only_store_from_the_moved_slide_it_is_given(tmp_path: Path,
                                                                                     example_slide: Path,
                                                                                     demo_run: Path) -> None:
    """A coordinates-only store whose slide has moved used to fail `infer SLIDE --stores DIR` ("... reads its
    patches from the slide <old path> ... PatchStore.open(..., slide=PATH)") though the slide was given: the run
    now reads the slide it was given (the store's fingerprint matched it), with a plain run's scores."""
    name = example_slide.stem
    stores, moved = coordinates_only_store_of_a_moved_slide(example_slide, tmp_path)
    before = (stores / f"{name}.zarr" / "zarr.json").read_bytes()
    res = run_cli("infer", moved, "-o", tmp_path / "run", "--stores", stores, "--workers", "0")
    assert res.code == 0, res
    assert (stores / f"{name}.zarr" / "zarr.json").read_bytes() == before  # reused, not re-tiled
    assert (tmp_path / "run" / name / "scores.csv").read_bytes() == (demo_run / name / "scores.csv").read_bytes()
    row = read_results(tmp_path / "run")[name]
    assert row["status"] == "ok" and row["source"] == str(moved)
    assert row["score"] == read_results(demo_run)[name]["score"]
    assert "patch pixels unavailable" not in res.err  # the report's top patches were read from the moved slide too
    # in Python: score() reads the store from the slide it was opened with (it used to reopen it without)
    import wsi_screen

    with PatchStore.open(stores / f"{name}.zarr", slide=moved) as store:
        probs = wsi_screen.score(store).probabilities
    assert np.allclose(probs, runfolder.read_scores(demo_run / name / "scores.csv").probs, atol=1e-6)


def test_run_infer_raises_by_default_and_records_for_the_command(tmp_path: Path, slides_dir: Path) -> None:
    """on_error: the library raises a slide's failure; the command's policy ("record") makes it a row."""
    from tests.corpus import corrupt_tiles
    from wsi_screen.errors import SlideReadError
    from wsi_screen.screening.run import InferConfig, run_infer

    folder = tmp_path / "in"
    folder.mkdir()
    corrupt_tiles(slides_dir / "CMU-1-Small-Region.svs", folder / "corrupt.svs", range(40, 80))
    model = load_model()
    with pytest.raises(SlideReadError, match="corrupt"):
        run_infer([str(folder)], tmp_path / "raised", model, default_model_dir(), InferConfig(workers=1))
    summary = run_infer([str(folder)], tmp_path / "recorded", model, default_model_dir(), InferConfig(workers=1),
                        on_error="record")
    assert summary.failed == 1 and "corrupt JPEG data" in summary.rows[0].error
    assert read_results(tmp_path / "recorded")["corrupt"]["status"] == "error"


def test_screen_slide_keeps_the_callers_decision_thresholds(tmp_path: Path) -> None:
    """The slide rule's thresholds are added for one slide's scoring, then the caller's come back."""
    from wsi_screen.screening.aggregate import AggregateConfig
    from wsi_screen.screening.run import InferConfig, SlideJob, screen_slide, tile_config_for
    from wsi_screen.slide.discovery import SlideSource

    slide = write_tiled_tiff(tmp_path / "block.tif", block_image((768, 768), [(96, 96, 672, 672)], seed=3), mpp=0.972)
    classifier = load_model(None)
    classifier.decision_thresholds = (0.123,)
    seen: list[tuple[float, ...]] = []
    score_tensor = classifier.score_tensor

    def spy(x):  # type: ignore[no-untyped-def]
        seen.append(classifier.decision_thresholds)
        return score_tensor(x)

    classifier.score_tensor = spy  # type: ignore[method-assign]
    job = SlideJob(run=tmp_path / "run", stores=str(tmp_path / "stores"),
                   tile=tile_config_for(classifier, InferConfig()), model_id={"sha256": "0" * 64},
                   aggregate=AggregateConfig(rule="region", region_threshold=0.8))
    row = screen_slide(SlideSource(slide, "block"), job, classifier)
    assert row.status == "ok", row.error
    assert classifier.spec.threshold is not None
    assert seen and set(seen) == {tuple(sorted({0.123, classifier.spec.threshold, 0.5, 0.8}))}
    assert classifier.decision_thresholds == (0.123,)


def test_infer_summary_names_the_models_grid_and_reads_with_any_focus_size(tmp_path: Path,
                                                                             example_slide: Path) -> None:
    """A model with another patch size and mpp than the bundled one's, and no slide_rule.json (foci of any size):
    the closing summary measures on that model's grid and its sentence is whole."""
    import torch

    from wsi_screen.models import ModelSpec, create_model, save_model

    torch.manual_seed(0)
    model = save_model(tmp_path / "model", create_model("screen_cnn32", num_classes=2),
                       ModelSpec(arch="screen_cnn32", classes=["normal", "tumour"], input_size=32, mpp=2.0,
                                 positive_class="tumour", threshold=0.437))
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--model", model, "--workers", "0")
    assert res.code == 0, res
    assert "foci: regions at p >= 0.437 (the pictures' patch threshold)" in res.out
    assert "regions of at" not in res.out
    assert "measured on the ~64 um patch grid)" in res.out and "93 um" not in res.out


def test_a_k_other_than_the_thresholds_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """`infer --aggregate topk --k 1000` kept the threshold calibrated for top-1 without a word."""
    import logging

    from wsi_screen.cli import SETTING_FLAGS
    from wsi_screen.errors import in_user_words, name_settings
    from wsi_screen.screening.run import InferConfig, resolve_aggregate

    folder = default_model_dir()
    model = load_model(folder)
    calibrated = json.loads((folder / "slide_rule.json").read_text())["per_rule"]["topk"]
    with caplog.at_level(logging.WARNING, logger="wsi_screen"):
        agg = resolve_aggregate(folder, model, InferConfig(rule="topk", k=1000))
        assert (agg.k, agg.slide_threshold) == (1000, calibrated["threshold"])  # the threshold stays
        for quiet in (InferConfig(rule="topk", k=calibrated["k"]), InferConfig(rule="topk", k=1000, threshold=0.9)):
            resolve_aggregate(folder, model, quiet)  # the calibrated k, a threshold given
        with pytest.raises(ConfigError, match="`k` is read by the topk rule only, and the slide rule is max"):
            resolve_aggregate(folder, model, InferConfig(rule="max", k=1000))  # a rule without k: refused, not quiet
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"`k`=1000 is not the k the slide threshold {calibrated['threshold']:.3g} was calibrated for "
                    f"(k = {calibrated['k']}, {folder / 'slide_rule.json'}); the threshold is kept: set `threshold` "
                    "for this k, or calibrate a copy of the model with it (wsi-screen calibrate)"]
    with name_settings(SETTING_FLAGS):
        shown = in_user_words(said[0])
    assert shown.startswith("--k=1000 is not the k") and "set --threshold for this k" in shown  # the CLI's words


def test_the_slide_auc_interval_does_not_follow_the_order_slides_were_given(tmp_path: Path) -> None:
    """`infer b.svs a.svs` and `infer a.svs b.svs` wrote different auc_ci95 for the same slides: the bootstrap draws by
    position and the rows followed the command line. The slide metrics take the slides by name."""
    from wsi_screen.screening.aggregate import AggregateConfig, SlideResult
    from wsi_screen.screening.outputs import SlideRow, slide_metrics

    rng = np.random.default_rng(3)
    labels = rng.random(30) < 0.4
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    rows = [SlideRow(name=f"s{i:02d}", source=f"s{i:02d}.svs", label="positive" if y else "negative",
                     result=SlideResult(score=float(v), diagnosis="tumour" if v >= 0.5 else "normal", n_patches=10))
            for i, (y, v) in enumerate(zip(labels, scores, strict=True))]
    aggregate = AggregateConfig(slide_threshold=0.5)
    found = []
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    for order, name in ((rows, "given"), (rows[::-1], "reversed"), (shuffled, "shuffled")):
        (tmp_path / name).mkdir()
        m = slide_metrics(tmp_path / name, list(order), None, aggregate)  # type: ignore[arg-type]
        assert m is not None
        found.append((m["auc"], m["auc_ci95"]))
    assert found[0] == found[1] == found[2] and found[0][1][0] < found[0][0] < found[0][1][1]
