"""``wsi-screen infer``: a folder of slides -> patch stores -> patch scores -> slide calls and pictures.

Per slide: tile at the model's mpp, patch size and stain (reusing the tiler and any matching store), score
every patch, write ``RUN/<slide>/`` (scores, heatmap, GeoJSON, slide.json) atomically, then aggregate.
Slides already scored with the same model and store are reused on a rerun; aggregation is recomputed from
their scores, so changing ``--aggregate`` or ``--threshold`` costs nothing. A failing slide becomes a row with
``status=error`` and its reason, and the run goes on.

The slide-level rule and threshold come from the model folder's ``slide_rule.json`` (chosen on labelled
slides by ``scripts/calibrate_slide_rule.py``), unless the user overrides them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_screen import __version__, progress, runlog
from wsi_screen._safe_write import atomic_write_text, write_failed
from wsi_screen.errors import ConfigError, ModelError, RunError, WsiScreenError
from wsi_screen.metrics import RocCurve, binary_view, plot_roc
from wsi_screen.models import PatchClassifier
from wsi_screen.models.card import read_card, summary
from wsi_screen.models.domain import DOMAIN_CONFIG, DOMAIN_WEIGHTS
from wsi_screen.screening import runfolder
from wsi_screen.screening.aggregate import (
    NO_TISSUE,
    STATUS_ERROR,
    STATUS_NO_TISSUE,
    STATUS_OK,
    AggregateConfig,
    SlideResult,
    diagnose,
)
from wsi_screen.screening.runfolder import SlideFolder, SlideScores
from wsi_screen.screening.spatial import PatchGrid, patch_grid
from wsi_screen.slide import isolation
from wsi_screen.slide.discovery import SlideSource, discover
from wsi_screen.slide.slide import slide_name
from wsi_screen.tables import read_table
from wsi_screen.tiling.grid import TileSpec
from wsi_screen.tiling.pipeline import TileConfig, failure_message, tile_isolated
from wsi_screen.tiling.store import PatchStore

if TYPE_CHECKING:
    from wsi_screen.distributed import DaskRunner

log = logging.getLogger(__name__)

SLIDE_RULE_JSON = "slide_rule.json"
#: used when the model folder has no slide_rule.json
FALLBACK_RULE = AggregateConfig(rule="topk", k=5, patch_threshold=0.5, slide_threshold=0.5)

@dataclass(frozen=True, kw_only=True)
class InferConfig:
    """Settings of a screening run (the model comes separately)."""

    rule: str | None = None
    threshold: float | None = None
    k: int | float | None = None
    stores: str | None = None
    batch_size: int = 128
    workers: int = 2
    loader_workers: int = 0
    slide_mpp: float | None = None
    slide_mpps: tuple[tuple[str, float], ...] = ()
    min_tissue: float = 0.5
    overwrite: bool = False
    slide_timeout: float = isolation.DEFAULT_TIMEOUT
    labels: str | None = None


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


@dataclass(frozen=True)
class RunSummary:
    run: Path
    rows: list[SlideRow]
    aggregate: AggregateConfig
    metrics: dict[str, Any] | None

    @property
    def failed(self) -> int:
        return sum(r.status == STATUS_ERROR for r in self.rows)

    @property
    def reused(self) -> int:
        """Slides whose scores an earlier run made with the same model, slide, resolution and settings."""
        return sum(bool(r.extra.get("reused")) for r in self.rows)


# ------------------------------------------------------------------------------------------- model helpers
def model_identity(model_dir: Path, classifier: PatchClassifier) -> dict[str, Any]:
    """What identifies a model for resuming (the hash of its weights and config; of its domain model apart:
    the patch scores do not depend on it) and what a report says about it (its card's summary)."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        p = model_dir / name
        if p.exists():
            h.update(p.read_bytes())
    spec = classifier.spec
    domain = hashlib.sha256()
    for name in (DOMAIN_WEIGHTS, DOMAIN_CONFIG):
        p = model_dir / name
        if p.exists():
            domain.update(p.read_bytes())
    card = read_card(model_dir)
    return {"path": str(model_dir), "sha256": h.hexdigest(), "arch": spec.arch, "classes": spec.classes,
            "positive_class": spec.positive_class, "mpp": spec.mpp, "input_size": spec.input_size,
            "stain_method": spec.stain_method, "patch_threshold": spec.threshold,
            "domain_sha256": domain.hexdigest() if classifier.domain is not None else None,
            "domain_threshold": classifier.domain.threshold if classifier.domain is not None else None,
            "card": summary(card) if card else None}


def resolve_aggregate(model_dir: Path, classifier: PatchClassifier, config: InferConfig) -> AggregateConfig:
    """The slide rule: calibrated in the model folder, overridden by --aggregate/--threshold/--k."""
    spec = classifier.spec
    patch_threshold = spec.threshold if spec.threshold is not None else 0.5
    base = replace(FALLBACK_RULE, patch_threshold=patch_threshold)
    per_rule: dict[str, Any] = {}
    path = model_dir / SLIDE_RULE_JSON
    if path.exists():
        data = runfolder.read_json(path)
        per_rule = data.get("per_rule", {})
        base = AggregateConfig(rule=data["rule"], k=data.get("k", 5), patch_threshold=patch_threshold,
                               slide_threshold=float(data["slide_threshold"]), radius=int(data.get("radius", 1)),
                               region_threshold=float(data.get("region_threshold", patch_threshold)),
                               min_focus_patches=int(data.get("min_focus_patches", 1)))
    else:
        log.warning("%s: no %s; using the fallback rule %s with slide threshold %.2f", model_dir,
                    SLIDE_RULE_JSON, base.rule, base.slide_threshold)
    rule = config.rule or base.rule
    threshold, k, radius, region_threshold = base.slide_threshold, base.k, base.radius, base.region_threshold
    if config.rule and config.rule != base.rule:
        calibrated = per_rule.get(config.rule, {})
        threshold = float(calibrated["threshold"]) if "threshold" in calibrated else (
            patch_threshold if config.rule in ("max", "topk", "mean", "smoothmax") else 0.1)
        k = calibrated.get("k", k)
        radius = int(calibrated.get("radius", radius))
        if config.rule == "region":
            region_threshold = float(calibrated.get("region_threshold", region_threshold))
    if config.threshold is not None:
        threshold = config.threshold
    return AggregateConfig(rule=rule, k=config.k if config.k is not None else k, patch_threshold=patch_threshold,
                           slide_threshold=threshold, radius=radius, region_threshold=region_threshold,
                           min_focus_patches=base.min_focus_patches)


def tile_config_for(classifier: PatchClassifier, config: InferConfig) -> TileConfig:
    """Tile exactly as the model was trained: its mpp, input size and stain."""
    spec = classifier.spec
    if spec.mpp is None:
        raise ModelError(f"model {spec.arch} does not record the mpp of its training patches; retrain it "
                         "with `wsi-screen train --mpp X`")
    if spec.positive_class is None or len(spec.classes) != 2:
        raise ModelError(f"screening needs a binary model with a positive class; this one has classes "
                         f"{spec.classes} and positive class {spec.positive_class!r}")
    return TileConfig(spec=TileSpec(mpp=spec.mpp, size_px=spec.input_size, min_tissue=config.min_tissue),
                      finer_hint=("the model works at {target_mpp:g} um/px: screen this slide with a model trained "
                                  "at {slide_mpp:.4g} um/px or coarser, or use a higher-resolution scan (if the "
                                  "declared resolution is wrong, set it with --slide-mpp-csv)"),
                      stain=spec.stain_method, stain_target=spec.stain_target, slide_mpp=config.slide_mpp,
                      slide_mpps=config.slide_mpps, slide_timeout=config.slide_timeout,
                      workers=config.workers, overwrite=config.overwrite)


# -------------------------------------------------------------------------------------------------- run
def run_infer(slides: Sequence[str], run: Path, classifier: PatchClassifier, model_dir: Path,
              config: InferConfig, *, argv: Sequence[str] = (), debug: bool = False,
              dask: DaskRunner | None = None) -> RunSummary:
    """Screen ``slides`` (files or folders) into the run folder ``run``.

    With ``dask`` (see :mod:`wsi_screen.distributed`) each slide is one :func:`screen_slide_task` on a Dask
    cluster; aggregation, results.csv, run.json, metrics and the report are still made here, from the run
    folder, so they are the same as a local run's.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    run = Path(run)
    sources, problems = discover(slides)
    if not sources:  # nothing to screen: say why, and leave no run folder behind
        raise RunError("no slides to screen: " + "; ".join(f"{p.path}: {p.reason}" for p in problems)
                       if problems else "no slides to screen")
    aggregate = resolve_aggregate(model_dir, classifier, config)
    tile_cfg = tile_config_for(classifier, config)
    if config.stores is None:  # the run's own stores: follow the settings
        tile_cfg = replace(tile_cfg, retile_mismatched=True)
    else:
        tile_cfg = replace(tile_cfg, mismatch_hint=(
            "infer does not replace stores it did not make: re-tile this slide with `wsi-screen tile "
            "SLIDE -o STORES --overwrite` and the model's settings, or leave out --stores"))
    model_id = model_identity(model_dir, classifier)
    stores_dir = config.stores or str(run / runfolder.STORES_DIR)
    labels = read_labels(Path(config.labels), classifier) if config.labels else {}
    try:  # after every check of the settings: a refused run leaves nothing behind
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{run}: cannot create the run folder: {exc.strerror or exc}") from exc

    with runlog.run_log(run):
        return _run_in_folder(run, sources, problems, classifier, model_dir, config, aggregate, tile_cfg, model_id,
                              stores_dir, labels, argv=argv, debug=debug, dask=dask, started=started, t0=t0)


def _run_in_folder(run: Path, sources: Sequence[SlideSource], problems: Sequence[Any], classifier: PatchClassifier,
                   model_dir: Path, config: InferConfig, aggregate: AggregateConfig, tile_cfg: TileConfig,
                   model_id: dict[str, Any], stores_dir: str, labels: dict[str, str], *, argv: Sequence[str],
                   debug: bool, dask: DaskRunner | None, started: datetime, t0: float) -> RunSummary:
    """The run once its folder exists (its log open): screen every slide, then aggregate and write."""
    rows = [SlideRow(p.path.name, str(p.path), status=STATUS_ERROR, error=f"{p.path}: {p.reason}")
            for p in problems]
    for row in rows:
        log.error("%s", row.error)
    job = SlideJob(run=run, stores=stores_dir, tile=tile_cfg, model_id=model_id, batch_size=config.batch_size,
                   workers=config.workers, loader_workers=config.loader_workers, debug=debug, aggregate=aggregate)
    if dask is not None:
        rows.extend(_screen_on_dask(dask, sources, job, model_dir))
    else:
        with isolation.slide_calls(tile_cfg.slide_timeout, isolate=not debug) as call, \
                progress.bar(total=len(sources), desc="slides", unit="slide") as bar:
            for source in sources:
                rows.append(screen_slide(source, job, classifier, call=call))
                bar.update(1)

    for row in rows:
        if row.status != STATUS_ERROR:
            _aggregate_row(run, row, classifier, aggregate)
        row.label = labels.get(row.name, "")
    metrics = slide_metrics(run, rows, classifier, aggregate) if labels else None
    _write_results(run, rows, aggregate, model_id)
    _write_run_json(run, rows, aggregate, model_id, tile_cfg, config, argv, started, time.perf_counter() - t0)
    from wsi_screen.screening.report import write_report

    write_report(run)
    return RunSummary(run, rows, aggregate, metrics)


def _store_digest(location: str) -> str:
    attrs = PatchStore.open(location).attrs
    return hashlib.sha256(json.dumps(attrs.get("settings", {}), sort_keys=True).encode()).hexdigest()


def _reuse(run: Path, source: SlideSource, row: SlideRow, model_id: dict[str, Any], tile_cfg: TileConfig,
           call: isolation.Caller) -> bool:
    """Whether RUN/<slide> holds this slide scored by this model from the store this run would make now:
    same model, same slide file, same resolution (value and source) and tiling settings. Anything else is
    recomputed (the slide rule is applied afresh on every run)."""
    from wsi_screen.tiling.pipeline import store_is_current

    path = runfolder.slide_dir(run, source.name) / runfolder.SLIDE_JSON
    if not path.exists() or tile_cfg.overwrite:
        return False
    try:
        done = runfolder.read_json(path)
        model = done.get("model", {})
        if model.get("sha256") != model_id["sha256"] or model.get("domain_sha256") != model_id["domain_sha256"] \
                or done.get("source") != str(source.path):
            return False
        store = runfolder.resolve_path(done["store"], run)
        if done.get("store_digest") != _store_digest(store):
            return False
        current, mpp, mpp_source = call(store_is_current, source, store, tile_cfg)
        info = done.get("slide_info", {})
        if not current or info.get("mpp") != mpp or info.get("mpp_source") != mpp_source:
            return False
    except Exception:  # anything wrong with the earlier result or the slide: recompute (and report) it
        return False
    row.store = store
    row.extra["reused"] = True
    log.debug("%s: reusing earlier scores", source.name)
    return True


@dataclass(frozen=True, kw_only=True)
class SlideJob:
    """Everything one slide's screening needs besides the slide and the model (picklable)."""

    run: Path
    stores: str
    tile: TileConfig
    model_id: dict[str, Any]
    batch_size: int = 128
    workers: int = 2
    loader_workers: int = 0
    debug: bool = False
    aggregate: AggregateConfig | None = None


def screen_slide(source: SlideSource, job: SlideJob, classifier: PatchClassifier,
                 call: isolation.Caller = isolation.direct) -> SlideRow:
    """Tile, score and write one slide's folder (or reuse it); never raises for a bad slide. The slide is
    read through ``call`` (the slide reader's child process in a local run, see :mod:`wsi_screen.slide.isolation`)."""
    from wsi_screen.screening.score import check_store_matches_model, score_stores

    row = SlideRow(source.name, str(source.path))
    if _reuse(job.run, source, row, job.model_id, job.tile, call):
        return row
    result = tile_isolated(call, source, job.stores, job.tile, debug=job.debug)
    row.store = result.store
    if not result.ok:
        row.status, row.error = STATUS_ERROR, result.message or f"tiling {result.status}"
        log.error("%s", row.error)
        runlog.record_traceback(source.name, result.traceback)
        return row
    try:
        check_store_matches_model(PatchStore.open(result.store).attrs, classifier.spec, result.store)
        for _location, probs, distance in score_stores([result.store], classifier, batch_size=job.batch_size,
                                                       workers=job.loader_workers, desc=source.name[:30]):
            write_slide_folder(job.run, row, result.store, probs, classifier, job.model_id, job.aggregate,
                               distance=distance)
    except Exception as exc:  # the per-slide boundary: one slide's failure (a disk error too) ends only it
        if job.debug:
            raise
        row.status = STATUS_ERROR
        if isinstance(exc, OSError) and not isinstance(exc, WsiScreenError):
            row.error = str(write_failed(job.run / source.name, exc))
        else:
            row.error, trace = failure_message(source.path, exc)
            runlog.record_traceback(source.name, trace)
        log.error("%s", row.error)
    return row


def screen_slide_task(source: SlideSource, job: SlideJob, model_dir: str | None, model_sha256: str,
                      torch_threads: int | None = None) -> SlideRow:
    """The unit of work of a Dask run: :func:`screen_slide` with the model loaded on the worker.

    The classifier is not shipped: the worker loads ``model_dir`` (None: its own bundled default model) once
    per process and checks that its weights and config hash to ``model_sha256``, the client's.

    ``torch_threads`` is the client's intra-op thread count: torch's CPU kernels round differently with
    another thread count (last digits of the probabilities), and Dask starts workers with one thread
    (``OMP_NUM_THREADS=1``), so the worker scores with the client's count to give a local run's numbers.
    Dask's worker processes are daemonic and cannot start DataLoader workers, so patches are then read by a
    thread (``loader_workers=0``; the scores do not depend on it). Never raises for a bad slide or model.
    """
    try:
        classifier = _worker_classifier(model_dir, model_sha256)
    except WsiScreenError as exc:
        if job.debug:
            raise
        row = SlideRow(source.name, str(source.path), status=STATUS_ERROR, error=str(exc))
        log.error("%s", row.error)
        return row
    if torch_threads:
        import torch

        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    if job.loader_workers and multiprocessing.current_process().daemon:
        job = replace(job, loader_workers=0)
    return screen_slide(source, job, classifier)


@lru_cache(maxsize=4)
def _worker_classifier(model_dir: str | None, sha256: str) -> PatchClassifier:
    """The model of a Dask run, loaded once per worker process (keyed by folder and content hash)."""
    from wsi_screen.models import default_model_dir, load_model

    path = Path(model_dir) if model_dir is not None else default_model_dir()
    try:
        classifier = load_model(path)
    except WsiScreenError as exc:
        raise ModelError(f"cannot load the model on a Dask worker: {exc}") from exc
    found = model_identity(path, classifier)["sha256"]
    if found != sha256:
        raise ModelError(f"{path}: the model on this Dask worker is not the client's (sha256 {found[:12]}, expected "
                         f"{sha256[:12]}); every worker needs the same model folder and wsi-screen version")
    return classifier


def _screen_on_dask(dask: DaskRunner, sources: Sequence[SlideSource], job: SlideJob,
                    model_dir: Path) -> list[SlideRow]:
    """One :func:`screen_slide_task` per slide. Workers get absolute paths (they run elsewhere) and this
    process's torch thread count; the rows spell the slide and store paths as given here, so results.csv is
    the one a local run writes."""
    import torch

    from wsi_screen.distributed import Call, task_key
    from wsi_screen.models import default_model_dir
    from wsi_screen.tiling.pipeline import output_location, worker_config
    from wsi_screen.tiling.store import store_location

    remote_job = replace(job, run=job.run.absolute(), stores=output_location(job.stores, absolute=True),
                         tile=worker_config(job.tile))
    bundled = model_dir.resolve() == default_model_dir().resolve()
    remote_model = None if bundled else str(model_dir.absolute())
    sha = str(job.model_id["sha256"])
    threads = torch.get_num_threads()
    remote = [SlideSource(s.path.absolute(), s.name) for s in sources]
    calls = [Call(task_key("infer", s.name, s, remote_job, remote_model, threads),
                  (s, remote_job, remote_model, sha, threads)) for s in remote]

    def failed(i: int, reason: str) -> SlideRow:
        s = sources[i]
        row = SlideRow(s.name, str(s.path), status=STATUS_ERROR, error=f"{s.path}: {reason}")
        log.error("%s", row.error)
        return row

    def arrived(i: int, row: SlideRow) -> SlideRow:
        s = sources[i]
        row.source = str(s.path)
        if row.store == store_location(remote_job.stores, s.name):
            row.store = store_location(job.stores, s.name)
        folder = runfolder.slide_dir(job.run, s.name) / runfolder.SLIDE_JSON
        if row.status != STATUS_ERROR and not folder.exists():
            row.status, row.error = STATUS_ERROR, (
                f"{folder.parent}: written by a Dask worker but not visible here; the run folder must be on a "
                "filesystem shared by this machine and every worker (see docs/cluster.md)")
            log.error("%s", row.error)
        return row

    return dask.run(screen_slide_task, calls, failed=failed, on_result=arrived, reraise=job.debug)


def heatmap_key(aggregate: AggregateConfig | None, patch_threshold: float | None, result: SlideResult | None) -> str:
    """What a heatmap is drawn with besides the scores: the rule and the largest focus it outlines."""
    focus = hashlib.sha256(json.dumps(result.focus_indices if result else []).encode()).hexdigest()[:16]
    rule = json.dumps(aggregate.to_json(), sort_keys=True) if aggregate else "none"
    return f"v1|{rule}|{patch_threshold}|{focus}"


def _focus_result(probs: np.ndarray, store: PatchStore, aggregate: AggregateConfig | None,
                  spec: Any) -> SlideResult | None:
    if aggregate is None or not len(probs):
        return None
    grid = patch_grid(store.coords, probs, int(store.attrs["stride_l0"]), float(store.attrs["slide"]["mpp"]))
    try:
        return diagnose(probs, aggregate, positive=str(spec.positive_class), negative="", grid=grid)
    except ConfigError:
        return None


def draw_heatmap(path: Path, store: PatchStore, coords: np.ndarray, probs: np.ndarray, name: str,
                 positive_class: str | None, threshold: float | None, aggregate: AggregateConfig | None,
                 result: SlideResult | None) -> None:
    """heatmap.png: P(positive) over the thumbnail, the model's threshold contour, the largest focus outlined."""
    from wsi_screen.screening.heatmap import heatmap_array, render_overlay

    thumb = store.thumbnail
    dims = tuple(store.attrs["slide"]["dimensions"])
    size = (int(dims[0]), int(dims[1]))
    stride = int(store.attrs["stride_l0"])
    heat = heatmap_array(coords, probs, store.tile_size_l0, stride, size, thumb.shape[:2])
    outline, label = None, "largest focus"
    if result is not None and result.focus_indices:
        idx = np.asarray(result.focus_indices, dtype=np.int64)
        outline = heatmap_array(coords[idx], np.ones(idx.size), store.tile_size_l0, stride, size, thumb.shape[:2])
        label = f"largest focus ({result.largest_focus_mm:.2f} mm, {result.metastasis})"
    render_overlay(thumb, heat, title=name, out_path=path, legend_label=f"P({positive_class})",
                   threshold=threshold, dimensions_l0=size, mpp=float(store.attrs["slide"]["mpp"]),
                   outline=outline, outline_label=label, key=heatmap_key(aggregate, threshold, result))


def write_slide_folder(run: Path, row: SlideRow, location: str, probs: np.ndarray, classifier: PatchClassifier,
                       model_id: dict[str, Any], aggregate: AggregateConfig | None = None, *,
                       distance: np.ndarray | None = None) -> Path:
    """Write RUN/<slide>/ (scores.csv, heatmap.png, patches.geojson, slide.json) in one atomic step.

    The heatmap outlines the largest focus found by ``aggregate`` (redrawn at aggregation when the rule
    changes, see :func:`_aggregate_row`)."""
    from wsi_screen.screening.geojson import patches_to_geojson, write_geojson

    store = PatchStore.open(location)
    spec = classifier.spec
    pos = spec.positive_index if spec.positive_index is not None else 1
    scores = SlideScores(coords=store.coords, tissue=store.tissue, probs=probs.astype(np.float32),
                         classes=list(spec.classes), domain_distance=distance)
    folder = SlideFolder(run, row.name)
    try:
        atomic_write_text(folder.path(runfolder.SCORES_CSV), runfolder.scores_csv(scores))
        result = _focus_result(scores.probs[:, pos], store, aggregate, spec)
        draw_heatmap(folder.path(runfolder.HEATMAP_PNG), store, scores.coords, scores.probs[:, pos], row.name,
                     spec.positive_class, spec.threshold, aggregate, result)
        fc = patches_to_geojson(scores.coords, store.tile_size_l0, scores.probs, spec.classes, slide_name=row.name,
                                positive_index=spec.positive_index, threshold=spec.threshold)
        write_geojson(fc, folder.path(runfolder.GEOJSON))
        runfolder.write_json(folder.path(runfolder.SLIDE_JSON), {
            "slide": row.name, "source": row.source, "store": runfolder.portable_path(location, run),
            "store_digest": _store_digest(location),
            "n_patches": len(store), "tile_size_l0": store.tile_size_l0, "stride_l0": int(store.attrs["stride_l0"]),
            "mpp": store.mpp,
            "slide_info": store.attrs["slide"], "model": model_id, "package_version": __version__,
        })
        return folder.commit()
    except BaseException:
        folder.abort()
        raise


def _aggregate_row(run: Path, row: SlideRow, classifier: PatchClassifier, aggregate: AggregateConfig) -> None:
    spec = classifier.spec
    try:
        scores = runfolder.read_scores(runfolder.slide_dir(run, row.name) / runfolder.SCORES_CSV)
    except WsiScreenError as exc:
        row.status, row.error = STATUS_ERROR, str(exc)
        return
    pos = scores.classes.index(spec.positive_class) if spec.positive_class in scores.classes else 1
    negative = next(c for c in scores.classes if c != spec.positive_class)
    try:
        done = runfolder.read_slide(run, row.name)
    except (WsiScreenError, OSError):
        done = {}
    info = done.get("slide_info", {})
    row.extra.update(slide_mpp=info.get("mpp"), mpp_source=info.get("mpp_source"), **slide_domain(scores, classifier))
    grid = slide_grid(done, scores.coords, scores.probs[:, pos])
    try:
        result = diagnose(scores.probs[:, pos], aggregate, positive=str(spec.positive_class), negative=negative,
                          grid=grid)
    except ConfigError as exc:  # a spatial rule on a slide folder without its grid
        row.status, row.error = STATUS_ERROR, f"{row.name}: {exc}"
        return
    row.result = result
    _refresh_heatmap(run, row, scores, pos, spec, aggregate, result)
    if result.diagnosis == NO_TISSUE:
        row.status = STATUS_NO_TISSUE
    elif result.top_indices:
        i = result.top_indices[0]
        row.top = (int(scores.coords[i, 0]), int(scores.coords[i, 1]), float(scores.probs[i, pos]))


def slide_domain(scores: SlideScores, classifier: PatchClassifier) -> dict[str, Any]:
    """``in_domain_fraction`` (of the slide's patches) and ``out_of_domain`` (fewer than the model's
    ``slide_min_in_domain`` in domain: the call is kept but unreliable); empty without a domain model or
    distances (a slide scored before they existed)."""
    domain = classifier.domain
    if domain is None or scores.domain_distance is None or len(scores.domain_distance) == 0:
        return {}
    fraction = float(np.mean(domain.in_domain(scores.domain_distance)))
    return {"in_domain_fraction": fraction, "out_of_domain": fraction < domain.slide_min_in_domain}


def _refresh_heatmap(run: Path, row: SlideRow, scores: SlideScores, pos: int, spec: Any,
                     aggregate: AggregateConfig, result: SlideResult) -> None:
    """Redraw a reused slide's heatmap when it was drawn with another rule or focus (best effort)."""
    from wsi_screen.screening.heatmap import drawn_with

    path = runfolder.slide_dir(run, row.name) / runfolder.HEATMAP_PNG
    key = heatmap_key(aggregate, spec.threshold, result if result.score is not None else None)
    if not path.exists() or drawn_with(path) == key or not row.store:
        return
    try:
        store = PatchStore.open(row.store)
        draw_heatmap(path, store, scores.coords, scores.probs[:, pos], row.name, spec.positive_class, spec.threshold,
                     aggregate, result)
    except (WsiScreenError, OSError) as exc:
        log.warning("%s: heatmap not redrawn for the new rule: %s", row.name, exc)


def slide_grid(done: dict[str, Any], coords: np.ndarray, probs: np.ndarray) -> PatchGrid | None:
    """The slide's patch probabilities on their grid (stride and level-0 mpp from its slide.json ``done``)."""
    try:
        stride = int(done.get("stride_l0") or done["tile_size_l0"])
        mpp = float(done["slide_info"]["mpp"])
    except (KeyError, TypeError, ValueError):
        return None
    return patch_grid(coords, probs, stride, mpp)


def _mm(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _write_results(run: Path, rows: list[SlideRow], aggregate: AggregateConfig, model_id: dict[str, Any]) -> None:
    table = []
    for r in sorted(rows, key=lambda r: r.name):
        res = r.result
        table.append({
            "slide": r.name, "status": r.status, "n_patches": res.n_patches if res else "",
            "score": f"{res.score:.6f}" if res and res.score is not None else "",
            "diagnosis": res.diagnosis if res else "error",
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
            "label": r.label, "error": r.error, "source": r.source,
            "store": runfolder.portable_path(r.store, run) if r.store else "",
        })
    atomic_write_text(run / runfolder.RESULTS_CSV, runfolder.csv_text(table, runfolder.RESULT_COLUMNS))


def _write_run_json(run: Path, rows: list[SlideRow], aggregate: AggregateConfig, model_id: dict[str, Any],
                    tile_cfg: TileConfig, config: InferConfig, argv: Sequence[str], started: datetime,
                    seconds: float) -> None:
    import torch

    runfolder.write_json(run / runfolder.RUN_JSON, {
        "command": ["wsi-screen", *argv],
        "package_version": __version__,
        "started": started.replace(microsecond=0).isoformat(),
        "seconds": round(seconds, 2),
        "model": model_id,
        "aggregate": aggregate.to_json(),
        "tiling": {"mpp": tile_cfg.spec.mpp, "patch_size": tile_cfg.spec.size_px,
                   "min_tissue": tile_cfg.spec.min_tissue, "stain": tile_cfg.stain,
                   "stain_target": tile_cfg.stain_target, "tissue": tile_cfg.tissue.to_json()},
        "settings": {"batch_size": config.batch_size, "workers": config.workers,
                     "loader_workers": config.loader_workers, "stores": config.stores,
                     "slide_mpp": config.slide_mpp, "slide_mpp_csv": dict(config.slide_mpps),
                     "labels": config.labels},
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "torch": torch.__version__, "numpy": np.__version__},
        "slides": [{"slide": r.name, "status": r.status, "error": r.error, "mpp": r.extra.get("slide_mpp"),
                    "mpp_source": r.extra.get("mpp_source"), "reused": bool(r.extra.get("reused")),
                    "in_domain_fraction": r.extra.get("in_domain_fraction"),
                    "out_of_domain": r.extra.get("out_of_domain")}
                   for r in sorted(rows, key=lambda r: r.name)],
    })


# --------------------------------------------------------------------------------------- slide-level truth
#: what a slide label may say for "positive" / "negative" (besides the model's own class names)
LABEL_POSITIVE = {"1", "true", "yes", "positive", "pos", "tumor", "tumour", "cancer", "abnormal"}
LABEL_NEGATIVE = {"0", "false", "no", "negative", "neg", "normal", "benign"}


def read_labels(path: Path, classifier: PatchClassifier) -> dict[str, str]:
    """``slides.csv`` (columns ``slide``, ``label``) -> {slide name: "positive" | "negative"}."""
    rows = read_table(path, ("slide", "label"), "--labels")
    spec = classifier.spec
    positive = {str(spec.positive_class).lower()} | LABEL_POSITIVE
    negative = {c.lower() for c in spec.classes if c != spec.positive_class} | LABEL_NEGATIVE
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        value = (row.get("label") or "").strip().lower()
        raw = (row.get("slide") or "").strip()
        if value in positive:
            truth = "positive"
        elif value in negative:
            truth = "negative"
        else:
            raise ConfigError(f"{path}:{i}: label {row.get('label')!r} is neither the positive class "
                              f"{spec.positive_class!r} nor a negative one ({', '.join(sorted(negative))})")
        out[raw] = truth
        out.setdefault(slide_name(Path(raw)), truth)  # "a.svs" labels slide "a"
    return out


def slide_metrics(run: Path, rows: list[SlideRow], classifier: PatchClassifier,
                  aggregate: AggregateConfig) -> dict[str, Any]:
    """AUC, sensitivity and specificity at the slide threshold over labelled, scored slides (+ ROC plot),
    from the same code as the patch metrics (:func:`wsi_screen.metrics.binary_view`)."""
    scored = [r for r in rows if r.label and r.result is not None and r.result.score is not None]
    y = np.array([r.label == "positive" for r in scored], dtype=bool)
    s = np.array([r.result.score for r in scored if r.result is not None], dtype=np.float64)
    view = binary_view(y, s >= aggregate.slide_threshold, s)
    metrics: dict[str, Any] = {
        "n_slides": len(scored), "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
        "unscored_labelled": sorted(r.name for r in rows if r.label and r not in scored),
        "rule": aggregate.rule, "threshold": aggregate.slide_threshold,
        "auc": view["auc"], "sensitivity": view["sensitivity"], "specificity": view["specificity"],
        "confusion": {k: view[k] for k in ("tp", "fn", "tn", "fp")},
    }
    runfolder.write_json(run / runfolder.SLIDE_METRICS_JSON, metrics)
    if metrics["auc"] is not None:
        point = None
        if metrics["sensitivity"] is not None and metrics["specificity"] is not None:
            point = (metrics["sensitivity"], metrics["specificity"], f"threshold {aggregate.slide_threshold:.3g}")
        plot_roc(run / runfolder.SLIDE_ROC_PNG, [RocCurve(f"{aggregate.rule} (AUC {metrics['auc']:.3f})", y, s)],
                 title=f"Slide-level ROC ({metrics['n_positive']} positive, {metrics['n_negative']} negative)",
                 point=point)
    return metrics
