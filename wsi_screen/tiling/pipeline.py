"""Per-slide tiling: slide -> thumbnail -> tissue mask -> grid -> patches (+ stain) -> store.

:func:`tile_slide` is the unit of work (one slide, one store) and never raises for a bad slide: it returns a
:class:`TileResult` whose ``status`` says what happened, so a folder run goes on past failures and a
distributed run can ship results back. Patches are read by a pool of threads (OpenSlide and the TIFF tile
decoder release the GIL), the next shard's reads overlap the current shards' normalisation (threads, whole
shards) and writing (the store's background writers: each shard file is written whole by one of them).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_screen import __version__, progress, runlog
from wsi_screen._safe_write import abandoned_work_removed, usable_folder
from wsi_screen.errors import (
    ConfigError,
    MissingMppError,
    ResolutionError,
    SlideReaderCrashError,
    SlideTimeoutError,
    StainFitError,
    StoreLockedError,
    StoreMismatchError,
    WsiScreenError,
    check_whole,
    shown,
    speaks_api,
)
from wsi_screen.slide import isolation
from wsi_screen.slide.discovery import SlideSource
from wsi_screen.slide.slide import ReaderChoice, Slide, mpp_for, open_slide, warn_if_touched
from wsi_screen.tiling import memory
from wsi_screen.tiling.codecs import DEFAULT_CODEC, PatchCodec, refuse_pixel_settings
from wsi_screen.tiling.grid import TileSpec, make_grid, stride_l0, tile_size_l0
from wsi_screen.tiling.ondemand import split_reads
from wsi_screen.tiling.store import (
    ATTR_SETTINGS,
    SCHEMA_VERSION,
    PatchStore,
    StoreWriter,
    is_complete,
    is_url,
    local_location,
    partials,
    patches_per_shard,
    read_attrs,
    remove_store,
    store_location,
    store_lock,
    store_lock_unless_read_only,
)
from wsi_screen.tiling.tissue import LABELS, TissueMask, TissueSettings, detect_tissue

if TYPE_CHECKING:
    from wsi_screen.distributed import DaskRunner

log = logging.getLogger(__name__)

#: default resolution of the thumbnail the tissue mask is computed on (microns per pixel)
THUMBNAIL_MPP = 8.0
#: longest thumbnail side; very large slides get a proportionally coarser thumbnail
THUMBNAIL_MAX_SIDE = 8192
#: most thumbnail pixels (3072^2: 600 mm^2 of slide at 8 um/px, more than most sections). Larger slides get a
#: proportionally coarser thumbnail, so the tissue mask's memory (~12 bytes per thumbnail pixel at its peak)
#: is bounded whatever the slide's area.
THUMBNAIL_MAX_PIXELS = 3072 * 3072
#: shortest "longest side": small slides get a finer thumbnail
THUMBNAIL_MIN_SIDE = 1024
#: return freed heap memory to the system every this many shards (see wsi_screen.tiling.memory)
TRIM_EVERY = 4
#: tissue patches sampled (evenly over the grid) to fit a slide's stain parameters
STAIN_SAMPLE = 64
#: the stages of tiling one slide, timed in :attr:`TileResult.stages` (and run.json)
TILE_STAGES = ("open", "thumbnail", "tissue", "stain_fit", "patches", "commit")

Status = Literal["done", "skipped", "failed", "locked"]


@dataclass(frozen=True, kw_only=True)
class TileConfig:
    """Everything that decides what a tiling run writes (plus how many threads read)."""

    spec: TileSpec = field(default_factory=TileSpec)
    stain: str = "none"
    stain_target: str | None = None
    slide_mpp: float | None = None  # for slides that declare no resolution
    slide_mpps: tuple[tuple[str, float], ...] = ()  # per slide (name, file name or path), even over a declared one
    tissue: TissueSettings = field(default_factory=TissueSettings)
    reader: ReaderChoice = "auto"
    #: how each patch is encoded in the store (docs/store.md has the table behind the default)
    codec: PatchCodec = field(default_factory=PatchCodec)
    #: False: a coordinates-only store (no patch pixels; they are read from the slide on demand)
    pixels: bool = True
    #: reuse a complete store that differs only in how it keeps its pixels (codec, or none): infer's --stores
    any_pixels: bool = False
    workers: int = 2
    overwrite: bool = False
    #: replace a complete store made with other settings instead of refusing it (infer's own stores folder)
    retile_mismatched: bool = False
    #: the stores are not this run's own (a screening run given someone's ``stores``): a mismatching one is refused
    foreign_stores: bool = False
    #: seconds a slide may go without progress (opening it, or between shards of patches) before it fails
    slide_timeout: float = isolation.DEFAULT_TIMEOUT
    #: ``spec.mpp`` is a model's (screening): a slide coarser than it needs another model or scan, not another mpp
    model_mpp: bool = False


def with_stores_policy(config: TileConfig, *, given: bool) -> TileConfig:
    """The stores of a screening or embedding run (``infer``, ``embed``). Its own stores folder follows the
    settings: a store made with others is re-tiled, but a run that keeps no pixels reuses one that keeps them (an
    earlier run's kept patches: the same patches; a run asked to keep pixels re-tiles a coordinates-only store). A
    folder the user gave (their ``stores``) is theirs: a complete store holding the patches in any codec, or none,
    is reused, and one made with other settings is refused."""
    if given:
        return replace(config, foreign_stores=True, any_pixels=True)
    return replace(config, retile_mismatched=True, any_pixels=not config.pixels)


@dataclass(frozen=True)
class TileResult:
    """Outcome of tiling one slide."""

    name: str
    source: str
    store: str
    status: Status
    n_patches: int = 0
    seconds: float = 0.0
    message: str = ""
    #: the full traceback of an unexpected failure (for the run log, never the terminal)
    traceback: str = ""
    #: seconds by stage: open, thumbnail, tissue, stain_fit, patches, commit (only open for a store kept)
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")


#: what a refused mismatching store's message says to do, by whether the stores are foreign (see TileConfig)
_MISMATCH_FIX = {False: "set `overwrite` to replace it",
                 True: "this run does not replace stores it did not make: tile this slide again with this run's "
                       "settings and `overwrite`, or leave out `stores`"}


def thumbnail_mpp(slide_mpp: float, dimensions: tuple[int, int]) -> float:
    """Resolution of the thumbnail (and tissue mask): a function of the slide's size and mpp only.

    8 um/px for ordinary slides; finer for small ones so the thumbnail keeps at least
    :data:`THUMBNAIL_MIN_SIDE` pixels (it is the heatmap's background); coarser for huge ones so it stays
    under :data:`THUMBNAIL_MAX_SIDE` on its longest side and :data:`THUMBNAIL_MAX_PIXELS` in area; never finer
    than level 0.
    """
    longest_um = max(dimensions) * slide_mpp
    area_um2 = float(dimensions[0]) * float(dimensions[1]) * slide_mpp * slide_mpp
    return max(slide_mpp, min(THUMBNAIL_MPP, longest_um / THUMBNAIL_MIN_SIDE), longest_um / THUMBNAIL_MAX_SIDE,
               math.sqrt(area_um2 / THUMBNAIL_MAX_PIXELS))


def expected_settings(slide: Slide, config: TileConfig, thumb_mpp: float) -> dict[str, Any]:
    """What a store must have been made with to be reused for this slide and configuration."""
    stain: dict[str, Any] = {"method": config.stain}
    if config.stain != "none":
        from wsi_screen.tiling.stain import target_params  # cached by method and file hash

        stain["target_sha256"] = target_params(config.stain, config.stain_target)[1].get("sha256")
    settings = {
        "schema_version": SCHEMA_VERSION,
        "slide_fingerprint": slide.info.fingerprint,
        "slide_mpp": slide.mpp,
        "reader": slide.reader_name,
        "mpp": config.spec.mpp,
        "patch_size": config.spec.size_px,
        "overlap_px": config.spec.overlap_px,
        "min_tissue": config.spec.min_tissue,
        "thumbnail_mpp": thumb_mpp,
        "tissue": config.tissue.to_json(),
        "stain": stain,
        "pixels": "store" if config.pixels else "none",
        "codec": config.codec.to_json() if config.pixels else None,
    }
    return json.loads(json.dumps(settings))  # tuples -> lists, as stored


#: the settings that say how a store keeps its pixels, not which patches it holds
PIXEL_SETTINGS = ("pixels", "codec")


def _compared(settings: dict[str, Any], config: TileConfig) -> dict[str, Any]:
    """The settings that must match (with ``config.any_pixels``: all but :data:`PIXEL_SETTINGS`, so a store of any
    codec, or a coordinates-only one, holds the same patches)."""
    return {k: v for k, v in settings.items() if k not in PIXEL_SETTINGS} if config.any_pixels else settings


def settings_match(existing: Any, expected: dict[str, Any], config: TileConfig) -> bool:
    """Whether a store's recorded settings are ``expected`` (see :func:`_compared`)."""
    return isinstance(existing, dict) and _compared(existing, config) == _compared(expected, config)


def _differences(old: dict[str, Any], new: dict[str, Any], config: TileConfig, prefix: str = "") -> list[str]:
    """What differs between a store's settings and ``new``, as ``key old -> new`` (``stain.method 'macenko' ->
    'none'``), leaving out what need not match (:func:`_compared`) and, within a setting, what ``new`` does not
    ask for (the stain target of a run without stain normalisation) unless nothing else differs."""
    old, new = (_compared(old, config), _compared(new, config)) if not prefix else (old, new)
    out: list[tuple[bool, str]] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend((True, d) for d in _differences(a, b, config, f"{prefix}{k}."))
        else:
            a_text, b_text = _shown(a), _shown(b)
            if a_text == b_text:  # 4 significant digits hide the difference: show it whole
                a_text, b_text = repr(a), repr(b)
            out.append((k in new or not prefix, f"{prefix}{k} {a_text} -> {b_text}"))
    return [d for asked, d in out if asked] or [d for _, d in out]


def _shown(value: Any) -> str:
    """A setting's value as :func:`_differences` writes it: numbers to 4 significant digits (a thumbnail's
    1.3016601562499999 um/px reads 1.302), anything else as Python writes it."""
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def _open(source: SlideSource, config: TileConfig) -> Slide:
    """The slide as this configuration reads it (resolution from the file, the per-slide table or the
    fallback; see :class:`~wsi_screen.slide.slide.Slide`)."""
    forced = mpp_for(dict(config.slide_mpps), source.path, source.name)
    return Slide(source.path, name=source.name, mpp=config.slide_mpp, reader=config.reader, force_mpp=forced)


def store_is_current(source: SlideSource, location: str, config: TileConfig) -> tuple[bool, float, str, float]:
    """Whether the complete store at ``location`` is what tiling ``source`` with ``config`` would write now
    (same slide file by its fingerprint, resolution and settings), and the slide's current (mpp, mpp source,
    modification time)."""
    with _open(source, config) as slide:
        settings = expected_settings(slide, config, thumbnail_mpp(slide.mpp, slide.dimensions))
        existing = read_attrs(location)
        ok = existing is not None and is_complete(existing) and settings_match(existing.get(ATTR_SETTINGS),
                                                                               settings, config)
        return ok, slide.mpp, slide.mpp_source, slide.info.mtime


OnError = Literal["raise", "record"]


def tile_slide(source: SlideSource, out: str, config: TileConfig, *, on_error: OnError = "raise") -> TileResult:
    """Tile one slide into ``out/<name>.zarr``.

    ``on_error="raise"`` (the library's default) raises whatever stops the slide; ``"record"`` (the policy of
    the commands that loop over slides) returns it as a :class:`TileResult` with ``status`` "failed" or
    "locked" and its message, so the run goes on.
    """
    if on_error not in ("raise", "record"):
        raise ConfigError(f"`on_error` must be 'raise' or 'record', got {on_error!r}")
    start = time.perf_counter()
    location = store_location(out, source.name)
    try:
        # a read-only folder's complete, current store is used as it is, without the lock
        with store_lock_unless_read_only(
                location, lambda: not config.overwrite and store_is_current(source, location, config)[0]):
            return _tile_locked(source, location, config, start)
    except StoreLockedError as exc:
        if on_error == "raise":
            raise
        return TileResult(source.name, str(source.path), location, "locked", message=str(exc))
    except Exception as exc:  # the per-slide boundary: whatever one slide raises fails that slide only
        if on_error == "raise":
            raise
        message, trace = failure_message(source.path, exc)
        return TileResult(source.name, str(source.path), location, "failed",
                          seconds=time.perf_counter() - start, message=message, traceback=trace)


def failure_message(path: Path | str, exc: BaseException) -> tuple[str, str]:
    """One line for a slide's failure, and (for an unexpected error, a bug or a library's surprise) the full
    traceback for the run log. Errors raised on purpose already name the file and the cause."""
    if isinstance(exc, (SlideReaderCrashError, SlideTimeoutError)):  # raised by the supervisor, which knows no file
        return f"{path}: {exc}", ""
    if isinstance(exc, WsiScreenError):
        return str(exc), ""
    msg = " ".join(str(exc).split()) or "no message"
    trace = "".join(traceback.format_exception(exc))
    return f"{path}: unexpected {type(exc).__name__} while reading it: {msg} (traceback in {runlog.LOG_NAME})", trace


def _tile_locked(source: SlideSource, location: str, config: TileConfig, start: float,
                 slide: Slide | None = None) -> TileResult:
    """Tile ``source`` (opened here, or the caller's open ``slide``) into the store at ``location``, locked by the
    caller; raises on failure."""
    spec = config.spec
    with _open(source, config) if slide is None else contextlib.nullcontext(slide) as slide:
        isolation.heartbeat("opened")
        thumb_mpp = thumbnail_mpp(slide.mpp, slide.dimensions)
        settings = expected_settings(slide, config, thumb_mpp)
        existing = read_attrs(location)
        if existing is not None and is_complete(existing) and not config.overwrite:
            if settings_match(existing.get(ATTR_SETTINGS), settings, config):
                log.debug("%s: store is complete and up to date; skipped", source.name)
                earlier = existing.get("slide")
                recorded = earlier.get("mtime") if isinstance(earlier, dict) else None
                warn_if_touched(source.name, recorded, slide.info.mtime,
                                made="its store was made", kept="the store is reused",
                                redo=f"to re-tile it, delete {location} (or rerun with `overwrite`)")
                seconds = time.perf_counter() - start
                return TileResult(source.name, str(source.path), location, "skipped",
                                  n_patches=int(existing.get("n_patches", 0)), seconds=seconds,
                                  message="up to date", stages={"open": round(seconds, 3)})
            diff = _differences(existing.get(ATTR_SETTINGS) or {}, settings, config)
            if not config.retile_mismatched:
                fix = _MISMATCH_FIX[config.foreign_stores]
                raise StoreMismatchError(f"{location}: existing store was made from another slide version or "
                                         f"with other settings ({'; '.join(diff)}); {fix}")
            log.info("%s: store made from another slide version or with other settings (%s); re-tiling",
                     source.name, "; ".join(diff))

        tile_l0 = tile_size_l0(spec.mpp, spec.size_px, slide.mpp, name=str(source.path), model_mpp=config.model_mpp)
        if min(slide.dimensions) < tile_l0:  # not "no tissue": there is no room for one patch, whatever it shows
            raise ResolutionError(f"{source.path}: the slide is {slide.dimensions[0]} x {slide.dimensions[1]} px, "
                                  f"smaller than one patch ({tile_l0} level-0 px for {spec.size_px} px at "
                                  f"{spec.mpp:g} um/px): nothing can be tiled from it")
        stride = stride_l0(tile_l0, spec.size_px, spec.overlap_px)
        t_open = time.perf_counter()
        thumb = slide.thumbnail(thumb_mpp, workers=config.workers)
        memory.trim()  # the block reads' freed buffers, before the mask's working memory is taken
        isolation.heartbeat("thumbnail")
        t_thumb = time.perf_counter()
        mask = detect_tissue(thumb, thumb_mpp, config.tissue, workers=config.workers)
        isolation.heartbeat("tissue")
        grid = make_grid(mask.tissue, slide.dimensions, tile_l0, stride, spec.min_tissue)
        n = len(grid)
        log.debug("%s: %d x %d px at %.4g um/px, %d patches of %d px (%d level-0 px)", source.name,
                  *slide.dimensions, slide.mpp, n, spec.size_px, tile_l0)
        if n == 0:
            # not "writing": a store in memory (the API's) is written nowhere a person would look
            log.warning("%s: no tissue found (min tissue %.2f); the store holds no patches", source.name,
                        spec.min_tissue)

        t_mask = time.perf_counter()
        normalize, stain_attrs = _stain_for_slide(slide, grid.coords, grid.tissue, tile_l0, config)
        attrs = {
            "mpp": spec.mpp,
            "effective_mpp": tile_l0 * slide.mpp / spec.size_px,
            "patch_size": spec.size_px,
            "tile_size_l0": tile_l0,
            "stride_l0": stride,
            "overlap_px": spec.overlap_px,
            "n_patches": n,
            "slide": slide.info.to_json(),
            "stain": stain_attrs,
            "tissue": {"settings": config.tissue.to_json(), "thumbnail_mpp": thumb_mpp,
                       "min_tissue": spec.min_tissue, "labels": LABELS,
                       "tissue_fraction": mask.tissue_fraction},
            "grid": {"columns": grid.shape[1], "rows": grid.shape[0], "origin_l0": [0, 0]},
            "package_version": __version__,
            "reader_choice": config.reader,
            ATTR_SETTINGS: settings,
        }
        writer = StoreWriter(location, n_patches=n, patch_size=spec.size_px, thumbnail_shape=thumb.shape[:2],
                             attrs=attrs, codec=config.codec, pixels=config.pixels)
        try:
            writer.write_images(thumbnail=thumb, mask=mask.labels)
            del thumb, mask  # written: nothing proportional to the slide's area is held while patches stream
            memory.trim()  # and the mask's freed working memory goes back to the system before they do
            stain_ok: np.ndarray | None = np.zeros(n, dtype=bool) if config.pixels else None
            t_read = time.perf_counter()
            with progress.bar(total=n if config.pixels else 0, desc=source.name[:30], unit="patch",
                              leave=False, disable=not config.pixels) as bar:  # no pixels: nothing to show
                batches = read_patches(slide, grid.coords if config.pixels else grid.coords[:0], tile_l0,
                                       spec.size_px, config.workers)
                for i, (first, batch, ok) in enumerate(normalised(batches, normalize, config.workers)):
                    if ok is not None and stain_ok is not None:
                        stain_ok[first:first + len(batch)] = ok
                    writer.write_patches(first, batch)
                    bar.update(len(batch))
                    isolation.heartbeat("patches")
                    if i % TRIM_EVERY == 0:
                        memory.trim()  # keeps resident memory flat however long the slide streams
            writer.write_arrays(coords=grid.coords, tissue=grid.tissue, stain_ok=stain_ok)
            t_write = time.perf_counter()
            writer.commit()
            marks = [start, t_open, t_thumb, t_mask, t_read, t_write, time.perf_counter()]
            stages = {name: round(b - a, 3) for name, a, b in zip(TILE_STAGES, marks, marks[1:], strict=False)}
            log.debug("%s: seconds: %s", source.name, ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        except BaseException:
            writer.abort()
            raise
    return TileResult(source.name, str(source.path), location, "done", n_patches=n,
                      seconds=time.perf_counter() - start, stages=stages)


NormalizeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _stain_for_slide(slide: Slide, coords: np.ndarray, tissue: np.ndarray, tile_l0: int,
                     config: TileConfig) -> tuple[NormalizeFn | None, dict[str, Any]]:
    """Fit the slide's stain on an even sample of its tissue patches; a normaliser or None."""
    if config.stain == "none":
        return None, {"method": "none"}
    from wsi_screen.tiling import stain

    target, target_desc = stain.target_params(config.stain, config.stain_target)
    if len(coords) == 0:
        return None, {"method": config.stain, "fitted": False, "reason": "no tissue patches",
                      "target_image": target_desc}
    order = np.argsort(-tissue, kind="stable")[: max(STAIN_SAMPLE * 4, 1)]  # the most tissue-rich
    pick = np.sort(order[np.linspace(0, len(order) - 1, min(STAIN_SAMPLE, len(order))).astype(int)])
    sample = np.stack([slide.read((int(x), int(y)), tile_l0, config.spec.size_px) for x, y in coords[pick]])
    try:
        source = stain.fit(sample, config.stain)
    except StainFitError as exc:
        log.warning("%s: stain not normalised: %s", slide.name, exc)
        return None, {"method": config.stain, "fitted": False, "reason": str(exc), "target_image": target_desc}
    normalizer = stain.Normalizer(source, target)
    return normalizer.apply, {"method": config.stain, "fitted": True, "sample_size": len(pick),
                              **normalizer.to_json(), "target_image": target_desc}


def normalised(batches: Iterator[tuple[int, np.ndarray]], normalize: NormalizeFn | None,
               workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """``(first, batch, stain ok or None)`` in order, normalising up to ``workers`` batches at once.

    Each batch is normalised whole, exactly as one call would (so the bytes do not depend on ``workers``);
    numpy releases the GIL in the pixel maths, so shards normalise in parallel with reading and writing.
    """
    if normalize is None:
        for first, batch in batches:
            yield first, batch, None
        return
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="stain") as pool:
        pending: collections.deque[tuple[int, Future[tuple[np.ndarray, np.ndarray]]]] = collections.deque()
        try:
            for first, batch in batches:
                pending.append((first, pool.submit(normalize, batch)))
                while len(pending) > max(1, workers):
                    done_first, done = pending.popleft()
                    yield done_first, *done.result()
            while pending:
                done_first, done = pending.popleft()
                yield done_first, *done.result()
        finally:
            for _, future in pending:
                future.cancel()


def read_patches(slide: Slide, coords: np.ndarray, tile_l0: int, size_px: int,
                 workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first index, uint8 batch)`` shard by shard, reading the next shard while one is used.

    Each shard is split into one contiguous run of patches per reader thread; a reader copies its patches
    straight into the shard's array (neighbouring patches share JPEG tiles, which the reader caches).
    """
    n = len(coords)
    shard = patches_per_shard(size_px)
    starts = list(range(0, n, shard))
    if not starts:
        return
    workers = max(1, workers)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
        def submit(first: int) -> tuple[np.ndarray, list[Future[None]]]:
            xy = coords[first:first + shard]
            out = np.empty((len(xy), size_px, size_px, 3), dtype=np.uint8)
            return out, split_reads(pool, slide, xy, tile_l0, size_px, out, workers)

        pending = submit(starts[0])
        try:
            for i, first in enumerate(starts):
                out, futures = pending
                pending = submit(starts[i + 1]) if i + 1 < len(starts) else (out[:0], [])
                for f in futures:
                    f.result()
                yield first, out
        finally:
            for f in pending[1]:
                f.cancel()


def tile_slides(sources: Sequence[SlideSource], out: str | Path, config: TileConfig, *,
                on_error: OnError = "raise", dask: DaskRunner | None = None) -> list[TileResult]:
    """Tile slides one after another here (each with ``config.workers`` reader threads), or with ``dask``
    (see :mod:`wsi_screen.distributed`) one task per slide on a Dask cluster, whose workers open the slides
    by path and write the stores to ``out`` themselves. Same stores, same results, in ``sources`` order.

    ``out`` is a folder, a ``file://`` URL (treated as the folder) or an fsspec URL that zarr can write.
    ``on_error`` as for :func:`tile_slide`; ``"record"`` also reads each slide in the supervised child process
    (:mod:`wsi_screen.slide.isolation`), so a reader that crashes or hangs fails its slide only.
    """
    out_str = make_output(out, absolute=dask is not None)
    if dask is not None:
        return _tile_on_dask(dask, sources, out_str, output_location(out), config, on_error=on_error)
    results: list[TileResult] = []
    with isolation.slide_calls(config.slide_timeout, isolate=on_error == "record", preload=(__name__,)) as call, \
            progress.bar(total=len(sources), desc="slides", unit="slide") as bar:
        for source in sources:
            result = tile_isolated(call, source, out_str, config, on_error=on_error)
            results.append(_report(result))
            bar.update(1)
    return results


def tile_isolated(call: isolation.Caller, source: SlideSource, out: str, config: TileConfig, *,
                  on_error: OnError = "raise") -> TileResult:
    """:func:`tile_slide` through ``call`` (the slide reader's child process, see :mod:`wsi_screen.slide.isolation`):
    a crash or hang of the reader fails this slide only."""
    try:
        return call(tile_slide, source, out, config, on_error=on_error)
    except (SlideReaderCrashError, SlideTimeoutError) as exc:
        if on_error == "raise":
            raise
        return TileResult(source.name, str(source.path), store_location(out, source.name), "failed",
                          message=failure_message(source.path, exc)[0])


def _report(result: TileResult) -> TileResult:
    """Log a slide's failure (or busy store) on one line, as it comes in; its traceback to the run log."""
    if result.status == "failed":
        log.error("%s", result.message)
        runlog.record_traceback(result.name, result.traceback)
    elif result.status == "locked":
        log.warning("%s", result.message)
    return result


def make_output(out: str | Path, *, absolute: bool = False) -> str:
    """:func:`output_location`, with the folder created when it is local."""
    out_str = output_location(out, absolute=absolute)
    if not is_url(out_str):
        usable_folder(out_str)
    return out_str


def output_location(out: str | Path, *, absolute: bool = False) -> str:
    """``out`` as tile_slide takes it: ``file://`` URLs become folders; ``absolute`` for Dask workers,
    whose working directory is not the client's (``memory://`` is refused there: it lives in one process)."""
    text = local_location(out)
    if is_url(text):
        if absolute and text.startswith("memory://"):
            raise ConfigError(f"{text}: memory:// stores live inside one process and cannot be shared with Dask "
                              "workers; use a shared folder or an object-store URL (s3://, gs://, ...)")
        return text
    return str(Path(text).absolute()) if absolute else text


def worker_config(config: TileConfig) -> TileConfig:
    """``config`` with an absolute ``stain_target`` path, for workers (the store records the resolved path
    and the file's hash either way, so the stores are the same)."""
    if config.stain_target is None or is_url(config.stain_target):
        return config
    return replace(config, stain_target=str(Path(config.stain_target).expanduser().absolute()))


def _tile_on_dask(dask: DaskRunner, sources: Sequence[SlideSource], out: str, given_out: str, config: TileConfig,
                  *, on_error: OnError) -> list[TileResult]:
    """One ``tile_slide`` task per slide (absolute paths: workers run elsewhere); the results spell the paths
    as the caller gave them (``given_out``), like a local run's."""
    from wsi_screen.distributed import Call, task_key

    config = worker_config(config)
    remote = [SlideSource(s.path.absolute(), s.name) for s in sources]
    calls = [Call(task_key("tile", s.name, s, out, config), (s, out, config), {"on_error": on_error}) for s in remote]

    def failed(i: int, reason: str) -> TileResult:
        s = sources[i]
        return TileResult(s.name, str(s.path), store_location(given_out, s.name), "failed",
                          message=f"{s.path}: {reason}")

    def arrived(i: int, result: TileResult) -> TileResult:
        if result.status == "done" and not is_url(result.store) and not Path(result.store).exists():
            result = replace(result, status="failed", message=(
                f"{result.store}: written by a Dask worker but not visible here; the output folder must be on a "
                "filesystem shared by this machine and every worker (see docs/cluster.md)"))
        s = sources[i]
        return _report(replace(result, source=str(s.path), store=store_location(given_out, s.name)))

    # a Ctrl-C: a local cluster's workers die mid-slide, leaving .zarr.partial folders
    with abandoned_work_removed(partials(out, [s.name for s in sources]), dask.close):
        return dask.run(tile_slide, calls, failed=failed, on_result=arrived, reraise=on_error == "raise")


# ------------------------------------------------------------------------------------------- the public verbs
@speaks_api
def tissue_mask(slide: Slide | str | os.PathLike[str], *, mpp: float | None = None,
                settings: TissueSettings | Mapping[str, Any] | None = None, workers: int = 2) -> TissueMask:
    """Where the tissue is: glass, tissue, pen and artifact labels on a thumbnail of ``slide``.

    Parameters
    ----------
    slide
        An open slide (:func:`wsi_screen.open_slide`), or a slide's path, opened (and closed) here as :func:`tile`
        opens it.
    mpp
        Microns per pixel of the mask; by default the resolution the tiler uses (:func:`thumbnail_mpp`:
        8 um/px for ordinary slides, finer for small ones). A positive number (``ConfigError`` otherwise); one
        finer than the slide's level 0 is clamped to level 0's (warned of once per slide; ``mask.mpp`` says).
    settings
        Thresholds of the detector: a :class:`~wsi_screen.tiling.tissue.TissueSettings`, or a dict of some of its
        fields (``{"min_od": 0.15}``; the others keep their defaults); its defaults by default.
    workers
        Threads reading the thumbnail and computing the mask, at least 1 (the result does not depend on them).

    Returns
    -------
    TissueMask
        ``labels`` (uint8 (h, w): 0 glass, 1 tissue, 2 pen, 3 artifact), ``tissue`` (bool (h, w)),
        ``tissue_fraction`` and ``mpp``. ``slide.thumbnail(mask.mpp)`` is the picture it was computed on.

    Examples
    --------
    >>> import wsi_screen
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     mask = wsi_screen.tissue_mask(slide)
    >>> mask.labels.shape, round(mask.tissue_fraction, 2)
    ((1024, 766), 0.38)
    """
    workers = check_whole(workers, "workers", at_least=1)
    tissue = TissueSettings.of(settings)
    with _opened(slide, "tissue_mask", "the mask's") as opened:
        thumb_mpp = thumbnail_mpp(opened.mpp, opened.dimensions) if mpp is None \
            else opened.clamp_mpp(mpp, what="a tissue mask")
        return detect_tissue(opened.thumbnail(thumb_mpp, workers=workers), thumb_mpp, tissue, workers=workers)


@contextlib.contextmanager
def _opened(slide: Slide | str | os.PathLike[str], verb: str, whose: str) -> Iterator[Slide]:
    """``slide`` if it is an open Slide; a slide's path opened as ``open_slide(path)`` opens it (and closed after);
    a ConfigError naming ``verb`` otherwise. ``whose`` the verb's own ``mpp`` is, for a slide that declares no
    resolution (that ``mpp`` is not the slide's)."""
    if isinstance(slide, Slide):
        yield slide
        return
    if not isinstance(slide, str | os.PathLike):
        raise ConfigError(f"`{verb}` takes an open Slide or a slide's path, not {shown(slide)}")
    try:
        opened = open_slide(slide)
    except MissingMppError as exc:
        if "force_mpp" in str(exc):  # a declared resolution to replace: the message says how
            raise
        raise MissingMppError(f"{exc}; `{verb}`'s own `mpp` is {whose} resolution: pass `{verb}` the slide opened "
                              "with `wsi_screen.open_slide(path, mpp=...)`") from exc
    with opened:
        yield opened


@speaks_api
def tile(slide: Slide | str | os.PathLike[str], out: str | Path | None = None, *, mpp: float, size: int,
         stain: str = "none", stain_target: str | None = None, overlap: int = 0, min_tissue: float = 0.5,
         tissue: TissueSettings | Mapping[str, Any] | None = None, workers: int = 2, overwrite: bool = False,
         codec: str | None = None, quality: int | None = None, pixels: bool = True) -> PatchStore:
    """Cut the tissue of ``slide`` into square patches of ``size`` pixels at ``mpp`` microns per pixel.

    Parameters
    ----------
    slide
        An open slide (:func:`wsi_screen.open_slide`), or a slide's path, opened (and closed) here as
        ``open_slide(path)`` opens it (a slide that declares no resolution: pass it opened with ``mpp``).
    out
        A folder (the store is ``out/<slide name>.zarr``, reused when it is complete and made with the same
        settings) or an fsspec URL; ``None`` keeps the store in memory (freed with the returned object).
    mpp, size
        Resolution (microns per pixel) and side (pixels) of the patches.
    stain
        Stain normalisation: ``"none"``, ``"macenko"``, ``"vahadane"`` or ``"reinhard"``, towards
        ``stain_target`` (an image; the bundled reference by default). For a model: its ``spec.stain_method``
        and ``spec.stain_target``.
    overlap
        Pixels shared by neighbouring patches.
    min_tissue
        Least fraction of a patch's footprint that must be tissue (see :func:`tissue_mask`).
    tissue
        Tissue detector settings, a ``TissueSettings`` or a dict of some of its fields (see :func:`tissue_mask`).
    workers
        Reader threads, at least 1.
    overwrite
        Replace a complete store at ``out`` instead of reusing or refusing it.
    codec, quality
        How patches are kept (see docs/store.md): ``"jpeg"``, ``"jpegxl"`` or ``"lz4"``; default lz4 for a store
        in memory (the slide's exact pixels), ``tile``'s default (jpeg, quality 90: lossy, a fifth of lz4's
        bytes) for a store on disk. Scores from JPEG patches differ from scores from the slide (enough to change a
        slide's domain flag or a call near the threshold); pass
        ``codec="lz4"`` for an on-disk store that scores exactly as the slide does. A ``quality`` is for the lossy
        codecs; lz4's is a ``ConfigError``.
    pixels
        ``False``: a coordinates-only store, as the ``tile`` command writes with its ``pixels`` option set to
        none: coordinates, tissue, thumbnail, mask, stain fit and settings, no patch pixels; reading a patch reads
        it from the slide (which must stay where it is), so its patches are the slide's exact pixels
        (``store.close()`` closes the slide). ``codec`` or ``quality`` given with it is a ``ConfigError``, as
        the ``tile`` command refuses its codec and quality options for a coordinates-only store.

    Returns
    -------
    PatchStore
        The patches (a sequence of (size, size, 3) uint8 arrays), their level-0 ``coords``, the thumbnail
        and the tissue mask.

    Raises
    ------
    WsiScreenError
        Whatever stops the slide (unreadable pixels, a resolution finer than the scan, a store made with
        other settings at ``out``, ...). Commands that loop over slides record failures instead
        (:func:`tile_slide` with ``on_error="record"``).

    Examples
    --------
    >>> import wsi_screen
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     store = wsi_screen.tile(slide, mpp=2.0, size=64)
    >>> len(store), store[0].shape
    (34, (64, 64, 3))
    """
    if not isinstance(pixels, bool):
        raise ConfigError(f"`pixels` is True (the patches are kept) or False (coordinates only), not {pixels!r}")
    if not pixels:  # as the tile command refuses --codec / --quality with --pixels none
        refuse_pixel_settings([name for name, value in (("codec", codec), ("quality", quality)) if value is not None])
    config = TileConfig(spec=TileSpec(mpp=mpp, size_px=size, overlap_px=overlap, min_tissue=min_tissue),
                        stain=stain, stain_target=stain_target, tissue=TissueSettings.of(tissue),
                        workers=check_whole(workers, "workers", at_least=1),
                        overwrite=overwrite, pixels=pixels,
                        codec=PatchCodec(codec or ("lz4" if out is None else DEFAULT_CODEC), quality))
    with _opened(slide, "tile", "the patches'") as opened:
        return tile_with(opened, out, config)


def tile_with(slide: Slide, out: str | Path | None, config: TileConfig) -> PatchStore:
    """:func:`tile` with a :class:`TileConfig` (how ``infer`` tiles for its model); raises on failure."""
    import uuid
    import weakref

    slide.check_open()  # a complete store would be reused without reading it; a closed slide is a mistake still
    in_memory = out is None
    location = store_location(f"memory://wsi-screen/{uuid.uuid4().hex}" if out is None else make_output(out),
                              slide.name)
    try:
        with store_lock(location):
            _tile_locked(SlideSource(slide.path, slide.name), location, config, time.perf_counter(), slide)
    except BaseException:
        if in_memory:  # an unfinished store in memory would stay there for the life of the process
            remove_store(location)
        raise
    store = PatchStore.open(location)
    if in_memory:
        weakref.finalize(store, remove_store, location)
    return store
