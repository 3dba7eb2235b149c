"""What a run writes, slide by slide and for the whole run: ``RUN/<slide>/`` (scores.csv, heatmap.png,
patches.geojson, slide.json, in one atomic step), the slide call re-aggregated from scores, ``results.csv``,
``run.json`` and, with slide labels, the slide-level metrics and ROC. :mod:`wsi_screen.screening.run` decides
what to do with each slide; this module writes what came of it (formats: :mod:`~wsi_screen.screening.runfolder`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen import __version__
from wsi_screen._safe_write import atomic_write_text
from wsi_screen.errors import ConfigError, WsiScreenError, in_user_words
from wsi_screen.metrics import (
    RocCurve,
    binary_view,
    bootstrap_auc,
    few_positives,
    one_class_words,
    plot_roc,
    rate_intervals,
)
from wsi_screen.models import PatchClassifier
from wsi_screen.screening import runfolder
from wsi_screen.screening.aggregate import (
    NO_RESULT,
    NO_TISSUE,
    STATUS_ERROR,
    STATUS_NO_TISSUE,
    STATUS_OK,
    AggregateConfig,
    SlideResult,
    diagnose,
)
from wsi_screen.screening.callview import CallContext, slide_grid, views_key, write_views
from wsi_screen.screening.runfolder import SlideFolder, SlideScores
from wsi_screen.screening.spatial import ScoreGrid, patch_grid
from wsi_screen.slide.discovery import SLIDE_EXTENSIONS
from wsi_screen.slide.slide import slide_name
from wsi_screen.slide.tables import few, read_table
from wsi_screen.tiling.pipeline import TileConfig
from wsi_screen.tiling.store import PatchStore

log = logging.getLogger(__name__)


def store_digest(location: str) -> str:
    """sha256 of a store's settings: what slide.json records to tell a reused store from a remade one."""
    attrs = PatchStore.open(location).attrs
    return hashlib.sha256(json.dumps(attrs.get("settings", {}), sort_keys=True).encode()).hexdigest()


@dataclass
class SlideRow:
    """One line of results.csv while it is being assembled."""

    name: str
    source: str
    store: str = ""
    status: str = STATUS_OK
    error: str = ""
    result: SlideResult | None = None
    top: tuple[int, int, float] | None = None
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def call_context(name: str, spec: Any, aggregate: AggregateConfig | None, result: SlideResult | None,
                 domain: dict[str, Any]) -> CallContext:
    """What a slide's heatmap and GeoJSON show besides its scores."""
    return CallContext(name=name, classes=tuple(spec.classes), positive_index=spec.positive_index,
                       model_threshold=spec.threshold, aggregate=aggregate, result=result, domain=domain)


def _focus_result(scores: SlideScores, pos: int, store: PatchStore, aggregate: AggregateConfig | None,
                  spec: Any) -> SlideResult | None:
    if aggregate is None or not len(scores.probs):
        return None
    grid = patch_grid(scores.coords, scores.probs[:, pos], int(store.attrs["stride_l0"]),
                      float(store.attrs["slide"]["mpp"]), store.tile_size_l0)
    negative = next(c for c in scores.classes if c != spec.positive_class)
    try:
        return diagnose(scores.probs[:, pos], aggregate, positive=str(spec.positive_class), negative=negative,
                        grid=grid)
    except ConfigError:
        return None


def write_slide_folder(run: Path, row: SlideRow, location: str, probs: np.ndarray, classifier: PatchClassifier,
                       model_id: dict[str, Any], aggregate: AggregateConfig | None = None, *,
                       distance: np.ndarray | None = None) -> Path:
    """Write RUN/<slide>/ (scores.csv, heatmap.png, patches.geojson, slide.json) in one atomic step.

    The heatmap and GeoJSON show the call of ``aggregate`` on the scores as scores.csv holds them; the call is kept
    in ``row.extra["call"]`` for :func:`aggregate_row`, so results.csv, the heatmap and the GeoJSON share one
    computation of it (a reused slide's call is made afresh there, and its pictures redrawn if it draws otherwise)."""
    store = PatchStore.open(location)
    spec = classifier.spec
    pos = spec.positive_index if spec.positive_index is not None else 1
    scores = SlideScores(coords=store.coords, tissue=store.tissue, probs=probs.astype(np.float32),
                         classes=list(spec.classes), domain_distance=distance)
    folder = SlideFolder(run, row.name)
    try:
        atomic_write_text(folder.path(runfolder.SCORES_CSV), runfolder.scores_csv(scores))
        scores = runfolder.read_scores(folder.path(runfolder.SCORES_CSV))  # as aggregate_row will read them
        result = _focus_result(scores, pos, store, aggregate, spec)
        if result is not None:
            row.extra["call"] = (aggregate, result)
        ctx = call_context(row.name, spec, aggregate, result, slide_domain(scores, classifier))
        write_views(folder.path(runfolder.HEATMAP_PNG), folder.path(runfolder.GEOJSON), store, scores.coords,
                    scores.probs, ctx)
        runfolder.write_json(folder.path(runfolder.SLIDE_JSON), {
            "slide": row.name, "source": row.source, "store": runfolder.portable_path(location, run),
            "store_digest": store_digest(location),
            # the pixels the scores came from (a reused JPEG store's are not the slide's)
            "store_pixels": store.pixels_record,
            "n_patches": len(store), "tile_size_l0": store.tile_size_l0, "stride_l0": int(store.attrs["stride_l0"]),
            "mpp": store.mpp,
            "slide_info": store.attrs["slide"], "model": model_id, "package_version": __version__,
        })
        return folder.commit()
    except BaseException:
        folder.abort()
        raise


def aggregate_row(run: Path, row: SlideRow, classifier: PatchClassifier, aggregate: AggregateConfig) -> None:
    spec = classifier.spec
    try:
        scores = runfolder.read_scores(runfolder.slide_dir(run, row.name) / runfolder.SCORES_CSV)
    except WsiScreenError as exc:
        row.status, row.error = STATUS_ERROR, str(exc)
        return
    pos = positive_column(scores, spec)
    try:
        done = runfolder.read_slide(run, row.name)
    except (WsiScreenError, OSError):
        done = {}
    info = done.get("slide_info", {})
    row.extra.update(slide_mpp=info.get("mpp"), mpp_source=info.get("mpp_source"), **slide_domain(scores, classifier))
    row.extra["store_pixels"] = done.get("store_pixels") or _pixels_of(row.store)
    made = row.extra.pop("call", None)  # the call this run's write_slide_folder made and drew
    if made is not None and made[0] == aggregate:
        result = made[1]
    else:
        grid = slide_grid(done, scores.coords, scores.probs[:, pos])
        try:
            result = call_scores(scores, classifier, aggregate, grid)
        except ConfigError as exc:  # a spatial rule on a slide folder without its grid
            row.status, row.error = STATUS_ERROR, f"{row.name}: {exc}"
            return
    row.result = result
    _refresh_views(run, row, scores, call_context(row.name, spec, aggregate, result, slide_domain(scores, classifier)))
    if result.diagnosis == NO_TISSUE:
        row.status = STATUS_NO_TISSUE
    elif result.top_indices:
        i = result.top_indices[0]
        row.top = (int(scores.coords[i, 0]), int(scores.coords[i, 1]), float(scores.probs[i, pos]))


def _pixels_of(location: str) -> dict[str, Any] | None:
    """:attr:`PatchStore.pixels_record` of the store at ``location`` (a slide.json written before it recorded
    them); None
    when the store cannot be opened."""
    try:
        return PatchStore.open(location).pixels_record if location else None
    except (WsiScreenError, OSError):
        return None


def positive_column(scores: SlideScores, spec: Any) -> int:
    """The column of ``scores.probs`` that holds the model's positive class."""
    return scores.classes.index(spec.positive_class) if spec.positive_class in scores.classes else 1


def call_scores(scores: SlideScores, classifier: PatchClassifier, aggregate: AggregateConfig,
                grid: ScoreGrid | None) -> SlideResult:
    """A slide's call from its patch scores (``grid``: the same probabilities on their patch grid, which the
    spatial rules and the focus sizes need)."""
    spec = classifier.spec
    negative = next(c for c in scores.classes if c != spec.positive_class)
    return diagnose(scores.probs[:, positive_column(scores, spec)], aggregate, positive=str(spec.positive_class),
                    negative=negative, grid=grid)


def slide_domain(scores: SlideScores, classifier: PatchClassifier) -> dict[str, Any]:
    """``in_domain_fraction`` (of the slide's patches) and ``out_of_domain`` (fewer than the model's
    ``slide_min_in_domain`` in domain: the call is kept but unreliable); empty without a domain model or
    distances (a slide scored before they existed)."""
    domain = classifier.domain
    if domain is None or scores.domain_distance is None or len(scores.domain_distance) == 0:
        return {}
    fraction = float(np.mean(domain.in_domain(scores.domain_distance)))
    return {"in_domain_fraction": fraction, "out_of_domain": fraction < domain.slide_min_in_domain}


def _refresh_views(run: Path, row: SlideRow, scores: SlideScores, ctx: CallContext) -> None:
    """Redraw a slide's heatmap and GeoJSON when they show another call (another rule, threshold or foci; a
    reused slide), from the same result as results.csv (best effort)."""
    from wsi_screen.screening.heatmap import drawn_with

    folder = runfolder.slide_dir(run, row.name)
    path = folder / runfolder.HEATMAP_PNG
    if not path.exists() or not row.store or (drawn_with(path) == views_key(ctx)
                                              and (folder / runfolder.GEOJSON).exists()):
        return
    try:
        store = PatchStore.open(row.store)
        write_views(path, folder / runfolder.GEOJSON, store, scores.coords, scores.probs, ctx)
    except (WsiScreenError, OSError) as exc:
        log.warning("%s: heatmap and GeoJSON not redrawn for the new call: %s", row.name, exc)


def _mm(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_results(run: Path, rows: list[SlideRow], aggregate: AggregateConfig, model_id: dict[str, Any]) -> None:
    table = []
    for r in sorted(rows, key=lambda r: r.name):
        res = r.result
        table.append({
            "slide": r.name, "status": r.status, "n_patches": res.n_patches if res else "",
            "score": f"{res.score:.6f}" if res and res.score is not None else "",
            "diagnosis": res.diagnosis if res else r.status,
            "rule": aggregate.rule, "threshold": f"{aggregate.slide_threshold:.6g}",
            "metastasis": res.metastasis if res and res.score is not None else "",
            "largest_focus_mm": _mm(res.largest_focus_mm) if res else "",
            "tumour_area_mm2": _mm(res.tumour_area_mm2, 4) if res else "",
            "n_foci": res.n_foci if res and res.score is not None else "",
            "slide_mpp": f"{r.extra['slide_mpp']:.6g}" if r.extra.get("slide_mpp") else "",
            "mpp_source": r.extra.get("mpp_source") or "",
            "in_domain_fraction": f"{r.extra['in_domain_fraction']:.4f}" if "in_domain_fraction" in r.extra else "",
            "out_of_domain": str(r.extra["out_of_domain"]).lower() if "out_of_domain" in r.extra else "",
            "top_x": r.top[0] if r.top else "", "top_y": r.top[1] if r.top else "",
            "top_score": f"{r.top[2]:.6f}" if r.top else "", "model": model_id["arch"],
            "label": r.label, "error": in_user_words(r.error), "source": r.source,
            "store": runfolder.portable_path(r.store, run) if r.store else "",
            "label_agrees": label_agrees(r.label, res.diagnosis if res and res.score is not None else None,
                                         model_id.get("positive_class")),
        })
    atomic_write_text(run / runfolder.RESULTS_CSV, runfolder.csv_text(table, runfolder.RESULT_COLUMNS))


def label_agrees(label: str, call: str | None, positive_class: Any) -> str:
    """results.csv's ``label_agrees``: ``true`` when a slide's call (its diagnosis) is its label (``positive``:
    the positive class; ``negative``: any other), ``false`` when not, empty without a label or a call."""
    if not label or call is None:
        return ""
    return str((call == str(positive_class)) == (label == "positive")).lower()


def _with_start_up(seconds: float, stages: dict[str, float | None] | None) -> float | None:
    """The whole command's seconds: ``seconds`` (from the run's start) plus its start-up, when that is known."""
    start_up = (stages or {}).get("start_up")
    return None if start_up is None else round(seconds + start_up, 2)


def write_run_json(run: Path, rows: list[SlideRow], aggregate: AggregateConfig, model_id: dict[str, Any],
                    tile_cfg: TileConfig, settings: dict[str, Any], argv: Sequence[str], started: datetime,
                    seconds: float, stages: dict[str, float | None] | None = None, *,
                    rule_source: str | None = None) -> None:
    """``RUN/run.json``: the provenance of the run and where its time went (``seconds`` from the run's start, after
    start-up; ``total_seconds`` with start-up, None when that is unknown; ``stages`` of the whole run;
    each slide's ``seconds`` by stage: open, tile, score, outputs, or reuse_check for a slide reused, and its
    ``largest_focus_mm`` and ``tumour_area_mm2`` unrounded (results.csv keeps 3 and 4 decimals);
    ``settings``: the run's, as :meth:`wsi_screen.screening.run.InferConfig.to_json` gives them; ``aggregate.source``:
    what the slide rule rests on, :func:`wsi_screen.screening.run.rule_source`)."""
    import torch

    runfolder.write_json(run / runfolder.RUN_JSON, {
        "command": ["wsi-screen", *argv],
        "package_version": __version__,
        "started": started.replace(microsecond=0).isoformat(),
        "seconds": round(seconds, 2),
        "total_seconds": _with_start_up(seconds, stages),
        "stages": {k: None if v is None else round(v, 3) for k, v in (stages or {}).items()},
        "model": model_id,
        "aggregate": {**aggregate.to_json(), "source": rule_source},
        "tiling": {"mpp": tile_cfg.spec.mpp, "patch_size": tile_cfg.spec.size_px,
                   "min_tissue": tile_cfg.spec.min_tissue, "stain": tile_cfg.stain,
                   "stain_target": tile_cfg.stain_target, "tissue": tile_cfg.tissue.to_json(),
                   "pixels": "store" if tile_cfg.pixels else "none",
                   "codec": tile_cfg.codec.to_json() if tile_cfg.pixels else None,
                   # what the slides were scored from (``pixels`` and ``codec`` above: what this run writes when it
                   # tiles); a reused store of another codec shows here and in each slide's ``store_pixels``
                   "scored_from": scored_from(rows)},
        "settings": settings,
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "torch": torch.__version__, "numpy": np.__version__,
                        "torch_threads": torch.get_num_threads()},
        "slides": [{"slide": r.name, "status": r.status, "error": in_user_words(r.error),
                    "mpp": r.extra.get("slide_mpp"), "mpp_source": r.extra.get("mpp_source"),
                    "reused": bool(r.extra.get("reused")),
                    "store_pixels": r.extra.get("store_pixels"),
                    "in_domain_fraction": r.extra.get("in_domain_fraction"),
                    "out_of_domain": r.extra.get("out_of_domain"), "seconds": r.extra.get("seconds"),
                    # results.csv's sizes as measured (it rounds them): what the report rounds, once, as the heatmap
                    "largest_focus_mm": r.result.largest_focus_mm if r.result else None,
                    "tumour_area_mm2": r.result.tumour_area_mm2 if r.result else None,
                    **({"device": r.extra["device"]} if "device" in r.extra else {})}
                   for r in sorted(rows, key=lambda r: r.name)],
    })


def scored_from(rows: Sequence[SlideRow]) -> list[dict[str, Any]]:
    """The distinct ``store_pixels`` (:attr:`PatchStore.pixels_record`) of the slides scored (``n_slides`` each),
    in the rows' order."""
    found: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: r.name):
        pixels = r.extra.get("store_pixels")
        if r.status in NO_RESULT or not pixels:
            continue
        same = next((f for f in found if f["pixels"] == pixels["pixels"] and f["codec"] == pixels["codec"]), None)
        if same is None:
            found.append({**pixels, "n_slides": 1})
        else:
            same["n_slides"] += 1
    return found


# --------------------------------------------------------------------------------------- slide-level truth
#: what a slide label may say for "positive" / "negative" (besides the model's own class names)
LABEL_POSITIVE = {"1", "true", "yes", "positive", "pos", "tumor", "tumour", "cancer", "abnormal"}
LABEL_NEGATIVE = {"0", "false", "no", "negative", "neg", "normal", "benign"}


def read_labels(path: Path, classifier: PatchClassifier) -> dict[str, str]:
    """``slides.csv`` (columns ``slide``, ``label``) -> {slide name: "positive" | "negative"}, keyed by each row's
    name as given and by the slide it names (``a.svs`` and ``a.TIF`` name the slide ``a``). Two rows that name one
    slide (the same text twice, or two of its forms) are an error naming both lines when their labels differ, and
    one warning naming both lines when they agree."""
    rows = read_table(path, ("slide", "label"), "`labels`")
    spec = classifier.spec
    spec_positive = str(spec.positive_class).lower()
    positive = {spec_positive} | LABEL_POSITIVE
    negative = {c.lower() for c in spec.classes if c != spec.positive_class} | LABEL_NEGATIVE
    out: dict[str, str] = {}
    # the slide a row names -> (line, name as given, truth, the label as written)
    by_slide: dict[str, tuple[int, str, str, str]] = {}
    for line, row in enumerate(rows, start=2):
        value = (row.get("label") or "").strip().lower()
        raw = (row.get("slide") or "").strip()
        if value in positive:
            truth = "positive"
        elif value in negative:
            truth = "negative"
        else:
            raise ConfigError(f"{path}:{line}: label {row.get('label')!r} is neither positive (the positive class "
                              f"{spec.positive_class!r}, or {', '.join(sorted(positive - {spec_positive}))}) nor "
                              f"negative ({', '.join(sorted(negative))})")
        # a name ("a", "a.pyramid" of a.pyramid.tif) names itself; a file name names its slide ("a.svs": "a")
        name = slide_name(Path(raw)) if Path(raw).suffix.lower() in SLIDE_EXTENSIONS else raw
        out.setdefault(raw, truth)
        word = (row.get("label") or "").strip()
        if name not in by_slide:
            by_slide[name] = (line, raw, truth, word)
            continue
        first_line, first_raw, first_truth, first_word = by_slide[name]
        said = f"{raw!r} is given" if raw == name else f"{raw!r} is the slide {name!r}, given"
        where = f"line {first_line}" + (f" (as {first_raw!r})" if first_raw not in (raw, name) else "")
        if truth != first_truth:
            raise ConfigError(f"{path}:{line}: {said} the label {word!r} ({truth}) here and {first_word!r} "
                              f"({first_truth}) on {where}; keep one")
        log.warning("`labels`: %s:%d: %s the label %r here and on %s too; one row is used", path, line, said,
                    truth, where)
    for name, (_, _, truth, _) in by_slide.items():
        out.setdefault(name, truth)
    return out


def unmatched_labels(labels: dict[str, str], names: Collection[str]) -> list[str]:
    """The rows of :func:`read_labels` (slide names as given) that name none of the slides ``names``."""
    unmatched = sorted(k for k in labels if k not in names and slide_name(Path(k)) not in names)
    return [k for k in unmatched if not any(other != k and slide_name(Path(other)) == k for other in unmatched)]


def unmatched_words(unmatched: Sequence[str], names: Collection[str]) -> list[str]:
    """The rows of :func:`unmatched_labels` as a message names them, each with the slide of ``names`` it nearly
    names where one is close (a slip of case or typing: ``Tumour.tiff (tumour?)``)."""
    import difflib

    lower = {n.lower(): n for n in sorted(names)}
    out = []
    for raw in unmatched:
        near = difflib.get_close_matches(slide_name(Path(raw)).lower(), list(lower), n=1, cutoff=0.8)
        out.append(f"{raw} ({lower[near[0]]}?)" if near else raw)
    return out


def left_out(unscored: Sequence[str]) -> str | None:
    """What the slide metrics and a calibration say of labelled slides the run did not score (failed, or without
    tissue): ``1 labelled slide(s) were not scored in the run and are left out: broken``; None where there are
    none."""
    if not unscored:
        return None
    return f"{len(unscored)} labelled slide(s) were not scored in the run and are left out: {few(list(unscored))}"


def drop_slide_metrics(run: Path) -> None:
    """Remove an earlier run's slide_metrics.json and slide_roc.png: beside this run's results.csv (other slides,
    labels or rule) they would look current, and the report shows them as this run's evaluation."""
    for name in (runfolder.SLIDE_METRICS_JSON, runfolder.SLIDE_ROC_PNG):
        (run / name).unlink(missing_ok=True)


def slide_metrics(run: Path, rows: list[SlideRow], classifier: PatchClassifier,
                  aggregate: AggregateConfig) -> dict[str, Any] | None:
    """AUC, sensitivity and specificity at the slide threshold over labelled, scored slides (+ ROC plot), the AUC
    with its bootstrap 95 % interval (``auc_ci95``, :func:`wsi_screen.metrics.bootstrap_auc`, as `calibrate`), the
    rates with Wilson 95 % intervals (``sensitivity_ci95``, ``specificity_ci95``) and, on fewer positive slides than
    :data:`wsi_screen.metrics.ADVISED_POSITIVES`, calibrate's small-cohort warning (``warnings``, and logged; so is
    :func:`left_out` of labelled slides the run did not score; for labels of one class,
    :func:`wsi_screen.metrics.one_class_words` says why a rate and the AUC are missing),
    from the same code as the patch metrics (:func:`wsi_screen.metrics.binary_view`); None (and a warning) when
    no labelled slide was scored. The caller has removed an earlier run's (:func:`drop_slide_metrics`)."""
    # by name: the bootstrap draws by position, so the interval must not follow the order slides were given in
    scored = sorted((r for r in rows if r.label and r.result is not None and r.result.score is not None),
                    key=lambda r: r.name)
    if not scored:
        log.warning("`labels`: no labelled slide was scored in this run, so there are no slide metrics (the labels' "
                    "slide column must hold the slide names of results.csv)")
        return None
    y = np.array([r.label == "positive" for r in scored], dtype=bool)
    s = np.array([r.result.score for r in scored if r.result is not None], dtype=np.float64)
    view = binary_view(y, np.array([aggregate.calls(float(x)) for x in s], dtype=bool), s)
    metrics: dict[str, Any] = {
        "n_slides": len(scored), "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
        "unscored_labelled": sorted(r.name for r in rows if r.label and r not in scored),
        "rule": aggregate.rule, "threshold": aggregate.slide_threshold,
        "auc": view["auc"],
        # calibrate's interval of the same slides' AUC (the same bootstrap, resampling slides within each class)
        "auc_ci95": list(bootstrap_auc(s, y)[1:]) if view["auc"] is not None else None,
        "sensitivity": view["sensitivity"], "specificity": view["specificity"],
        **rate_intervals(view),
        "confusion": {k: view[k] for k in ("tp", "fn", "tn", "fp")},
    }
    one_class = one_class_words(metrics["n_positive"], metrics["n_negative"])
    small = (few_positives(metrics["n_positive"], "the slide sensitivity is measured on them (see its 95 % interval)")
             if metrics["n_positive"] else None)
    warnings = [w for w in (one_class, left_out(metrics["unscored_labelled"]), small) if w]
    if warnings:
        metrics["warnings"] = warnings
    for w in warnings:
        log.warning("slide metrics: %s", w)
    runfolder.write_json(run / runfolder.SLIDE_METRICS_JSON, metrics)
    if metrics["auc"] is not None:
        point = None
        if metrics["sensitivity"] is not None and metrics["specificity"] is not None:
            point = (metrics["sensitivity"], metrics["specificity"], f"threshold {aggregate.slide_threshold:.3g}")
        plot_roc(run / runfolder.SLIDE_ROC_PNG, [RocCurve(f"{aggregate.rule} (AUC {metrics['auc']:.3f})", y, s)],
                 title=f"Slide-level ROC ({metrics['n_positive']} positive, {metrics['n_negative']} negative)",
                 point=point)
    return metrics
