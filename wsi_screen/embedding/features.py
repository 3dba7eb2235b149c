"""FeatureStore: the one module that knows the zarr layout of a slide's embeddings (``wsi-screen embed``).

Layout of ``OUT/<slide name>.zarr`` (a zarr v3 group, readable with plain zarr):

=============== ========================== ===================================================================
key             dtype, shape               meaning
=============== ========================== ===================================================================
``features``    float16 or float32 (N, D)  one embedding per patch, in the patch store's order
``coords``      int64 (N, 2)               level-0 (x, y) of each patch's top-left corner (the patch store's)
=============== ========================== ===================================================================

Group attributes: ``schema_version``, ``complete``, ``kind`` (``wsi-screen embeddings``), ``encoder`` (name, ref,
arch, weights and their sha256, pooling, dim, licence), ``preprocessing`` (input size, the patches' mpp,
mean/std, resize), ``mpp`` and ``size`` (the patches' um/px and edge in pixels), ``tile_size_l0``, ``n_patches``,
``dtype``, ``slide`` (the patch store's slide record, with the path of the slide file read when one was given: a
slide moved since its store was tiled), ``patch_store`` (its location), ``package_version`` and
``settings`` (what must match for the store to be reused on a rerun).

Written under ``<name>.zarr.partial``, ``complete`` set last, then renamed into place (``_safe_write.swap_in``): a
killed run never leaves a store that looks finished, and an interrupted one (a Ctrl-C) leaves no ``.partial`` behind,
as a patch store's writer does not. The caller holds the store's lock (``tiling.store.store_lock``, taken by
``embedding.slides.embed_store``): the work folder is one name, shared by any two writers of one store.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from wsi_screen._safe_write import fsync_tree, swap_in, write_failed
from wsi_screen.errors import SchemaVersionError, StoreError
from wsi_screen.tiling.store import EMBEDDINGS_KIND

SCHEMA_VERSION = 1
KIND = EMBEDDINGS_KIND
FEATURES = "features"
COORDS = "coords"
ATTR_COMPLETE = "complete"
ATTR_SETTINGS = "settings"
DTYPES = ("float16", "float32")
#: rows per chunk of ``features``
CHUNK_ROWS = 4096


def feature_store_path(out: str | Path, name: str) -> Path:
    return Path(out) / f"{name}.zarr"


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """A feature store's attributes, or None where there is none (readable)."""
    if not (Path(path) / "zarr.json").exists():
        return None
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None


def is_current(path: str | Path, settings: Mapping[str, Any]) -> bool:
    """Whether ``path`` holds a complete feature store made with ``settings``."""
    attrs = read_attrs(path)
    if not attrs:
        return False
    return attrs.get(ATTR_COMPLETE) is True and attrs.get("kind") == KIND \
        and attrs.get("schema_version") == SCHEMA_VERSION and attrs.get(ATTR_SETTINGS) == dict(settings)


def write_feature_store(path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any]) -> Path:
    """Write a complete feature store atomically (see the module docstring); returns its path."""
    final = Path(path)
    if features.dtype.name not in DTYPES:
        raise StoreError(f"{final}: features must be float16 or float32, not {features.dtype}")
    if features.ndim != 2 or coords.shape != (len(features), 2):
        raise StoreError(f"{final}: features {features.shape} and coords {coords.shape} do not match")
    work = final.with_name(final.name + ".partial")
    try:
        shutil.rmtree(work, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(work), mode="w", zarr_format=3)
        rows = max(1, min(CHUNK_ROWS, len(features)))
        group.create_array(FEATURES, data=features, chunks=(rows, max(1, features.shape[1])))
        group.create_array(COORDS, data=np.ascontiguousarray(coords, dtype=np.int64), chunks=(max(1, len(coords)), 2))
        group.attrs.update({**dict(attrs), "kind": KIND, "schema_version": SCHEMA_VERSION,
                            "n_patches": len(features), "dtype": features.dtype.name})
        group.attrs[ATTR_COMPLETE] = True
        fsync_tree(work)
        swap_in(work, final)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise write_failed(final, exc, " the embeddings") from exc
    except BaseException:  # a Ctrl-C mid-write: the work folder is this call's (made afresh above), gone with it
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


class FeatureStore:
    """A finished feature store, read-only: ``features`` (N, D), ``coords`` (N, 2) and ``attrs``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such embeddings store")
        attrs = read_attrs(self.path)
        if not attrs or attrs.get("kind") != KIND:
            raise StoreError(f"{self.path}: not a wsi-screen embeddings store")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise SchemaVersionError(f"{self.path}: embeddings schema {attrs.get('schema_version')} is not "
                                     f"{SCHEMA_VERSION}; re-run `wsi-screen embed`")
        if attrs.get(ATTR_COMPLETE) is not True:
            raise StoreError(f"{self.path}: incomplete embeddings (an interrupted run); re-run `wsi-screen embed`")
        self.attrs = attrs
        self._group = zarr.open_group(str(self.path), mode="r")

    def __len__(self) -> int:
        return int(self.attrs["n_patches"])

    def __repr__(self) -> str:
        dim = cast("zarr.Array", self._group[FEATURES]).shape[1]
        return f"FeatureStore({str(self.path)!r}, {len(self)} patches x {dim} features)"

    @property
    def features(self) -> np.ndarray:
        return np.asarray(cast("zarr.Array", self._group[FEATURES])[...])

    @property
    def coords(self) -> np.ndarray:
        return np.asarray(cast("zarr.Array", self._group[COORDS])[...])
