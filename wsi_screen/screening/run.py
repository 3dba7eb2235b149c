"""``wsi-screen infer``: a folder of slides -> patch stores -> patch scores -> slide calls and pictures.

Per slide: tile at the model's mpp, patch size and stain (reusing the tiler and any matching store), score
every patch, write ``RUN/<slide>/`` (scores, heatmap, GeoJSON, slide.json) atomically, then aggregate.
By default the run keeps no patch pixels: the tiler writes a coordinates-only store (coordinates, tissue,
thumbnail, mask, stain fit) and scoring streams the patches from the slide, read by reader threads, normalised and
scored in one pass while the model works on the previous batch (:class:`wsi_screen.tiling.ondemand.SlidePatches`
behind :meth:`PatchStore.read`). ``keep_patches`` writes lz4 pixel stores as before (the
same bytes, so the same scores). Slides already scored with the same model and store are reused on a rerun;
aggregation is recomputed from their scores, so changing the slide rule or its threshold costs nothing. A
failing slide becomes a row with
``status=error`` and its reason, and the run goes on; results an earlier run left for it are moved to
``RUN/<slide>/stale/`` so that they do not look current.

The slide-level rule and threshold come from the model folder's ``slide_rule.json`` (chosen on labelled
slides by ``scripts/calibrate_slide_rule.py``), unless the user overrides them.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_screen import progress, runlog
from wsi_screen._safe_write import abandoned_work_removed, usable_folder, write_failed
from wsi_screen.errors import ModelError, RunError, SlideBusyError, StoreLockedError, WsiScreenError
from wsi_screen.models import PatchClassifier
from wsi_screen.models.card import read_card, summary
from wsi_screen.models.device import device_info
from wsi_screen.models.domain import DOMAIN_CONFIG, DOMAIN_WEIGHTS
from wsi_screen.screening import runfolder, startup
from wsi_screen.screening.aggregate import (
    NO_RESULT,
    STATUS_BUSY,
    STATUS_ERROR,
    AggregateConfig,
    check_k,
    check_k_read,
)
from wsi_screen.screening.outputs import (
    SlideRow,
    aggregate_row,
    drop_slide_metrics,
    read_labels,
    slide_metrics,
    store_digest,
    unmatched_labels,
    unmatched_words,
    write_results,
    write_run_json,
    write_slide_folder,
)
from wsi_screen.screening.pictured import REPORT_TOP, check_report_top
from wsi_screen.slide import isolation
from wsi_screen.slide.discovery import SlideSource, discover, nothing_found
from wsi_screen.slide.slide import warn_if_touched, warn_unmatched_mpp
from wsi_screen.slide.tables import few
from wsi_screen.tiling.codecs import PatchCodec
from wsi_screen.tiling.grid import TileSpec
from wsi_screen.tiling.pipeline import OnError, TileConfig, failure_message, tile_isolated, with_stores_policy
from wsi_screen.tiling.store import PatchStore

if TYPE_CHECKING:
    from wsi_screen.distributed import DaskRunner

log = logging.getLogger(__name__)

SLIDE_RULE_JSON = "slide_rule.json"
#: used when the model folder has no slide_rule.json (see :func:`fallback_rule`)
FALLBACK_RULE = AggregateConfig(rule="topk", k=5, patch_threshold=0.5, slide_threshold=0.5)


#: the model folders whose missing slide_rule.json this process has warned of (once each, not on every call)
_warned_fallback: set[Path] = set()


def rule_source(model_dir: Path) -> str:
    """What a model folder's slide rule rests on: its :data:`SLIDE_RULE_JSON`, or without one
    :data:`~wsi_screen.screening.runfolder.FALLBACK_SOURCE` (run.json's ``aggregate.source``; the report names a
    fallback rule beside it)."""
    return SLIDE_RULE_JSON if (model_dir / SLIDE_RULE_JSON).exists() else runfolder.FALLBACK_SOURCE


def fallback_rule(patch_threshold: float | None) -> AggregateConfig:
    """:data:`FALLBACK_RULE` for a model without a calibrated rule: it has one patch threshold, its own (0.5 when
    it has none), so its foci and pictures use that one too."""
    threshold = patch_threshold if patch_threshold is not None else 0.5
    return replace(FALLBACK_RULE, patch_threshold=threshold, region_threshold=threshold)


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
    #: write pixel stores (lz4: lossless, the streamed patches' bytes) instead of coordinates-only ones
    keep_patches: bool = False
    #: the device Dask workers score on (auto/cuda: each its own GPU, see wsi_screen.distributed); a local run
    #: scores on the classifier's
    device: str = "auto"
    #: how many slides besides those that need a look the report shows with pictures (wsi_screen.screening.pictured)
    report_top: int = REPORT_TOP

    def __post_init__(self) -> None:
        check_report_top(self.report_top)  # refused before the run, not after its slides

    def to_json(self) -> dict[str, Any]:
        """The settings ``run.json`` records."""
        return {"batch_size": self.batch_size, "workers": self.workers, "loader_workers": self.loader_workers,
                "stores": self.stores, "slide_mpp": self.slide_mpp, "slide_mpp_csv": dict(self.slide_mpps),
                "labels": self.labels, "device": self.device,
                "keep_patches": self.keep_patches, "report_top": self.report_top,
                # the slide rule's settings given explicitly (the report names them as overrides)
                "overrides": {k: v for k, v in (("aggregate", self.rule), ("threshold", self.threshold),
                                                ("k", self.k)) if v is not None}}


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
    def busy(self) -> int:
        """Slides skipped because another wsi-screen process was writing their store or results (not failed)."""
        return sum(r.status == STATUS_BUSY for r in self.rows)

    @property
    def reused(self) -> int:
        """Slides whose scores an earlier run made with the same model, slide, resolution and settings."""
        return sum(bool(r.extra.get("reused")) for r in self.rows)


# ------------------------------------------------------------------------------------------- model helpers
def model_sha256(model_dir: Path) -> str:
    """What identifies a model folder's patch scores: the sha256 of its weights and config (not of its domain
    model, on which the patch scores do not depend)."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        p = model_dir / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()


def model_identity(model_dir: Path, classifier: PatchClassifier) -> dict[str, Any]:
    """What identifies a model for resuming (:func:`model_sha256`; its domain model's hash apart) and what a
    report says about it (its card's summary)."""
    spec = classifier.spec
    domain = hashlib.sha256()
    for name in (DOMAIN_WEIGHTS, DOMAIN_CONFIG):
        p = model_dir / name
        if p.exists():
            domain.update(p.read_bytes())
    card = read_card(model_dir)
    return {"path": str(model_dir), "sha256": model_sha256(model_dir), "arch": spec.arch, "classes": spec.classes,
            "positive_class": spec.positive_class, "mpp": spec.mpp, "input_size": spec.input_size,
            "stain_method": spec.stain_method, "patch_threshold": spec.threshold,
            "numeric_precision": classifier.precision, "device": device_info(classifier.device),
            "domain_sha256": domain.hexdigest() if classifier.domain is not None else None,
            "domain_threshold": classifier.domain.threshold if classifier.domain is not None else None,
            "card": summary(card, domain_model=classifier.domain is not None) if card else None,
            # a head on an encoder: which encoder, and which weights (the model's sha256 covers only the head's)
            **({"encoder": {k: spec.encoder.get(k) for k in ("name", "ref", "weights_sha256")}}
               if spec.encoder else {})}


def calibrated_rule(model_dir: Path, patch_threshold: float) -> tuple[AggregateConfig, dict[str, Any]] | None:
    """The rule in a model folder's :data:`SLIDE_RULE_JSON` with the model's own ``patch_threshold``, and its
    ``per_rule`` (each rule's calibrated settings); None for a folder without one (see :func:`fallback_rule`)."""
    path = model_dir / SLIDE_RULE_JSON
    if not path.exists():
        return None
    data = runfolder.read_json(path)
    return AggregateConfig(rule=data["rule"], k=data.get("k", 5), patch_threshold=patch_threshold,
                           slide_threshold=float(data["slide_threshold"]), radius=int(data.get("radius", 1)),
                           region_threshold=float(data.get("region_threshold", patch_threshold)),
                           min_focus_patches=int(data.get("min_focus_patches", 1))), data.get("per_rule", {})


def resolve_aggregate(model_dir: Path, classifier: PatchClassifier, config: InferConfig) -> AggregateConfig:
    """The slide rule: calibrated in the model folder, overridden by ``config.rule``, ``threshold`` and ``k``; a
    folder without one gets :func:`fallback_rule`, warned of once per folder in a process. A ``k`` other than the
    one the kept threshold was calibrated for is warned of (the threshold stays); a ``k`` for a rule other than
    topk is refused (:func:`~wsi_screen.screening.aggregate.check_k_read`)."""
    if config.k is not None:
        check_k(config.k)  # before a warning about it
    spec = classifier.spec
    patch_threshold = spec.threshold if spec.threshold is not None else 0.5
    base = fallback_rule(patch_threshold)
    per_rule: dict[str, Any] = {}
    path = model_dir / SLIDE_RULE_JSON
    found = calibrated_rule(model_dir, patch_threshold)
    if found is not None:
        base, per_rule = found
    elif model_dir.resolve() not in _warned_fallback:  # once per folder: the API resolves the rule on every call
        _warned_fallback.add(model_dir.resolve())
        log.warning("%s: no %s; using the fallback rule %s with slide threshold %.2f", model_dir,
                    SLIDE_RULE_JSON, base.rule, base.slide_threshold)
    rule = config.rule or base.rule
    check_k_read(rule, config.k)
    threshold, k, radius, region_threshold = base.slide_threshold, base.k, base.radius, base.region_threshold
    calibrated_threshold = found is not None  # the threshold was chosen for the rule at k (not a default)
    if config.rule and config.rule != base.rule:
        calibrated = per_rule.get(config.rule, {})
        calibrated_threshold = "threshold" in calibrated
        threshold = float(calibrated["threshold"]) if "threshold" in calibrated else (
            patch_threshold if config.rule in ("max", "topk", "mean", "smoothmax") else 0.1)
        k = calibrated.get("k", k)
        radius = int(calibrated.get("radius", radius))
        if config.rule == "region":
            region_threshold = float(calibrated.get("region_threshold", region_threshold))
    if config.threshold is not None:
        threshold = config.threshold
    elif rule == "topk" and config.k is not None and config.k != k and calibrated_threshold:
        log.warning("`k`=%g is not the k the slide threshold %.3g was calibrated for (k = %g, %s); the threshold is "
                    "kept: set `threshold` for this k, or calibrate a copy of the model with it (wsi-screen "
                    "calibrate)", config.k, threshold, k, path)
    return AggregateConfig(rule=rule, k=config.k if config.k is not None else k, patch_threshold=patch_threshold,
                           slide_threshold=threshold, radius=radius, region_threshold=region_threshold,
                           min_focus_patches=base.min_focus_patches)


def tile_config_for(classifier: PatchClassifier, config: InferConfig) -> TileConfig:
    """Tile exactly as the model was trained: its mpp, input size and stain."""
    spec = classifier.spec
    if spec.mpp is None:
        raise ModelError(f"model {spec.arch} does not record the mpp of its training patches; retrain it "
                         "with their `mpp` set")
    if spec.positive_class is None or len(spec.classes) != 2:
        raise ModelError(f"screening needs a binary model with a positive class; this one has classes "
                         f"{spec.classes} and positive class {spec.positive_class!r}")
    return TileConfig(spec=TileSpec(mpp=spec.mpp, size_px=spec.input_size, min_tissue=config.min_tissue),
                      model_mpp=True,
                      stain=spec.stain_method, stain_target=spec.stain_target, slide_mpp=config.slide_mpp,
                      slide_mpps=config.slide_mpps, slide_timeout=config.slide_timeout,
                      workers=config.workers, overwrite=config.overwrite,
                      pixels=config.keep_patches, codec=PatchCodec("lz4"))


# -------------------------------------------------------------------------------------------------- run
def run_infer(slides: Sequence[str], run: Path, classifier: PatchClassifier, model_dir: Path,
              config: InferConfig, *, argv: Sequence[str] = (), on_error: OnError = "raise",
              dask: DaskRunner | None = None) -> RunSummary:
    """Screen ``slides`` (files or folders) into the run folder ``run``.

    With ``dask`` (see :mod:`wsi_screen.distributed`) each slide is one :func:`screen_slide_task` on a Dask
    cluster; aggregation, results.csv, run.json, metrics and the report are still made here, from the run
    folder, so they are the same as a local run's. ``on_error="record"`` (the command's policy) makes a
    slide's failure its row in results.csv and goes on; ``"raise"`` re-raises it (the CLI's debug mode).
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    run = Path(run)
    with runlog.held():  # library warnings of discovery (DICOM headers) wait for the run log
        sources, problems = discover(slides)
        if not sources:  # nothing to screen: say why, and leave no run folder behind
            raise RunError(nothing_found("screen", problems))
        tile_cfg = tile_config_for(classifier, config)  # refuses a model that cannot screen before any rule warning
        if classifier.domain is None:
            log.warning("%s: the model has no domain model (domain.json; a head on an encoder has none): slides "
                        "are not checked for being out of domain", model_dir)
        warn_unmatched_mpp(dict(tile_cfg.slide_mpps), sources)
        aggregate = resolve_aggregate(model_dir, classifier, config)
        tile_cfg = with_stores_policy(tile_cfg, given=config.stores is not None)
        # recorded as a run folder records a path it depends on, so a moved or copied run still finds its model
        model_id = {**model_identity(model_dir, classifier), "path": runfolder.portable_path(str(model_dir), run)}
        stores_dir = config.stores or str(run / runfolder.STORES_DIR)
        labels = read_labels(Path(config.labels), classifier) if config.labels else {}
        usable_folder(run, "run folder")  # after every check of the settings: a refused run leaves nothing behind

        with runlog.run_log(run):
            return _run_in_folder(run, sources, problems, classifier, model_dir, config, aggregate, tile_cfg, model_id,
                                  stores_dir, labels, argv=argv, on_error=on_error, dask=dask, started=started, t0=t0)


def _run_in_folder(run: Path, sources: Sequence[SlideSource], problems: Sequence[Any], classifier: PatchClassifier,
                   model_dir: Path, config: InferConfig, aggregate: AggregateConfig, tile_cfg: TileConfig,
                   model_id: dict[str, Any], stores_dir: str, labels: dict[str, str], *, argv: Sequence[str],
                   on_error: OnError, dask: DaskRunner | None, started: datetime, t0: float) -> RunSummary:
    """The run once its folder exists (its log open): screen every slide, then aggregate and write."""
    rows = [SlideRow(p.path.name, str(p.path), status=STATUS_ERROR, error=f"{p.path}: {p.reason}")
            for p in problems]
    for row in rows:
        log.error("%s", row.error)
    job = SlideJob(run=run, stores=stores_dir, tile=tile_cfg, model_id=model_id, batch_size=config.batch_size,
                   workers=config.workers, loader_workers=config.loader_workers, on_error=on_error, aggregate=aggregate,
                   device=config.device)
    if dask is not None:
        rows.extend(_screen_on_dask(dask, sources, job, model_dir))
    else:
        tiler = (tile_isolated.__module__,)  # what a new slide reader imports first
        with isolation.slide_calls(tile_cfg.slide_timeout, isolate=on_error == "record", preload=tiler) as call, \
                progress.bar(total=len(sources), desc="slides", unit="slide") as bar:
            for source in sources:
                rows.append(screen_slide(source, job, classifier, call=call))
                bar.update(1)

    screened = time.perf_counter()
    for row in rows:
        if row.status not in NO_RESULT:
            before = time.perf_counter()
            aggregate_row(run, row, classifier, aggregate)
            seconds = row.extra.setdefault("seconds", {})
            seconds["outputs"] = round(seconds.get("outputs", 0.0) + time.perf_counter() - before, 3)
        row.label = labels.get(row.name, "")
    set_aside_failed(run, rows)
    warn_lossy_stores(rows)
    if labels:
        warn_unmatched_labels(labels, {r.name for r in rows})
    drop_slide_metrics(run)  # an earlier labelled run's, which the report would show as this run's
    metrics = slide_metrics(run, rows, classifier, aggregate) if labels else None
    write_results(run, rows, aggregate, model_id)
    warn_earlier_slides(run, rows)
    stages = {"start_up": startup.seconds_until(t0), "slides": screened - t0,
              "run_outputs": time.perf_counter() - screened}
    write_run_json(run, rows, aggregate, model_id, tile_cfg, config.to_json(), argv, started,
                   time.perf_counter() - t0, stages, rule_source=rule_source(model_dir))
    from wsi_screen.screening.report import write_report

    write_report(run, config.report_top)
    return RunSummary(run, rows, aggregate, metrics)


def warn_lossy_stores(rows: Sequence[SlideRow]) -> None:
    """One warning naming the slides scored from lossy (JPEG, JPEG XL) patches: reused stores of ``tile``'s
    default codec. Their patch grid is the slide's, their pixels are not quite, so their scores differ from a run on
    the slide, enough to change a slide's out-of-domain flag or a call near its threshold; lz4 and coordinates-only
    stores give exactly its scores (docs/store.md)."""
    lossy = [r for r in rows if r.status not in NO_RESULT and runfolder.lossy_pixels(r.extra.get("store_pixels"))]
    if not lossy:
        return
    codecs = sorted({(str(c["name"]), c.get("quality")) for r in lossy for c in [r.extra["store_pixels"]["codec"]]})
    kinds = "/".join(dict.fromkeys(PatchCodec(name).label for name, _ in codecs))
    log.warning("%d slide(s) scored from %s-compressed patches of reused stores (%s): their scores differ from a "
                "run on the slides, and a slide's out-of-domain flag (or a call near the threshold) can differ too; "
                "lz4 or coordinates-only stores give exactly the scores of a run on the slide: %s",
                len(lossy), kinds, ", ".join(f"{name} quality {q}" for name, q in codecs),
                few(sorted(r.name for r in lossy)))


def warn_unmatched_labels(labels: dict[str, str], names: Collection[str]) -> None:
    """One warning naming the slide-label rows that name no slide of this run (a typo, or another run's slides)."""
    unmatched = unmatched_labels(labels, names)
    if unmatched:
        shown = few(unmatched_words(unmatched, names))
        log.warning("`labels`: %d row(s) name no slide of this run: %s", len(unmatched), shown)


def warn_earlier_slides(run: Path, rows: Sequence[SlideRow]) -> None:
    """One warning naming the slide folders an earlier run left in ``run`` that this run's results.csv does not
    list (a rerun on fewer slides, or a slide renamed by a clash): they are kept, but no longer in the table."""
    earlier = sorted(set(runfolder.slide_folders(run)) - {r.name for r in rows})
    if earlier:
        shown = few(earlier)
        log.warning("%s: %d slide folder(s) of an earlier run are not in this run's %s (kept as they are): %s",
                    run, len(earlier), runfolder.RESULTS_CSV, shown)


def set_aside_failed(run: Path, rows: Sequence[SlideRow]) -> None:
    """Move the results an earlier run left for each slide this run failed on into ``RUN/<slide>/stale/``
    (:func:`~wsi_screen.screening.runfolder.set_aside`), with a warning naming the slide and where they went: beside
    an error row, an old heatmap and GeoJSON would pass for this run's (a lab imports the GeoJSON into QuPath).
    A slide this run skipped as busy (another process writing it into the same run folder) is left alone: what
    that process writes is current."""
    for row in rows:
        if row.status != STATUS_ERROR:  # ok, no tissue, or busy (the other process is writing its results now)
            continue
        try:
            stale = runfolder.set_aside(run, row.name)
        except WsiScreenError as exc:
            log.warning("%s: failed in this run, and its earlier results could not be moved aside: %s", row.name, exc)
            continue
        if stale is not None:
            log.warning("%s: failed in this run; the earlier run's results of it (%s) were moved to %s: they are "
                        "not this run's", row.name, ", ".join(runfolder.SLIDE_FILES), stale)


def _reuse(run: Path, source: SlideSource, row: SlideRow, model_id: dict[str, Any], tile_cfg: TileConfig,
           stores: str, call: isolation.Caller) -> bool:
    """Whether RUN/<slide> holds this slide scored by this model from patches like those this run would read now:
    the slide's store in ``stores`` exists with the settings (codec included) of the store the scores came from (a
    store of another codec, in another folder, is not reused from), same model and arithmetic (precision), same
    slide file, same resolution (value and source) and tiling settings. Anything else is recomputed (the slide rule
    is applied afresh on every run)."""
    from wsi_screen.tiling.pipeline import store_is_current
    from wsi_screen.tiling.store import store_location

    path = runfolder.slide_dir(run, source.name) / runfolder.SLIDE_JSON
    if not path.exists() or tile_cfg.overwrite:
        return False
    try:
        done = runfolder.read_json(path)
        model = done.get("model", {})
        if model.get("sha256") != model_id["sha256"] or model.get("domain_sha256") != model_id["domain_sha256"] \
                or model.get("numeric_precision", "fp32") != model_id["numeric_precision"] \
                or done.get("source") != str(source.path):
            return False
        # the store this run reads, not the recorded one: a copied run folder's stores serve, another codec's not
        store = store_location(stores, source.name)
        if done.get("store_digest") != store_digest(store):
            return False
        current, mpp, mpp_source, mtime = call(store_is_current, source, store, tile_cfg)
        info = done.get("slide_info", {})
        if not current or info.get("mpp") != mpp or info.get("mpp_source") != mpp_source:
            return False
    except Exception:  # anything wrong with the earlier result or the slide: recompute (and report) it
        return False
    warn_if_touched(source.name, info.get("mtime"), mtime, made="its scores were made",
                    kept="the earlier scores are reused",
                    redo=f"to rescore it, delete {runfolder.slide_dir(run, source.name)} and {store} (or rerun with "
                         "`overwrite`, which re-tiles and rescores every slide)")
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
    #: "record": a slide's failure becomes its row (error and reason) and the run goes on; "raise" re-raises it
    on_error: OnError = "raise"
    aggregate: AggregateConfig | None = None
    device: str = "auto"


def screen_slide(source: SlideSource, job: SlideJob, classifier: PatchClassifier,
                 call: isolation.Caller = isolation.direct) -> SlideRow:
    """Tile, score and write one slide's folder (or reuse it); never raises for a bad slide. The slide is
    read through ``call`` (the slide reader's child process in a local run, see :mod:`wsi_screen.slide.isolation`)."""
    from wsi_screen.screening.score import check_store_matches_model, score_stores

    row = SlideRow(source.name, str(source.path))
    start = time.perf_counter()
    if _reuse(job.run, source, row, job.model_id, job.tile, job.stores, call):
        row.extra["seconds"] = {"reuse_check": round(time.perf_counter() - start, 3)}
        return row
    result = tile_isolated(call, source, job.stores, job.tile, on_error=job.on_error)
    tiled = time.perf_counter()
    opened = result.stages.get("open", 0.0)
    seconds = row.extra["seconds"] = {"open": round(opened, 3), "tile": round(tiled - start - opened, 3)}
    if result.status == "locked":  # another process is writing its store: skipped, not failed
        row.status, row.error = STATUS_BUSY, result.message
        log.warning("%s", row.error)
        return row
    if not result.ok:  # no store of this slide was made or kept (none at all when it failed before tiling)
        row.status, row.error = STATUS_ERROR, result.message or f"tiling {result.status}"
        log.error("%s", row.error)
        runlog.record_traceback(source.name, result.traceback)
        return row
    row.store = result.store
    caller_thresholds = classifier.decision_thresholds  # the slide rule's are added for this slide only
    try:
        check_store_matches_model(PatchStore.open(result.store).attrs, classifier.spec, result.store)
        classifier.decision_thresholds = tuple(sorted({*caller_thresholds,
                                                       *decision_thresholds(classifier, job.aggregate)}))
        for _location, probs, distance in score_stores([result.store], classifier, batch_size=job.batch_size,
                                                       workers=job.loader_workers, desc=source.name[:30],
                                                       read_threads=job.workers, reader=call,
                                                       # the slide this run was given: the store's fingerprint
                                                       # matched it (a coordinates-only store of a moved slide)
                                                       slides={result.store: str(source.path)}):
            scored = time.perf_counter()
            write_slide_folder(job.run, row, result.store, probs, classifier, job.model_id, job.aggregate,
                               distance=distance)
            seconds["score"] = round(scored - tiled, 3)
            seconds["outputs"] = round(time.perf_counter() - scored, 3)
    except Exception as exc:  # the per-slide boundary: one slide's failure (a disk error too) ends only it
        if job.on_error == "raise":
            raise
        if isinstance(exc, (SlideBusyError, StoreLockedError)):  # another process is writing it: skipped
            row.status, row.error = STATUS_BUSY, str(exc)
            log.warning("%s", row.error)
            return row
        row.status = STATUS_ERROR
        if isinstance(exc, OSError) and not isinstance(exc, WsiScreenError):
            row.error = str(write_failed(job.run / source.name, exc))
        else:
            row.error, trace = failure_message(source.path, exc)
            runlog.record_traceback(source.name, trace)
        log.error("%s", row.error)
    finally:
        classifier.decision_thresholds = caller_thresholds
    return row


def decision_thresholds(classifier: PatchClassifier, aggregate: AggregateConfig | None) -> tuple[float, ...]:
    """The patch probabilities at which something is decided: the model's threshold, the rule's patch and region
    thresholds (patch calls, foci, metastasis size) and, for the max rule, the slide threshold. Scoring in
    bfloat16 rescores patches near them in float32 (:meth:`PatchClassifier.score_tensor`)."""
    found = set() if classifier.spec.threshold is None else {float(classifier.spec.threshold)}
    if aggregate is not None:
        found |= {aggregate.patch_threshold, aggregate.region_threshold}
        if aggregate.rule == "max":
            found.add(aggregate.slide_threshold)
    return tuple(sorted(found))


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
        from wsi_screen.distributed import worker_ordinal
        from wsi_screen.models.device import worker_device

        classifier = _worker_classifier(model_dir, model_sha256, str(job.model_id.get("numeric_precision", "fp32")),
                                        str(worker_device(job.device, worker_ordinal())))
    except WsiScreenError as exc:
        if job.on_error == "raise":
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
    row = screen_slide(source, job, classifier)
    row.extra["device"] = device_info(classifier.device)
    return row


@lru_cache(maxsize=4)
def _worker_classifier(model_dir: str | None, sha256: str, precision: str, device: str) -> PatchClassifier:
    """The model of a Dask run, loaded once per worker process (keyed by folder, content hash, the client's
    resolved arithmetic, so every worker scores as the client would, and the worker's device)."""
    from wsi_screen.models import default_model_dir, load_model

    path = Path(model_dir) if model_dir is not None else default_model_dir()
    try:
        classifier = load_model(path, precision=precision, device=device)
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
    from wsi_screen.tiling.store import partials, store_location

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
        if row.status not in NO_RESULT and not folder.exists():
            row.status, row.error = STATUS_ERROR, (
                f"{folder.parent}: written by a Dask worker but not visible here; the run folder must be on a "
                "filesystem shared by this machine and every worker (see docs/cluster.md)")
            log.error("%s", row.error)
        return row

    names = [s.name for s in sources]
    # a Ctrl-C: a local cluster's workers die mid-slide, leaving RUN/<slide>.partial and stores' .zarr.partial folders
    with abandoned_work_removed({**runfolder.partials(job.run, names), **partials(job.stores, names)}, dask.close):
        return dask.run(screen_slide_task, calls, failed=failed, on_result=arrived, reraise=job.on_error == "raise")
