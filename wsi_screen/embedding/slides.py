"""``wsi-screen embed``: slides or patch stores -> one feature store per slide.

Slides are tiled exactly as ``tile`` does (the same pipeline, into ``OUT/stores`` or ``stores_dir``, reusing stores
made with the same settings) at the encoder's mpp and input size unless the user says otherwise; patch stores
given directly are embedded as they are when their mpp and patch size are those asked for. The command writes
coordinates-only stores, as ``infer`` does (``TileConfig(pixels=True)``: lz4 pixel stores, the same bytes).
Patches stream from the store, or from the slide in the slide reader's child process, through the scorer's
loader (:mod:`wsi_screen.screening.score`: contiguous batches read ahead in a thread) into the encoder.

Per slide, as ``tile`` and ``infer`` do: a complete feature store made with the same settings (encoder identity,
dtype, the patch store's settings) is skipped; one made otherwise is refused, naming what differs, unless
``overwrite`` (it may be GPU-hours of a foundation encoder); a slide that fails becomes one line and the run goes
on. A feature store is written under the lock a patch store's writer takes
(:func:`~wsi_screen.tiling.store.store_lock`): a slide whose feature store or patch store another process is
writing is skipped as ``busy`` (a warning, not a failure: that process writes the same store), and where the lock
cannot be taken because its folder cannot be written, a complete, current one is reused without it, as a patch
store is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen import __version__, progress, runlog
from wsi_screen._safe_write import usable_folder
from wsi_screen.embedding.features import (
    ATTR_COMPLETE,
    ATTR_SETTINGS,
    feature_store_path,
    is_current,
    read_attrs,
    write_feature_store,
)
from wsi_screen.errors import ConfigError, ModelMismatchError, RunError, StoreLockedError
from wsi_screen.models.encoder import Encoder
from wsi_screen.slide import isolation
from wsi_screen.slide.discovery import DiscoveryProblem, SlideSource, discover, nothing_found
from wsi_screen.tiling.pipeline import OnError, TileConfig, failure_message, tile_isolated
from wsi_screen.tiling.store import PatchStore, is_url, local_location, store_lock_unless_read_only
from wsi_screen.tiling.store import read_attrs as read_store_attrs

log = logging.getLogger(__name__)

STORES_DIR = "stores"
#: relative mpp difference tolerated between a given patch store and the embedding's mpp
MPP_RTOL = 0.02


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Settings of an embedding run (the encoder comes separately)."""

    mpp: float
    size: int
    dtype: str = "float16"
    batch_size: int = 128
    loader_workers: int = 0
    overwrite: bool = False


@dataclass
class EmbedResult:
    """One slide's outcome: ``done``, ``skipped`` (up to date), ``busy`` (another process is writing its patch or
    feature store: skipped, not failed) or ``failed`` (``message`` says why)."""

    name: str
    source: str
    status: str
    out: str = ""
    n_patches: int = 0
    message: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def split_inputs(inputs: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, location) of the patch stores among ``inputs`` (a store, or a folder holding stores and no slides),
    and the remaining inputs (slides and folders of slides)."""
    stores: list[tuple[str, str]] = []
    rest: list[str] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and read_store_attrs(p) is not None:
            stores.append((p.name.removesuffix(".zarr"), str(p)))
            continue
        inner = sorted(c for c in p.iterdir() if c.suffix == ".zarr" and read_store_attrs(c) is not None) \
            if p.is_dir() else []
        if inner and not discover([p])[0]:
            stores.extend((c.name.removesuffix(".zarr"), str(c)) for c in inner)
        else:
            rest.append(raw)
    return stores, rest


def settings_for(encoder: Encoder, config: EmbedConfig, store_attrs: dict[str, Any]) -> dict[str, Any]:
    """What a feature store must have been made with to be reused."""
    digest = hashlib.sha256(json.dumps(store_attrs.get("settings", {}), sort_keys=True).encode()).hexdigest()
    i = encoder.identity
    return {"encoder": {"ref": i.ref, "weights_sha256": i.weights_sha256, "pooling": i.pooling,
                        "input_size": i.input_size, "mean": list(i.mean), "std": list(i.std)},
            "precision": encoder.precision, "dtype": config.dtype, "patch_store_settings": digest}


def made_otherwise(target: Path, settings: dict[str, Any], patches: tuple[int, float]) -> list[str]:
    """What differs between the complete embeddings at ``target`` and these ``settings`` (of :func:`settings_for`;
    ``patch_store_settings`` is never compared: other tiling settings of the same encoder, patch size and mpp
    (another ``min_tissue``, patches kept) make the embeddings afresh, as before) for patches of ``patches`` (px,
    um/px): ``encoder default, now hf-hub:org/name``, ``patches 96 px at 0.972 um/px, now ...``; empty where there
    are none there, or only the tiling settings differ."""
    attrs = read_attrs(target)
    if not attrs or attrs.get(ATTR_COMPLETE) is not True or attrs.get(ATTR_SETTINGS) == settings:
        return []
    before: dict[str, Any] = attrs.get(ATTR_SETTINGS) or {}
    changed: list[str] = []
    for key in sorted((set(before) | set(settings)) - {"patch_store_settings"}):
        old, new = before.get(key), settings.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and old.get("ref") != new.get("ref"):
            changed.append(f"{key} {old.get('ref')}, now {new.get('ref')}")  # another encoder: its details follow
        elif isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{k} {old.get(k)}, now {new.get(k)}" for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(f"{key} {old}, now {new}")
    size, mpp = attrs.get("size"), attrs.get("mpp")
    mpp = float(mpp) if isinstance(mpp, (int, float)) else math.nan
    if size != patches[0] or not math.isclose(mpp, patches[1], rel_tol=MPP_RTOL):
        changed.append(f"patches {size} px at {mpp:g} um/px, now {patches[0]} px at {patches[1]:g} um/px")
    return changed


def kept(target: Path, changed: list[str]) -> ConfigError:
    """The refusal to replace embeddings made otherwise (a foundation encoder's are GPU-hours)."""
    return ConfigError(f"{target}: holds embeddings made otherwise ({'; '.join(changed)}); set `overwrite` to "
                       "replace them, or embed into another output folder")


def check_store(attrs: dict[str, Any], config: EmbedConfig, location: str) -> None:
    """Refuse a patch store at another resolution or patch size than asked for."""
    mpp, size = float(attrs.get("mpp", math.nan)), int(attrs.get("patch_size", -1))
    if not math.isclose(mpp, config.mpp, rel_tol=MPP_RTOL) or size != config.size:
        raise ModelMismatchError(f"{location}: patches of {size} px at {mpp:g} um/px, not {config.size} px at "
                                 f"{config.mpp:g}; embed the slide instead, or set `mpp`={mpp:g} `size`={size} to "
                                 "embed this store as it is")


def embed_store(name: str, source: str, location: str, out: Path, encoder: Encoder,
                config: EmbedConfig, reader: isolation.Caller | None = None, slide: str | None = None) -> EmbedResult:
    """Embed one patch store into ``OUT/<name>.zarr`` (or skip it when up to date); ``reader`` runs the slide
    reads of a coordinates-only store (the slide reader's child, see :mod:`wsi_screen.screening.score`), from
    ``slide`` when given (a slide tiled into, or matched with, that store: it may have moved since)."""
    from wsi_screen.screening.score import plan_batches, stream_batches

    started = time.perf_counter()
    store = PatchStore.open(location)
    check_store(store.attrs, config, location)
    settings = settings_for(encoder, config, store.attrs)
    target = feature_store_path(out, name)
    # as a patch store is: one writer at a time (one another process is writing fails this slide); a read-only
    # folder's complete, current embeddings are read as they are
    with store_lock_unless_read_only(target, lambda: not config.overwrite and is_current(target, settings)):
        if not config.overwrite and is_current(target, settings):
            log.debug("%s: embeddings up to date", name)
            return EmbedResult(name, source, "skipped", str(target), len(store))
        patches = (int(store.patch_size), float(store.mpp))
        changed = [] if config.overwrite else made_otherwise(target, settings, patches)
        if changed:
            raise kept(target, changed)
        n = len(store)
        lossy = store.lossy_note("embedding")
        if lossy:
            log.warning("%s: %s", name, lossy)
        features = np.zeros((n, encoder.dim), dtype=config.dtype)
        items = plan_batches([(location, n)], config.batch_size)
        with stream_batches(items, workers=config.loader_workers, reader=reader,
                            slides={location: slide} if slide else None) as batches, \
                progress.bar(total=n, desc=name[:30], unit="patch", leave=False) as bar:
            for index, batch in batches:
                _loc, start, stop = items[int(index)]
                features[start:stop] = encoder.embed_tensor(batch).numpy().astype(config.dtype)
                bar.update(stop - start)
        embedded = time.perf_counter()
        i = encoder.identity
        # the slide the patches came from: the one given (a reused store's slide may have moved since it was tiled;
        # the store knows it by its fingerprint) is recorded, as a store tiled now records the path it was tiled from
        recorded = dict(store.attrs.get("slide") or {})
        if slide:
            recorded["path"] = str(Path(slide).resolve())
        # the mpp the patches were tiled at: the encoder's own record may have none (a hub reference, a file)
        attrs = {"encoder": i.to_dict(), "preprocessing": {**i.preprocessing, "mpp": float(store.mpp)},
                 "mpp": float(store.mpp),
                 "size": int(store.patch_size), "tile_size_l0": int(store.tile_size_l0),
                 "slide": recorded, "patch_store": _absolute(location),
                 "stain": store.attrs.get("stain", {"method": "none"}),
                 "patch_pixels": store.pixels_record, "precision": encoder.precision,
                 "package_version": __version__, "settings": settings}
        write_feature_store(target, features, store.coords, attrs)
        seconds = {"embed": round(embedded - started, 3), "write": round(time.perf_counter() - embedded, 3)}
        return EmbedResult(name, source, "done", str(target), n, seconds=seconds)


def _absolute(location: str) -> str:
    """A store's location as the feature store records it: right from any working directory (URLs as they are)."""
    return location if is_url(location) else str(Path(local_location(location)).absolute())


def _failed(name: str, source: str, exc: Exception, on_error: OnError) -> EmbedResult:
    if on_error == "raise":
        raise exc
    if isinstance(exc, StoreLockedError):  # another process writes this very store: skipped, as tile does
        log.warning("%s", exc)
        return EmbedResult(name, source, "busy", message=str(exc))
    message, trace = failure_message(source, exc)
    log.error("%s", message)
    runlog.record_traceback(name, trace)
    return EmbedResult(name, source, "failed", message=message)


@dataclass(frozen=True)
class EmbedInputs:
    """What ``inputs`` name: patch stores (name, location), slides, and the paths that gave neither."""

    stores: list[tuple[str, str]]
    sources: list[SlideSource]
    problems: list[DiscoveryProblem]


def find_inputs(inputs: Sequence[str]) -> EmbedInputs:
    """The patch stores and slides named by ``inputs``; a :class:`RunError` saying why where they name none (cheap:
    done before an encoder, perhaps a foundation model, is loaded)."""
    given, rest = split_inputs(inputs)
    sources, problems = discover(rest) if rest else ([], [])
    if not given and not sources:  # nothing to embed: say why, as infer does, rather than count a folder as a slide
        raise RunError(nothing_found("embed", problems))
    return EmbedInputs(given, sources, problems)


def embed_inputs(inputs: Sequence[str] | EmbedInputs, out: str | Path, encoder: Encoder, config: EmbedConfig,
                 tile: TileConfig, *, stores_dir: str | None = None, on_error: OnError = "raise") -> list[EmbedResult]:
    """Embed every slide and patch store named by ``inputs`` (paths, or what :func:`find_inputs` found in them)
    into ``out`` (see the module docstring).

    ``on_error="raise"`` (the library's default) raises whatever stops a slide; ``"record"`` (the command's
    policy) reads slides in the supervised child process and returns a failed slide as a result saying ``failed``,
    so the others go on."""
    out = Path(out)
    found = inputs if isinstance(inputs, EmbedInputs) else find_inputs(inputs)
    given, sources, problems = found.stores, found.sources, found.problems
    ident = encoder.identity
    resized = f" (resized to its {ident.input_size} px input: {ident.seen_mpp(config.mpp, config.size):.4g} um/px)" \
        if config.size != ident.input_size else ""
    log.info("embedding %d px patches at %g um/px with %s%s", config.size, config.mpp, ident.name, resized)
    note = ident.scale_note(config.mpp, config.size)
    if note:
        log.warning("%s", note)
    usable_folder(out)
    results = [EmbedResult(p.path.name, str(p.path), "failed", message=f"{p.path}: {p.reason}") for p in problems]
    for r in results:
        log.error("%s", r.message)
    stores = stores_dir or str(out / STORES_DIR)
    total = len(given) + len(sources)
    with progress.bar(total=total, desc="slides", unit="slide") as bar:
        for name, location in given:
            try:
                results.append(embed_store(name, location, location, out, encoder, config))
            except Exception as exc:  # the per-slide boundary
                results.append(_failed(name, location, exc, on_error))
            bar.update(1)
        if sources:
            with isolation.slide_calls(tile.slide_timeout, isolate=on_error == "record") as call:
                for source in sources:
                    results.append(_embed_slide(source, stores, out, encoder, config, tile, call, on_error))
                    bar.update(1)
    return results


def _embed_slide(source: SlideSource, stores: str, out: Path, encoder: Encoder, config: EmbedConfig,
                 tile: TileConfig, call: isolation.Caller, on_error: OnError) -> EmbedResult:
    started = time.perf_counter()
    if not config.overwrite:  # refused before its patch store in OUT is tiled again at these settings
        target = feature_store_path(out, source.name)  # (made_otherwise compares no patch store settings)
        changed = made_otherwise(target, settings_for(encoder, config, {}), (config.size, config.mpp))
        if changed:
            return _failed(source.name, str(source.path), kept(target, changed), on_error)
    tiled = tile_isolated(call, source, stores, tile, on_error=on_error)
    if tiled.status == "locked":  # another process is tiling its patch store: skipped, as tile does
        log.warning("%s", tiled.message)
        return EmbedResult(source.name, str(source.path), "busy", message=tiled.message)
    if not tiled.ok:
        message = tiled.message or f"tiling {tiled.status}"
        log.error("%s", message)
        runlog.record_traceback(source.name, tiled.traceback)
        return EmbedResult(source.name, str(source.path), "failed", message=message)
    try:
        result = embed_store(source.name, str(source.path), tiled.store, out, encoder, config, reader=call,
                             slide=str(source.path))
    except Exception as exc:  # the per-slide boundary: one slide's failure ends only it
        return _failed(source.name, str(source.path), exc, on_error)
    result.seconds["tile"] = round(time.perf_counter() - started - sum(result.seconds.values()), 3)
    return result


