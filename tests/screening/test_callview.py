"""The pictures of a slide's call (wsi_screen.screening.callview): title, threshold named in every legend, foci
outlined with their sizes, one key for what was drawn."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from wsi_screen.screening.aggregate import AggregateConfig, diagnose
from wsi_screen.screening.callview import CallContext, focus_label, heatmap_figure, title, views_key
from wsi_screen.screening.heatmap import drawn_with
from wsi_screen.screening.spatial import patch_grid

RULE = AggregateConfig(rule="region", patch_threshold=0.213, slide_threshold=0.0479, region_threshold=0.8,
                       min_focus_patches=6)
STRIDE = 96


def _slide(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    rows, cols = np.nonzero(~np.isnan(p))
    coords = np.stack([cols * STRIDE, rows * STRIDE], 1).astype(np.int64)
    h, w = p.shape
    thumb = np.full((h * 4, w * 4, 3), 240, np.uint8)
    store = SimpleNamespace(thumbnail=thumb, tile_size_l0=STRIDE,
                            attrs={"stride_l0": STRIDE, "slide": {"dimensions": [w * STRIDE, h * STRIDE],
                                                                  "mpp": 0.972}})
    return coords, p[rows, cols], store


def _ctx(p: np.ndarray, rule: AggregateConfig = RULE, domain: dict[str, Any] | None = None
         ) -> tuple[CallContext, np.ndarray, np.ndarray, Any]:
    coords, probs, store = _slide(p)
    res = diagnose(probs, rule, positive="tumour", negative="normal", grid=patch_grid(coords, probs, STRIDE, 0.972))
    ctx = CallContext(name="s1", classes=("normal", "tumour"), positive_index=1, model_threshold=0.213,
                      aggregate=rule, result=res, domain=domain if domain is not None else
                      {"in_domain_fraction": 0.97, "out_of_domain": False})
    return ctx, coords, probs, store


def _texts(fig: Any) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(match=Text) if t.get_text()]


def _positive() -> np.ndarray:
    p = np.full((40, 50), 0.3)
    p[5:30, 5:30] = 0.95    # 625 patches: 2.3 mm across
    p[33:37, 40:44] = 0.9   # 16 patches
    p[38, 2] = 0.99         # one scattered patch: not a focus
    return p


def test_title_says_call_score_rule_metastasis_focus_and_domain() -> None:
    ctx, *_ = _ctx(_positive())
    line1, line2 = title(ctx).split("\n")
    res = ctx.result
    assert res is not None and res.n_foci == 2 and res.metastasis == "macro"
    assert line1 == f"s1: TUMOUR | metastasis macro, largest focus {res.largest_focus_mm:.2f} mm (2 foci outlined)"
    assert line2 == (f"score {res.score:.4f} mm² >= 0.0479 mm² (rule: largest region at P(tumour) >= 0.8) | "
                     "in domain (97 % of patches in domain)")
    normal, *_ = _ctx(np.full((20, 20), 0.3), domain={"in_domain_fraction": 0.31, "out_of_domain": True})
    assert title(normal) == ("s1: normal | no focus counted\nscore 0.0000 mm² < 0.0479 mm² (rule: largest region at "
                             "P(tumour) >= 0.8) | OUT OF DOMAIN (31 % of patches in domain): call unreliable")
    # at slide threshold 0 a slide without any region is negative, and its title says why (not "0 mm² >= 0 mm²")
    at_zero = AggregateConfig(rule="region", slide_threshold=0.0, region_threshold=0.8)
    empty, *_ = _ctx(np.full((20, 20), 0.3), at_zero, domain={})
    assert title(empty) == ("s1: normal | no focus counted\nscore 0 mm²: no region at P(tumour) >= 0.8 to call on | "
                            "domain not checked")
    topk, *_ = _ctx(np.full((20, 20), 0.3), AggregateConfig(rule="topk", k=5, patch_threshold=0.213,
                                                            slide_threshold=0.5), domain={})
    assert title(topk).endswith("score 0.300 < 0.500 (rule: topk (k = 5)) | domain not checked")
    # a rule without a patch threshold of its own shows the focus threshold (region_threshold), not the model's
    assert topk.threshold == 0.5 and topk.threshold_name == "the focus threshold"


def test_heatmap_names_the_call_threshold_and_outlines_every_focus_with_its_size(tmp_path: Path) -> None:
    ctx, coords, probs, store = _ctx(_positive())
    assert ctx.threshold == 0.8 and ctx.threshold_name == "the call's patch threshold"
    fig = heatmap_figure(store, coords, probs, ctx)
    texts = _texts(fig)
    res = ctx.result
    assert res is not None
    assert title(ctx) in texts
    assert "inside cyan: P(tumour) >= 0.8 (the call's patch threshold)" in texts            # the legend
    assert "P(tumour); cyan line: the call's patch threshold 0.8" in texts                   # the colour bar
    assert "2 foci counted (largest bold): P(tumour) >= 0.8, >= 6 patches" in texts
    assert f"1: {res.foci[0].longest_axis_mm:.2f} mm (macro)" in texts
    assert f"2: {res.foci[1].longest_axis_mm:.2f} mm" in texts
    assert not any("0.213" in t for t in texts)  # the model's threshold is not this picture's

    from wsi_screen.screening.callview import draw_heatmap

    out = draw_heatmap(tmp_path / "h.png", store, coords, probs, ctx)
    assert drawn_with(out) == views_key(ctx)


def test_the_legend_says_the_region_rules_largest_counts_under_the_focus_size() -> None:
    """CMU-1 at --threshold 0.01: one outlined focus of 5 patches under a legend of '>= 6 patches'."""
    from wsi_screen.screening.callview import outline_legend

    p = np.full((20, 20), 0.3)
    p[5, 5:10] = 0.9  # one region of 5 patches at 0.8: under min_focus_patches (6), counted as the region rule's score
    ctx, coords, probs, store = _ctx(p, replace(RULE, slide_threshold=0.01))
    assert ctx.result is not None and ctx.result.diagnosis == "tumour" and [f.n_patches for f in ctx.foci] == [5]
    legend = "1 focus counted (largest bold): P(tumour) >= 0.8, >= 6 patches, and the largest region (5 patches)"
    assert outline_legend(ctx) == legend
    assert legend in _texts(heatmap_figure(store, coords, probs, ctx))
    # foci of the focus size need no such words; a slide without foci has no legend
    assert outline_legend(_ctx(_positive())[0]) == "2 foci counted (largest bold): P(tumour) >= 0.8, >= 6 patches"
    assert outline_legend(_ctx(np.full((5, 5), 0.3))[0]) == ""


@pytest.mark.parametrize(("rule", "marked"), [("mean", False), ("fraction", False), ("max", True), ("topk", True)])
def test_the_geojson_says_evidence_is_marked_only_when_it_is(tmp_path: Path, rule: str, marked: bool) -> None:
    """--aggregate mean or fraction: threshold_source ended 'its evidence is marked', with no evidence in the file."""
    import json

    from wsi_screen.screening.callview import write_geojson

    ctx, coords, probs, store = _ctx(_positive(), replace(RULE, rule=rule, slide_threshold=0.2))
    assert ctx.result is not None and bool(ctx.result.evidence_indices) == marked
    out = write_geojson(tmp_path / "p.geojson", coords, store.tile_size_l0, np.stack([1 - probs, probs], 1), ctx)
    fc = json.loads(out.read_text())
    source = fc["wsi_screen"]["threshold_source"]
    assert source.startswith(f"the focus threshold (the {rule} rule ")
    assert source.endswith("; its evidence is marked)") == marked
    names = [f["properties"].get("name", "") for f in fc["features"]
             if f["properties"].get("objectType") == "annotation"]
    assert any(n.startswith("call evidence") for n in names) == marked


def test_a_normal_slide_reads_blue_and_outlines_nothing() -> None:
    from matplotlib.image import AxesImage

    rng = np.random.default_rng(0)
    p = rng.beta(2, 5, (30, 30))  # scores of a normal slide: mostly low, 1-2 % above 0.8, scattered
    ctx, coords, probs, store = _ctx(p)
    assert ctx.result is not None and ctx.result.diagnosis == "normal" and ctx.foci == ()
    fig = heatmap_figure(store, coords, probs, ctx)
    assert not any("focus" in t and "mm" in t for t in _texts(fig) if t != title(ctx))
    overlay = [im for im in fig.axes[1].get_images() if isinstance(im, AxesImage)][1]
    where = np.asarray(overlay.norm(probs))
    # the colour map's halves meet at the call's threshold: below it the blue half, at or above it the red one
    assert np.array_equal(where < 0.5, probs < 0.8)
    rgba = overlay.cmap(where)
    assert rgba[:, 2].mean() > rgba[:, 0].mean() + 0.2  # the slide as a whole reads blue
    linear = overlay.cmap(probs)  # on a plain 0-1 scale these scores would have looked far warmer
    assert rgba[:, 0].mean() < linear[:, 0].mean() - 0.1


def test_the_key_changes_with_what_is_drawn() -> None:
    ctx, *_ = _ctx(_positive())
    again, *_ = _ctx(_positive())
    assert views_key(ctx) == views_key(again)
    stricter = AggregateConfig(rule="region", patch_threshold=0.213, slide_threshold=0.0479, region_threshold=0.9,
                               min_focus_patches=6)
    other, *_ = _ctx(_positive(), stricter)
    assert views_key(other) != views_key(ctx)
    flagged, *_ = _ctx(_positive(), domain={"in_domain_fraction": 0.2, "out_of_domain": True})
    assert views_key(flagged) != views_key(ctx)


@pytest.mark.parametrize("rule", ["region", "smoothmax"])
def test_the_threshold_shown_is_the_calls_own(rule: str) -> None:
    cfg = AggregateConfig(rule=rule, patch_threshold=0.213, slide_threshold=0.5, region_threshold=0.8)
    ctx, *_ = _ctx(np.full((5, 5), 0.3), cfg)
    assert ctx.threshold == 0.8  # the focus threshold whatever the rule, never the model's 0.213
    assert ctx.threshold_name == ("the call's patch threshold" if rule == "region" else "the focus threshold")


@pytest.fixture(scope="module")
def max_rule_run(tmp_path_factory: pytest.TempPathFactory, patches_dir: Path) -> Path:
    """``infer --aggregate max --threshold 0.9`` on the synthetic pair of ``make_synthetic_slides.py --pos 1 --neg 1``
    (seed 0): synth_000 has a tumour blob, synth_001 is normal with a few scattered patches at P(tumour) >= 0.8."""
    from tests.conftest import run_cli
    from wsi_screen.synthetic.slides import build_cohort

    root = tmp_path_factory.mktemp("maxrule")
    build_cohort(root / "slides", n_pos=1, n_neg=1, seed=0, patches_dir=patches_dir / "pcam")
    run = root / "run"
    res = run_cli("infer", root / "slides", "-o", run, "--aggregate", "max", "--threshold", "0.9", "--quiet")
    assert res.code == 0, res
    (root / "infer.out").write_text(res.out)  # the command's summary, for the test below
    return run


def test_a_max_rule_call_draws_every_picture_at_one_threshold_and_marks_its_evidence(max_rule_run: Path) -> None:
    import json

    from tests.conftest import read_results
    from wsi_screen.screening import runfolder, runview
    from wsi_screen.screening.callview import slide_grid
    from wsi_screen.screening.spatial import regions

    info = json.loads((max_rule_run / "run.json").read_text())
    agg = info["aggregate"]
    assert agg["rule"] == "max" and agg["slide_threshold"] == 0.9
    assert agg["region_threshold"] == 0.8 and agg["min_focus_patches"] == 6
    assert agg["call_patch_threshold"] == 0.8 and agg["patch_threshold"] == pytest.approx(0.2133, abs=1e-4)
    rows = read_results(max_rule_run)
    view = runview.open_run(max_rule_run)
    for name in ("synth_000", "synth_001"):
        probs = runfolder.read_scores(max_rule_run / name / "scores.csv").probs[:, 1]
        fc = json.loads((max_rule_run / name / "patches.geojson").read_text())
        meta = fc["wsi_screen"]
        assert meta["threshold"] == 0.8 and meta["threshold_source"].startswith("the focus threshold (the max rule")
        tiles = [f for f in fc["features"] if f["properties"]["objectType"] == "tile"]
        tumour = [f["properties"]["index"] for f in tiles if f["properties"]["classification"]["name"] == "tumour"]
        assert tumour == [i for i, p in enumerate(probs.tolist()) if round(p, 6) >= 0.8]
        assert all(f["properties"]["threshold"] == 0.8 for f in tiles)
        # the evidence: the patch the max rule read, marked in the GeoJSON and named with the score vs threshold
        top = int(np.argmax(probs))
        assert meta["evidence_indices"] == [top]
        assert [f["properties"]["index"] for f in tiles if f["properties"].get("call_evidence")] == [top]
        notes = [f["properties"] for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
        assert notes[-1]["name"] == f"call evidence: highest patch, P(tumour) {probs[top]:.3f} >= 0.900"
        # foci: regions at 0.8 of >= 6 patches (min_focus_patches), as results.csv counts them
        foci = [n for n in notes if n["category"] in ("itc", "micro", "macro")]
        assert len(foci) == meta["n_foci"] == int(rows[name]["n_foci"])
        assert all(n["measurements"]["patches"] >= 6 for n in foci)
        # the heatmap: cyan contour, legend and colour bar at 0.8; the model's 0.213 nowhere
        fig = runview.slide_figure(view, name)
        levels = [float(c.levels[0]) for c in fig.axes[1].collections if hasattr(c, "levels")]
        assert levels == [0.8]
        texts = _texts(fig)
        assert "inside cyan: P(tumour) >= 0.8 (the focus threshold)" in texts
        assert "P(tumour); cyan line: the focus threshold 0.8" in texts
        assert f"call evidence: highest patch, P(tumour) {probs[top]:.3f} >= 0.900" in texts
        assert not any("0.213" in t for t in texts)
        assert "|max|0.8|" in (drawn_with(max_rule_run / name / "heatmap.png") or "")
    tumour_row, normal_row = rows["synth_000"], rows["synth_001"]
    assert tumour_row["diagnosis"] == "tumour" and int(tumour_row["n_foci"]) >= 1
    # the normal slide: called by one patch >= 0.9, its regions at 0.8 all under 6 patches: no focus, no size
    normal = runview.slide_call(view, "synth_001")
    assert normal.result is not None and normal.result.diagnosis == "tumour"
    g = slide_grid(view.slide_json("synth_001"), view.scores("synth_001").coords, view.positive_probs("synth_001"))
    assert g is not None
    small = regions(g, 0.8)
    assert small and max(r.n_patches for r in small) < 6  # there is something a focus could be made of
    assert normal.result.foci == () and normal_row["n_foci"] == "0" and normal_row["metastasis"] == "none"
    assert normal_row["largest_focus_mm"] == "0.000"  # no focus measures 0, as on a negative slide (was blank)
    assert title(normal).split("\n")[0] == "synth_001: TUMOUR | no focus (P(tumour) >= 0.8, >= 6 patches)"
    # the command's summary and the report name the same threshold and focus size; the report counts foci in words
    assert "slide call: max score >= 0.900 -> positive; foci: regions of 6+ patches at p >= 0.8 (the pictures' " \
           "patch threshold)" in (max_rule_run.parent / "infer.out").read_text()
    html = (max_rule_run / "report.html").read_text()
    assert "patch threshold 0.8 (the focus threshold: the heatmaps' cyan line, the GeoJSON's tile classes and " \
           "the foci)" in html.replace("&#x27;", "'")
    n_tumour_foci = int(tumour_row["n_foci"])
    assert f"{n_tumour_foci} {'focus' if n_tumour_foci == 1 else 'foci'}, " in html and "0 foci, " in html
    assert "1 foci" not in html


def test_topk_and_smoothmax_evidence_is_named_with_the_score_against_the_slide_threshold() -> None:
    from wsi_screen.screening.callview import evidence_label

    p = np.full((10, 10), 0.2)
    p[2, 2], p[7, 7], p[5, 1] = 0.99, 0.97, 0.95
    topk, coords, probs, store = _ctx(p, AggregateConfig(rule="topk", k=3, region_threshold=0.8,
                                                         slide_threshold=0.9, min_focus_patches=6))
    assert topk.result is not None and topk.result.evidence_indices == (22, 51, 77)
    assert evidence_label(topk) == "call evidence: 3 highest patches, mean P(tumour) 0.970 >= 0.900"
    assert evidence_label(topk) in _texts(heatmap_figure(store, coords, probs, topk))
    smooth, *_ = _ctx(p, AggregateConfig(rule="smoothmax", radius=1, region_threshold=0.8, slide_threshold=0.5))
    assert smooth.result is not None and smooth.result.diagnosis == "normal"
    # the highest neighbourhood mean is at the slide's edge, around cell (4, 0): (0.95 + 5 x 0.2) / 6 patches
    assert smooth.result.evidence_indices == (30, 31, 40, 41, 50, 51)
    assert evidence_label(smooth) == ("call evidence: highest 3 x 3 neighbourhood (6 patches), mean P(tumour) "
                                     "0.325 < 0.500")
    mean, *_ = _ctx(p, AggregateConfig(rule="mean", slide_threshold=0.5))
    assert mean.result is not None and mean.result.evidence_indices == () and evidence_label(mean) == ""


def _label_boxes(fig: Any, ctx: CallContext) -> tuple[list[Any], list[list[Any]]]:
    """The drawn focus labels' boxes (display pixels, as rendered) and each focus's outline paths (same frame)."""
    from matplotlib.path import Path as MplPath
    from matplotlib.text import Annotation

    fig.canvas.draw()
    ax = fig.axes[1]
    labels = {t.get_text(): t for t in ax.texts if isinstance(t, Annotation)}
    boxes = [labels[focus_label(f)].get_bbox_patch().get_window_extent() for f in ctx.foci]
    mm = 0.972 / 1000.0
    outlines = [[MplPath(ax.transData.transform(np.asarray(r, dtype=float) * mm))
                 for poly in ([f.outline_l0["coordinates"]] if f.outline_l0["type"] == "Polygon"
                              else f.outline_l0["coordinates"]) for r in poly] for f in ctx.foci]
    return boxes, outlines


@pytest.mark.parametrize("second", [(slice(31, 35), slice(10, 18)), (slice(10, 14), slice(12, 18)),
                                    (slice(1, 4), slice(20, 30))])
def test_each_focus_label_sits_clear_of_the_other_foci_and_labels(second: tuple[slice, slice]) -> None:
    """docs/img/heatmap-tumour.png: '2: 1.42 mm' was written over focus 1's outline (every label went above its
    focus's top-right corner, whatever was there)."""
    p = np.full((40, 50), 0.3)
    p[5:30, 20:45] = 0.95
    p[second] = 0.9
    ctx, coords, probs, store = _ctx(p)
    assert len(ctx.foci) == 2
    boxes, outlines = _label_boxes(heatmap_figure(store, coords, probs, ctx), ctx)
    for k, box in enumerate(boxes):
        for j, paths in enumerate(outlines):
            if j != k:
                assert not any(path.intersects_bbox(box, filled=True) for path in paths), (k, j, box)
        assert not any(box.overlaps(other) for other in boxes[k + 1:])
    # each label sits by its own focus: its box within the 3 pt gap (4.2 px at 100 dpi) of the focus's extent
    for box, paths in zip(boxes, outlines, strict=True):
        xy = np.concatenate([path.vertices for path in paths])
        dx = max(xy[:, 0].min() - box.x1, box.x0 - xy[:, 0].max(), 0.0)
        dy = max(xy[:, 1].min() - box.y1, box.y0 - xy[:, 1].max(), 0.0)
        assert max(dx, dy) < 6.0, (box, xy.min(0), xy.max(0))



def test_a_focus_label_sits_clear_of_the_call_evidence() -> None:
    """The max rule's evidence, one patch just above the focus's top-right corner where its label goes first: the
    label was written over the magenta square of the patch that made the call."""
    from matplotlib.path import Path as MplPath

    p = np.full((40, 50), 0.3)
    p[12:24, 10:22] = 0.95
    p[10, 24] = 0.99  # two rows above the focus: not part of it
    ctx, coords, probs, store = _ctx(p, AggregateConfig(rule="max", slide_threshold=0.9, region_threshold=0.8,
                                                        min_focus_patches=6))
    assert ctx.result is not None and len(ctx.foci) == 1 and ctx.result.evidence_indices == (524,)
    fig = heatmap_figure(store, coords, probs, ctx)
    (box,), (own,) = _label_boxes(fig, ctx)
    x, y = coords[524]
    square = np.array([[x, y], [x + STRIDE, y], [x + STRIDE, y + STRIDE], [x, y + STRIDE], [x, y]], float)
    evidence = MplPath(fig.axes[1].transData.transform(square * 0.972 / 1000.0))
    assert not evidence.intersects_bbox(box, filled=True), (box, evidence.get_extents())
    xy = np.concatenate([path.vertices for path in own])  # still by its own focus, above its top-left corner
    assert abs(box.x0 - xy[:, 0].min()) < 6.0 and 0.0 < box.y0 - xy[:, 1].max() < 6.0, (box, xy.min(0), xy.max(0))

def _table(capsys: pytest.CaptureFixture[str], tmp_path: Path, ctx: CallContext) -> str:
    """What `infer` prints for a run of this one slide (its table and the rule under it)."""
    from wsi_screen.commands.infer import _print_table
    from wsi_screen.screening.outputs import SlideRow
    from wsi_screen.screening.run import RunSummary

    assert ctx.aggregate is not None
    capsys.readouterr()
    _print_table(RunSummary(run=tmp_path, rows=[SlideRow(name="s1", source="s1.tiff", result=ctx.result)],
                            aggregate=ctx.aggregate, metrics=None), patch_um=93.3,
                 card="wsi-screen models --card")
    return capsys.readouterr().out


def test_a_score_just_under_its_threshold_never_prints_equal_to_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """infer --aggregate max on synth_000 (seed 5): score 0.984614 against 0.984831, called normal, read
    'score 0.985 < 0.985' in the heatmap's title and legend, the GeoJSON and the command's table."""
    import json

    from wsi_screen.screening.callview import evidence_label, write_geojson

    p = np.full((10, 10), 0.2)
    p[4, 4] = 0.984614
    ctx, coords, probs, store = _ctx(p, AggregateConfig(rule="max", slide_threshold=0.984831, region_threshold=0.8,
                                                        min_focus_patches=6))
    assert ctx.result is not None and ctx.result.diagnosis == "normal"
    assert title(ctx).split("\n")[1] == "score 0.9846 < 0.9848 (rule: max) | in domain (97 % of patches in domain)"
    assert evidence_label(ctx) == "call evidence: highest patch, P(tumour) 0.9846 < 0.9848"
    texts = _texts(heatmap_figure(store, coords, probs, ctx))
    assert title(ctx) in texts and evidence_label(ctx) in texts
    fc = json.loads(write_geojson(tmp_path / "p.geojson", coords, store.tile_size_l0,
                                  np.stack([1 - probs, probs], 1), ctx).read_text())
    notes = [f["properties"] for f in fc["features"] if f["properties"]["objectType"] == "annotation"]
    assert [n["name"] for n in notes] == ["call evidence: highest patch, P(tumour) 0.9846 < 0.9848"]
    out = _table(capsys, tmp_path, ctx)
    assert "  0.9846  normal  " in out
    assert "slide call: max score >= 0.9848 -> positive;" in out
    # a score at the threshold's own 3 decimals keeps them, in the table and under it alike
    ctx2, *_ = _ctx(p, AggregateConfig(rule="max", slide_threshold=0.9, region_threshold=0.8))
    out = _table(capsys, tmp_path, ctx2)
    assert "  0.985  tumour  " in out and "max score >= 0.900 -> positive;" in out


def test_evidence_short_of_the_threshold_is_not_classed_tumour(tmp_path: Path) -> None:
    """QuPath drew a red 'tumour' annotation on a slide called normal: its call evidence fell short."""
    import json

    from wsi_screen.screening.callview import write_geojson
    from wsi_screen.screening.geojson import PALETTE

    p = np.full((10, 10), 0.2)
    p[4, 4] = 0.95
    classes = {}
    for threshold in (0.9, 0.96):
        ctx, coords, probs, store = _ctx(p, AggregateConfig(rule="max", slide_threshold=threshold,
                                                            region_threshold=0.8))
        fc = json.loads(write_geojson(tmp_path / "p.geojson", coords, store.tile_size_l0,
                                      np.stack([1 - probs, probs], 1), ctx).read_text())
        [note] = [f["properties"] for f in fc["features"] if f["properties"].get("category") == "call evidence"]
        assert ctx.result is not None
        classes[ctx.result.diagnosis] = note["classification"]
    assert classes["tumour"]["name"] == "tumour" and classes["tumour"]["color"] == list(PALETTE[1])
    assert classes["normal"]["name"] == "call evidence" and classes["normal"]["color"] == [160, 160, 160]


def test_the_region_rule_at_zero_reads_the_same_in_the_title_and_the_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--threshold 0 --aggregate region: the table said 'score > 0 mm^2', the heatmap '>= 0 mm²' (a region call needs
    a region: > 0)."""
    at_zero = AggregateConfig(rule="region", slide_threshold=0.0, region_threshold=0.8)
    ctx, *_ = _ctx(_positive(), at_zero, domain={})
    res = ctx.result
    assert res is not None and res.score is not None and res.diagnosis == "tumour"
    assert title(ctx).split("\n")[1] == (f"score {res.score:.3f} mm² > 0 mm² (rule: largest region at P(tumour) >= "
                                         "0.8) | domain not checked")
    out = _table(capsys, tmp_path, ctx)
    assert "slide call: region score > 0 mm² -> positive;" in out and "mm^2" not in out
    assert f"  {res.score:.3f}  tumour  " in out
