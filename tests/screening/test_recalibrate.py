"""Slide calls of the bundled model on slides built like real ones, metastasis size, and recalibration.

Slides are calibration-cohort layouts (irregular tissue and foci, every patch in a random orientation; 700-1,600
tissue patches) of PCam *valid* patches, written as pyramidal TIFFs and screened by ``wsi-screen infer`` end to end.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import read_results, run_cli
from wsi_screen.screening import runview
from wsi_screen.screening.aggregate import AggregateConfig, describe
from wsi_screen.screening.callview import views_key
from wsi_screen.screening.heatmap import drawn_with
from wsi_screen.synthetic import cohort
from wsi_screen.synthetic.slides import build_layout_slide, load_pool

CELL_MM = 96 * 0.972 / 1000


def _micro(pools: dict[str, int]) -> cohort.SlideLayout:
    """A micro-metastasis of 22-58 patches (0.2-2 mm), the size the issue's realistic slides held."""
    for seed in range(104, 200):
        lay = cohort.make_layout(np.random.default_rng(seed), 900, ["micro"], cell_mm=CELL_MM, pools=pools)
        if 22 <= lay.tumour.sum() <= 58:
            return lay
    raise AssertionError("no layout with a 22-58 patch micro-metastasis")


@pytest.fixture(scope="module")
def slides(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, cohort.SlideLayout]]:
    pcam = patches_dir / "pcam"
    pools = {k: len(v) for k, v in load_pool(pcam, "valid").items()}
    folder = tmp_path_factory.mktemp("cohort")
    layouts = {
        "neg_small": cohort.make_layout(np.random.default_rng(101), 700, [], cell_mm=CELL_MM, pools=pools),
        "neg_large": cohort.make_layout(np.random.default_rng(102), 1600, [], cell_mm=CELL_MM, pools=pools),
        "macro": cohort.make_layout(np.random.default_rng(103), 1600, ["macro"], cell_mm=CELL_MM, pools=pools),
        "micro": _micro(pools),
    }
    for name, lay in layouts.items():
        build_layout_slide(folder / "slides" / f"{name}.tiff", lay, patches_dir=pcam, seed=7)
    rows = ["slide,label"] + [f"{n},{'tumour' if lay.positive else 'normal'}" for n, lay in layouts.items()]
    (folder / "slides.csv").write_text("\n".join(rows) + "\n")
    return folder, layouts


@pytest.fixture(scope="module")
def run(slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, _ = slides
    out = tmp_path_factory.mktemp("run") / "run"
    res = run_cli("infer", folder / "slides", "-o", out, "--labels", folder / "slides.csv", "--quiet")
    assert res.code == 0, res
    return out


def test_calls_and_metastasis_size(run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]]) -> None:
    _, layouts = slides
    rows = read_results(run)
    assert {n: r["diagnosis"] for n, r in rows.items()} == {"neg_small": "normal", "neg_large": "normal",
                                                            "macro": "tumour", "micro": "tumour"}
    for name in ("neg_small", "neg_large"):
        r = rows[name]
        assert (r["metastasis"], r["n_foci"], r["largest_focus_mm"]) == ("none", "0", "0.000")
    macro, truth = rows["macro"], layouts["macro"]
    assert macro["metastasis"] == "macro" and int(macro["n_foci"]) >= 1
    # the measured focus is the true one, to within the patches the tiler or the model lose at its edge
    assert abs(float(macro["largest_focus_mm"]) - truth.largest_focus_mm) < 0.25 * truth.largest_focus_mm
    assert 0.6 * truth.foci[0].area_mm2 < float(macro["tumour_area_mm2"]) < 1.2 * truth.foci[0].area_mm2
    assert rows["micro"]["metastasis"] in ("micro", "itc")
    assert float(rows["micro"]["largest_focus_mm"]) <= 2.0
    rule = json.loads((run / "run.json").read_text())["aggregate"]
    assert {r["rule"] for r in rows.values()} == {rule["rule"]}
    metrics = json.loads((run / "slide_metrics.json").read_text())
    assert metrics["auc"] == 1.0 and metrics["sensitivity"] == 1.0 and metrics["specificity"] == 1.0
    # the heatmap outlines the largest focus: it records the focus it was drawn with
    assert "|v1|" not in (drawn_with(run / "macro" / "heatmap.png") or "") and \
        drawn_with(run / "macro" / "heatmap.png") != drawn_with(run / "neg_small" / "heatmap.png")


def test_calibrate_writes_a_model_copy_that_infer_uses(run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]],
                                                     tmp_path: Path) -> None:
    folder, _ = slides
    out = tmp_path / "calibrated"
    res = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", out)
    assert res.code == 0, res
    assert "chosen on 2 positive and 2 negative slides" in res.out
    # four slides cannot establish 99 % specificity or choose a rule: said on the terminal and in the model
    assert "only 2 negative slide(s): a specificity of 0.99 cannot be checked on fewer than 100" in res.err
    assert "95 % lower bound of 0.34" in res.err and "only 2 positive slide(s)" in res.err
    doc = json.loads((out / "slide_rule.json").read_text())
    assert len(doc["warnings"]) == 3 and "negative slide(s)" in doc["warnings"][0]
    assert doc["calibrated_on"]["n_slides"] == 4 and doc["calibrated_on"]["run"] == str(run.resolve())
    assert doc["rule"] in ("mean", "max", "topk", "fraction", "smoothmax", "region")
    assert (out / "model.safetensors").read_bytes() == (Path(doc["calibrated_on"]["source_model"]) /
                                                        "model.safetensors").read_bytes()
    # the copy's card states the calibrated rule and threshold, not the source's (it used to)
    point = json.loads((out / "card.json").read_text())["operating_point"]
    config = json.loads((out / "config.json").read_text())
    stated = describe(AggregateConfig(rule=doc["rule"], k=doc["k"], slide_threshold=doc["slide_threshold"],
                                      radius=doc["radius"], region_threshold=doc["region_threshold"],
                                      patch_threshold=doc["patch_threshold"]), "tumour",
                      patch_area_mm2=(config["mpp"] * config["input_size"] / 1000) ** 2)
    assert point["slide_threshold"] == doc["slide_threshold"]
    assert point["slide_rule"] == stated and f"{doc['slide_threshold']:.3g}" in stated
    source_card = json.loads((Path(doc["calibrated_on"]["source_model"]) / "card.json").read_text())
    assert (point["slide_rule"] == source_card["operating_point"]["slide_rule"]) == (
        doc["rule"] == "region" and f"{doc['slide_threshold']:.3g}" == "0.0479")
    card_text = run_cli("models", "--card", out)
    assert card_text.code == 0 and f"slide_rule: {point['slide_rule']}" in card_text.out
    again = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", out)
    assert again.code != 0 and "already exists" in again.err
    replaced = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", out, "--overwrite")
    assert replaced.code == 0, replaced
    assert json.loads((out / "slide_rule.json").read_text())["rule"] == doc["rule"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated"]  # swapped in whole: no partial, no old copy
    # infer with the copy, over a copy of the run: the same weights, so the scores are reused and only the
    # calibrated rule is applied afresh (no second scoring of the four slides)
    rerun = tmp_path / "rerun"
    shutil.copytree(run, rerun)
    res = run_cli("infer", folder / "slides", "-o", rerun, "--model", out, "--stores", run / "stores", "--quiet")
    assert res.code == 0, res
    assert all(s["reused"] for s in json.loads((rerun / "run.json").read_text())["slides"])
    assert json.loads((rerun / "run.json").read_text())["model"]["path"] == str(out)
    assert {n: r["rule"] for n, r in read_results(rerun).items()} == dict.fromkeys(read_results(run), doc["rule"])
    assert all(r["diagnosis"] == ("tumour" if n in ("macro", "micro") else "normal")
               for n, r in read_results(rerun).items())  # separable on these four slides at 99 % specificity
    report = (rerun / "report.html").read_text()
    assert f"Slide call: {html.escape(point['slide_rule'])}" in report, report[report.find("modelcard\""):][:900]
    assert "(override:" not in report


def test_calibrate_prints_its_candidates_in_order_under_a_header_and_each_setting_it_changed(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path) -> None:
    """The region rule's min_focus_patches and call_patch_threshold changed without a word; the candidates table
    had no header and came sorted by sensitivity (region rows out of their order)."""
    from wsi_screen.screening.calibration import candidates

    folder, _ = slides
    res = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", tmp_path / "c")
    assert res.code == 0, res
    lines = res.out.splitlines()
    assert lines[0].split() == ["candidate", "AUC", "threshold", "sensitivity", "specificity"]
    names = [c.name for c in candidates()]
    assert [line.split()[0] for line in lines[1:1 + len(names)]] == names  # by rule, then its setting
    doc = json.loads((tmp_path / "c" / "slide_rule.json").read_text())
    assert [line.split()[0] for line in lines if line.endswith("<- chosen")] == [doc["name"]]
    source = Path(doc["calibrated_on"]["source_model"]) / "slide_rule.json"
    old = json.loads(source.read_text())
    assert (old["rule"], old["min_focus_patches"], old["region_threshold"]) == ("region", 6, 0.8)  # the bundled rule
    expected = [f"  {key}: {old[key]} -> {doc[key]}" for key in ("rule", "k", "radius") if old[key] != doc[key]]
    expected += [f"  slide_threshold: {old['slide_threshold']:.4g} -> {doc['slide_threshold']:.4g}"] \
        if old["slide_threshold"] != doc["slide_threshold"] else []
    expected += [f"  call_patch_threshold: {old['region_threshold']:.4g} -> {doc['call_patch_threshold']:.4g}"] \
        if old["region_threshold"] != doc["call_patch_threshold"] else []
    expected += [f"  min_focus_patches: {old['min_focus_patches']} -> {doc['min_focus_patches']}"] \
        if old["min_focus_patches"] != doc["min_focus_patches"] else []
    at = lines.index(f"changed from {source}:")
    assert expected and lines[at + 1:at + 1 + len(expected)] == expected
    assert lines[at + 1 + len(expected)].startswith("calibrated model: ")


def test_calibrate_finds_the_model_of_a_moved_run_from_any_folder(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run scored with `--model` given relative to the working folder, copied elsewhere and calibrated from a
    third folder: run.json's model path is found (it was recorded as typed and joined to the run folder)."""
    from wsi_screen.models import default_model_dir

    folder, _ = slides
    work = tmp_path / "lab"
    shutil.copytree(default_model_dir(), work / "models" / "m")
    shutil.copytree(run, work / "runs" / "lab")
    monkeypatch.chdir(work)
    res = run_cli("infer", folder / "slides", "-o", "runs/lab", "--model", "models/m", "--stores", run / "stores",
                  "--quiet")
    assert res.code == 0, res
    info = json.loads((work / "runs" / "lab" / "run.json").read_text())
    assert info["model"]["path"] == str((work / "models" / "m").resolve())
    moved = tmp_path / "x"
    shutil.copytree(work / "runs" / "lab", moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = run_cli("calibrate", moved, "--labels", folder / "slides.csv", "-o", tmp_path / "c")
    assert res.code == 0, res
    doc = json.loads((tmp_path / "c" / "slide_rule.json").read_text())
    assert doc["calibrated_on"]["source_model"] == str((work / "models" / "m").resolve())


def test_calibrate_refuses_a_model_that_did_not_score_the_run(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path) -> None:
    from wsi_screen.models import default_model_dir

    folder, _ = slides
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(default_model_dir(), same)
    shutil.copytree(default_model_dir(), other)
    config = json.loads((other / "config.json").read_text())
    config["threshold"] = 0.5  # another operating point: another model (its sha256 covers weights and config)
    (other / "config.json").write_text(json.dumps(config))
    res = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", tmp_path / "c", "--model", other)
    assert res.code != 0 and not (tmp_path / "c").exists()
    scored_by = json.loads((run / "run.json").read_text())["model"]
    assert res.err_lines == [f"wsi-screen: error: {other} did not score the run {run} (sha256 "
                             f"{res.err.split('(sha256 ')[1][:12]}; the run was scored by {scored_by['path']}, "
                             f"sha256 {scored_by['sha256'][:12]}); rerun `wsi-screen infer` with this model, or leave "
                             "--model unset to calibrate the run's own"], res
    # a copy of the run's own model (the same sha256) is the model that scored it
    res = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", tmp_path / "c", "--model", same)
    assert res.code == 0, res


def test_calibrate_refuses_an_existing_folder_before_any_work(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.csv").write_text("slide,status\n")  # no run.json, no model: the work would fail on them
    labels = tmp_path / "slides.csv"
    labels.write_text("slide,label\na,tumour\n")
    (tmp_path / "c").mkdir()
    res = run_cli("calibrate", run, "--labels", labels, "-o", tmp_path / "c")
    assert res.err_lines == [f"wsi-screen: error: {tmp_path / 'c'} already exists; set --overwrite or choose another "
                             "folder"] and res.code != 0, res


def test_calibrate_names_labels_that_match_no_slide_and_refuses_reversed_ones(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path) -> None:
    _, layouts = slides
    labels = tmp_path / "slides.csv"
    labels.write_text("slide,label\nlab-1.svs,tumour\nlab-2.svs,normal\n")
    res = run_cli("calibrate", run, "--labels", labels, "-o", tmp_path / "c")
    assert res.code != 0 and not (tmp_path / "c").exists()
    assert res.err_lines == [f"wsi-screen: error: --labels: none of its 2 row(s) names a slide of the run {run} (its "
                             "slide column must hold the slide names of results.csv, e.g. macro, micro, neg_large, "
                             "neg_small): lab-1.svs, lab-2.svs"], res
    # labels the wrong way round (and one of another run): no rule detects a 'positive' while keeping the
    # 'negatives' below its threshold; nothing is written (a copy calling every slide negative was), one line says why
    rows = ["slide,label", "lab-1.svs,tumour"] + [f"{n},{'normal' if lay.positive else 'tumour'}"
                                                   for n, lay in layouts.items()]
    labels.write_text("\n".join(rows) + "\n")
    res = run_cli("calibrate", run, "--labels", labels, "-o", tmp_path / "c")
    assert res.code == 1 and not (tmp_path / "c").exists(), res
    assert res.err_lines[0] == "wsi-screen: warning: --labels: 1 row(s) name no slide of this run: lab-1.svs"
    assert res.err_lines[-1].startswith("wsi-screen: error: calibration: the best rule, ")
    assert res.err_lines[-1].endswith(
        "of the 2 positive slide(s) at specificity >= 0.99; the rules rank the negatives above the positives: the "
        "labels look reversed (tumour and normal swapped?); no model was written"), res.err
    # a header alone: the file has no rows (it said none of its 0 rows named a slide, then an empty list)
    labels.write_text("slide,label\n")
    res = run_cli("calibrate", run, "--labels", labels, "-o", tmp_path / "c")
    assert res.code == 1 and res.err_lines == [f"wsi-screen: error: --labels: {labels} has no rows (a header only?); "
                                               "give a slide,label row for each labelled slide of the run"], res


def test_calibrate_refuses_one_slide_labelled_twice_by_its_file_name(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path) -> None:
    """'macro,tumour' and 'macro.tiff,normal' label one slide: the second was dropped without a word."""
    _, layouts = slides
    labels = tmp_path / "slides.csv"
    rows = [f"{n},{'tumour' if lay.positive else 'normal'}" for n, lay in layouts.items()]
    labels.write_text("\n".join(["slide,label", *rows, "macro.tiff,normal"]) + "\n")
    res = run_cli("calibrate", run, "--labels", labels, "-o", tmp_path / "c")
    assert res.code == 1 and not (tmp_path / "c").exists()
    assert res.err_lines == [f"wsi-screen: error: {labels}:6: 'macro.tiff' is the slide 'macro', given the label "
                             "'normal' (negative) here and 'tumour' (positive) on line 4; keep one"], res


def test_calibrate_names_labelled_slides_that_failed_and_the_slides_it_used(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path) -> None:
    """A labelled slide that failed in the run was left out without a word, and calibrated_on listed no slide;
    4 slides printed 'sensitivity 1.000 specificity 1.000' (no counts, no interval)."""
    import csv

    from wsi_screen.metrics import wilson

    folder, _ = slides
    copy = _run_copy(run, tmp_path / "run")
    with (copy / "results.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    for row in table:
        if row["slide"] == "neg_large":
            row["status"] = "failed"
    with (copy / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    res = run_cli("calibrate", copy, "--labels", folder / "slides.csv", "-o", tmp_path / "c")
    assert res.code == 0, res
    assert "wsi-screen: warning: calibration: 1 labelled slide(s) were not scored in the run and are left out: " \
           "neg_large" in res.err_lines
    doc = json.loads((tmp_path / "c" / "slide_rule.json").read_text())
    assert doc["calibrated_on"]["slides"] == ["macro", "micro", "neg_small"]
    assert doc["calibrated_on"]["not_scored"] == ["neg_large"] and doc["calibrated_on"]["n_slides"] == 3
    lo2, lo1 = wilson(2, 2)[0], wilson(1, 1)[0]
    line = [t for t in res.out.splitlines() if t.startswith("on these slides: ")]
    assert line == [f"on these slides: sensitivity 2/2 (95 % CI {lo2:.2f}-1.00), specificity 1/1 (95 % CI "
                    f"{lo1:.2f}-1.00), AUC 1.000 (95 % CI 1.000-1.000)"], res.out
    assert doc["on_calibration_slides"]["sensitivity"]["detected"] == 2
    # the copy's card says it is a recalibration; its weights are the source's
    card = json.loads((tmp_path / "c" / "card.json").read_text())
    assert card["name"] == "wsi-screen default model (resnet10t, PatchCamelyon), recalibrated on 3 slides (run)"
    assert run_cli("models", "--card", tmp_path / "c").out.count("recalibrated on 3 slides (run)") >= 1


def test_changing_the_rule_redraws_the_heatmap(run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]],
                                               tmp_path: Path) -> None:
    folder, _ = slides
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = drawn_with(copy / "macro" / "heatmap.png")
    res = run_cli("infer", folder / "slides", "-o", copy, "--stores", run / "stores", "--aggregate", "smoothmax",
                  "--threshold", "0.99", "--quiet")
    assert res.code == 0, res
    rows = read_results(copy)
    assert rows["macro"]["rule"] == "smoothmax"
    after = drawn_with(copy / "macro" / "heatmap.png")
    assert after != before and "smoothmax" in (after or "")
    # the GeoJSON is redrawn with it: smoothmax has no patch threshold of its own, so tiles follow the focus
    # threshold (one operating point with the foci), never the model's; the neighbourhood it read is its evidence
    fc = json.loads((copy / "macro" / "patches.geojson").read_text())
    info = json.loads((copy / "run.json").read_text())
    assert fc["wsi_screen"]["threshold"] == info["aggregate"]["call_patch_threshold"] == \
        info["aggregate"]["region_threshold"] != info["model"]["patch_threshold"]
    assert fc["wsi_screen"]["threshold_source"].startswith("the focus threshold (the smoothmax rule")
    assert 1 <= len(fc["wsi_screen"]["evidence_indices"]) <= 9  # the tissue patches of one 3 x 3 neighbourhood
    assert fc["wsi_screen"]["n_foci"] == int(rows["macro"]["n_foci"])
    # the report's header names the command-line settings as overrides of the model's calibrated rule
    assert "(override: --aggregate smoothmax --threshold 0.99; not the model's calibrated rule)" in \
        (copy / "report.html").read_text()


def test_foci_annotations_lie_in_the_true_foci_and_tiles_follow_the_calls_threshold(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]]) -> None:
    import shapely
    import shapely.geometry

    _, layouts = slides
    rows = read_results(run)
    threshold = json.loads((run / "run.json").read_text())["aggregate"]["region_threshold"]
    for name, lay in layouts.items():
        fc = json.loads((run / name / "patches.geojson").read_text())
        meta = fc["wsi_screen"]
        assert meta["threshold"] == threshold == 0.8  # the bundled rule's, not the model's 0.213
        tiles = [f["properties"] for f in fc["features"] if f["properties"]["objectType"] == "tile"]
        foci = [f for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
        tumour = np.array([t["classification"]["name"] == "tumour" for t in tiles])
        assert np.array_equal(tumour, [t["measurements"]["tumour"] >= meta["threshold"] for t in tiles]), name
        assert len(foci) == meta["n_foci"] == int(rows[name]["n_foci"] or 0), name
        if not lay.positive:
            assert rows[name]["diagnosis"] == "normal" and foci == []
            assert tumour.mean() <= 0.05, (name, tumour.mean())
            continue
        assert foci and rows[name]["diagnosis"] == "tumour"
        cells = np.argwhere(lay.tumour)
        truth = shapely.union_all(shapely.box(cells[:, 1] * 96, cells[:, 0] * 96, cells[:, 1] * 96 + 96,
                                              cells[:, 0] * 96 + 96))
        shapes = [shapely.geometry.shape(f["geometry"]) for f in foci]
        assert all(shapely.is_valid(s) for s in shapes)
        inside = [s.intersection(truth).area / s.area for s in shapes]
        assert inside[0] >= 0.6, (name, inside)  # the largest focus lies in the true one
        sizes = [f["properties"]["measurements"]["patches"] for f in foci]
        assert sizes == sorted(sizes, reverse=True)
        largest = foci[0]["properties"]
        assert largest["measurements"]["longest axis (mm)"] == pytest.approx(float(rows[name]["largest_focus_mm"]),
                                                                               abs=1e-3)
        assert largest["category"] == rows[name]["metastasis"]
        # the notebook's call is the run's: the same foci, and heatmap.png was drawn from it
        ctx = runview.slide_call(runview.open_run(run), name)
        assert ctx.result is not None and [f.n_patches for f in ctx.foci] == sizes
        assert views_key(ctx) == drawn_with(run / name / "heatmap.png")


def test_labels_that_disagree_with_the_call_are_marked_and_the_slide_metrics_have_intervals(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path) -> None:
    """A slide labelled tumour and called normal was marked nowhere, and `infer --labels` printed 'sensitivity 1.0'
    without an interval or the small-cohort warning `calibrate` gives: results.csv's label_agrees (its last column),
    the report's 'disagrees' badge, Wilson intervals in slide_metrics.json, the printed line and the report."""
    from wsi_screen.metrics import wilson

    folder, _ = slides
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    labels = tmp_path / "labels.csv"  # neg_small, called normal, labelled tumour
    labels.write_text("slide,label\nneg_small,tumour\nneg_large,normal\nmacro,tumour\nmicro,tumour\n")
    res = run_cli("infer", folder / "slides", "-o", copy, "--labels", labels, "--quiet")
    assert res.code == 0, res
    header = (copy / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-1] == "label_agrees"
    rows = read_results(copy)
    assert {n: r["label_agrees"] for n, r in rows.items()} == {"neg_small": "false", "neg_large": "true",
                                                               "macro": "true", "micro": "true"}
    page = (copy / "report.html").read_text()
    flagged = re.findall(r'<tr class="([^"]*)">(.*?)</tr>', page.split('<table class="sortable" id="slides">')[1]
                         .split("</table>")[0])
    marked = [cells for cls, cells in flagged if "disagree" in cls.split()]
    assert len(marked) == 1 and ">neg_small</a>" in marked[0] and ">disagrees</span>" in marked[0]
    assert page.count(">disagrees</span>") == 1
    m = json.loads((copy / "slide_metrics.json").read_text())
    assert (m["confusion"], m["sensitivity"], m["specificity"]) == ({"tp": 2, "fn": 1, "tn": 1, "fp": 0},
                                                                    pytest.approx(2 / 3), 1.0)
    assert m["sensitivity_ci95"] == pytest.approx(list(wilson(2, 3)))
    assert m["specificity_ci95"] == pytest.approx(list(wilson(1, 1))) and m["specificity_ci95"][1] == 1.0
    lo, hi = wilson(2, 3)
    # counts, as calibrate gives them ('sensitivity 0.667' said nothing of how few slides it was measured on)
    assert f"sensitivity 2/3 (95 % CI {lo:.2f}-{hi:.2f}), specificity 1/1 (95 % CI " in res.out
    small = "only 3 positive slide(s): the slide sensitivity is measured on them (see its 95 % interval), which " \
            "takes at least 20 to mean much"
    assert m["warnings"] == [small] and f"slide metrics: {small}" in res.err
    assert f"sensitivity 2/3 (95 % CI {lo:.2f}-{hi:.2f})" in page and html.escape(small) in page
    if m["rule"] == "region":  # the threshold is an area, as the header and every slide's score say
        assert f"at threshold {m['threshold']:.3g} mm&sup2; (3 positive" in page


def _run_copy(run: Path, to: Path) -> Path:
    """The run's tables and slide folders without its stores (calibrate reads no store)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("stores", "*.png", "*.html"))
    return to


def test_calibrate_never_writes_into_the_package_models(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run scored by another model folder, -o the bundled default --overwrite: it was replaced (the guard only
    refused the run's own model folder). The package's models folder is stood in for by a copy."""
    from wsi_screen.models import default_model_dir
    from wsi_screen.screening import recalibrate

    folder, _ = slides
    package = tmp_path / "resources" / "models"
    shutil.copytree(default_model_dir(), package / "default")
    monkeypatch.setattr(recalibrate, "default_model_dir", lambda: package / "default")
    mine = tmp_path / "mine"
    shutil.copytree(default_model_dir(), mine)  # the same sha256: it scored the run
    before = {p.name: p.read_bytes() for p in (package / "default").iterdir() if p.is_file()}
    for out in (package / "default", package / "lab", package / "default" / "sub"):
        res = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", out, "--model", mine, "--overwrite")
        assert res.code != 0 and res.err_lines == [
            f"wsi-screen: error: {out} is in the package's bundled models ({package}); write the calibrated copy "
            "elsewhere"], res
    assert sorted(p.name for p in package.iterdir()) == ["default"]
    assert {p.name: p.read_bytes() for p in (package / "default").iterdir() if p.is_file()} == before


def test_calibrate_overwrite_replaces_only_a_model_folder(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite deleted whatever -o named: the run itself (-o RUN), the folder holding the source model and a
    user's file; `-o .` was an internal error and `-o z/..` left a 20 MB z/....partial."""
    from wsi_screen.models import default_model_dir

    folder, _ = slides
    lab = tmp_path / "lab"
    copy = _run_copy(run, lab / "run")
    models = lab / "models"
    shutil.copytree(default_model_dir(), models / "mine")
    (models / "notes.txt").write_text("mine\n")
    (lab / "z").mkdir()
    (lab / "other").mkdir()
    (lab / "other" / "a.txt").write_text("a\n")
    labels = folder / "slides.csv"
    monkeypatch.chdir(lab)
    refused = {
        str(copy): f"{copy} is the run {copy}",
        "run": f"run is the run {copy}",
        str(models): f"{models} holds the run's model folder {models / 'mine'}",
        str(models / "mine"): f"{models / 'mine'} is the run's model folder {models / 'mine'}",
        ".": f". holds the run {copy}",
        "z/..": f"z/.. holds the run {copy}",
    }
    for out, said in refused.items():
        res = run_cli("calibrate", copy, "--labels", labels, "-o", out, "--model", models / "mine", "--overwrite")
        assert res.code != 0 and res.err_lines == [
            f"wsi-screen: error: {said}; write the calibrated copy elsewhere"], res
    res = run_cli("calibrate", copy, "--labels", labels, "-o", "other", "--model", models / "mine", "--overwrite")
    assert res.code != 0 and res.err_lines == [
        "wsi-screen: error: other is not a model folder (no config.json and model.safetensors); --overwrite replaces "
        "only an earlier calibrated copy: choose another folder"], res
    assert (copy / "results.csv").exists() and (models / "mine" / "model.safetensors").exists()
    assert (models / "notes.txt").read_text() == "mine\n" and (lab / "other" / "a.txt").read_text() == "a\n"
    assert sorted(p.name for p in lab.iterdir()) == ["models", "other", "run", "z"]  # no .partial anywhere
    assert sorted(p.name for p in models.iterdir()) == ["mine", "notes.txt"]
    # an earlier calibrated copy is replaced, given as a path with '..' in it
    assert run_cli("calibrate", copy, "--labels", labels, "-o", "c", "--model", models / "mine").code == 0
    res = run_cli("calibrate", copy, "--labels", labels, "-o", "z/../c", "--model", models / "mine", "--overwrite")
    assert res.code == 0, res
    assert sorted(p.name for p in lab.iterdir()) == ["c", "models", "other", "run", "z"]


def test_calibrate_keeps_the_models_rule_on_a_tie(run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]],
                                                  tmp_path: Path) -> None:
    """Four separable slides: every candidate detects both positives at 100 % specificity with AUC 1, and the first
    in list order (mean) won, changing the rule region -> mean and call_patch_threshold 0.8 -> 0.5."""
    folder, _ = slides
    out = tmp_path / "c"
    res = run_cli("calibrate", run, "--labels", folder / "slides.csv", "-o", out)
    assert res.code == 0, res
    doc = json.loads((out / "slide_rule.json").read_text())
    best = [n for n, r in doc["candidates"].items() if (r["sensitivity"], r["auc"]) == (1.0, 1.0)]
    assert "region0.8" in best and "mean" in best and sorted(doc["tie"]) == sorted(best)
    assert (doc["name"], doc["rule"], doc["call_patch_threshold"]) == ("region0.8", "region", 0.8)
    assert f"a tie: {len(best)} candidates have the chosen one's sensitivity and AUC (" in res.out
    assert "kept the model's own rule" in res.out
    assert "  rule: " not in res.out and "  call_patch_threshold: " not in res.out


def test_calibrate_warns_when_its_slides_are_out_of_the_models_domain(tmp_path: Path, example_slide: Path,
                                                                       slides_dir: Path) -> None:
    """A lab that calibrated on slides the model flags out of domain (skin, here) got a rule chosen on calls the
    model does not support, and calibrate said nothing of it; infer flags such slides, the report too."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(example_slide, folder)
    shutil.copy(slides_dir / "CMU-1-Small-Region.pyramid.tif", folder)
    labels = tmp_path / "slides.csv"
    labels.write_text("slide,label\nCMU-1-Small-Region,normal\nCMU-1-Small-Region.pyramid,tumour\n")
    screened = run_cli("infer", folder, "-o", tmp_path / "run", "--workers", "0", "--quiet")
    assert screened.code == 0 and {r["out_of_domain"] for r in read_results(tmp_path / "run").values()} == {"true"}
    res = run_cli("calibrate", tmp_path / "run", "--labels", labels, "-o", tmp_path / "c")
    assert res.code == 0, res
    text = ("2 of the 2 slides are out of the model's domain (most of their patches are unlike its training data): "
            "their scores, and so the rule chosen on them, are not ones the model supports: CMU-1-Small-Region, "
            "CMU-1-Small-Region.pyramid")
    assert f"wsi-screen: warning: calibration: {text}" in res.err_lines, res
    assert text in json.loads((tmp_path / "c" / "slide_rule.json").read_text())["warnings"]


def test_infer_labels_gives_the_slide_auc_with_calibrates_interval(
        run: Path, slides: tuple[Path, dict[str, cohort.SlideLayout]], tmp_path: Path) -> None:
    """`infer --labels` printed and wrote the slide AUC without an interval ('slide AUC 1.000, ...';
    slide_metrics.json had none) while `calibrate` on the same run and labels printed one: slide_metrics.json's
    auc_ci95 is the bootstrap calibrate uses, over the same slides' scores, in the printed line and the report."""
    from wsi_screen.metrics import auc_words, bootstrap_auc

    folder, _ = slides
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nneg_small,normal\nneg_large,normal\nmacro,tumour\nmicro,tumour\n")
    res = run_cli("infer", folder / "slides", "-o", copy, "--labels", labels, "--quiet")
    assert res.code == 0, res
    rows = read_results(copy)
    names = sorted(rows)
    y = np.array([n in ("macro", "micro") for n in names])
    auc, lo, hi = bootstrap_auc(np.array([float(rows[n]["score"]) for n in names]), y)
    m = json.loads((copy / "slide_metrics.json").read_text())
    assert m["auc"] == pytest.approx(auc) and m["auc_ci95"] == pytest.approx([lo, hi])
    assert 0 <= lo <= auc <= hi <= 1
    words = auc_words(auc, (lo, hi))
    assert f"slide AUC {words}, sensitivity " in res.out
    assert f"AUC {words} &middot; sensitivity" in (copy / "report.html").read_text()
