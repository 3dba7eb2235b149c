"""Patches of a coordinates-only store, read from the slide on demand.

A ``TileConfig(pixels=False)`` store holds everything but the pixels: coordinates, tissue, thumbnail, mask, stain fit
and the settings. :class:`SlidePatches` reads patches at those coordinates with the tiler's own reads
(:func:`read_into`, the same call :func:`wsi_screen.tiling.pipeline.read_patches` makes) and the normaliser
rebuilt from the stored stain fit, so :meth:`PatchStore.read <wsi_screen.tiling.store.PatchStore.read>` returns
the bytes a pixel store made with the same settings holds (tests/tiling/test_ondemand.py checks byte equality).

Those reads run native slide readers on tiles the tiler never decoded (it read only the thumbnail). ``infer``
therefore makes them in the slide reader's child process (:mod:`wsi_screen.slide.isolation`) through
:func:`wsi_screen.tiling.store.read_rows`, so that a crash or a hang deep inside a slide fails that slide, not the run.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from wsi_screen.errors import SlideOpenError, StoreError, for_caller
from wsi_screen.slide.slide import Slide


def read_into(slide: Slide, xy: np.ndarray, tile_l0: int, size_px: int, out: np.ndarray) -> None:
    """Read the patches at level-0 ``xy`` (in order) into ``out`` (uint8, ``(len(xy), size_px, size_px, 3)``)."""
    for i, (x, y) in enumerate(xy):
        slide.read((int(x), int(y)), tile_l0, size_px, out[i])


def split_reads(pool: ThreadPoolExecutor, slide: Slide, xy: np.ndarray, tile_l0: int, size_px: int,
                out: np.ndarray, workers: int) -> list[Any]:
    """Start reading ``xy`` into ``out`` as one contiguous run per thread (neighbouring patches share the
    reader's cached tiles); the futures, in order."""
    cuts = np.linspace(0, len(xy), min(max(1, workers), len(xy)) + 1).astype(int)
    return [pool.submit(read_into, slide, xy[a:b], tile_l0, size_px, out[a:b]) for a, b in itertools.pairwise(cuts)]


class SlidePatches:
    """Reads a coordinates-only store's patches from its slide, normalised as the tiler would have."""

    def __init__(self, location: str, attrs: Mapping[str, Any], *, slide: str | None = None,
                 workers: int = 2) -> None:
        info = attrs.get("slide") or {}
        path = slide or info.get("path")
        if not path:
            raise StoreError(f"{location}: coordinates-only store that names no slide; pass the slide file")
        self.tile_l0 = int(attrs["tile_size_l0"])
        self.size_px = int(attrs["patch_size"])
        self.workers = max(1, int(workers))
        try:
            self.slide = Slide(path, name=info.get("name"), reader=attrs.get("reader_choice", "auto"),
                               force_mpp=info.get("mpp"), force_mpp_warning=False)  # warned of when tiled
        except SlideOpenError as exc:
            folder = location.rstrip("/").rpartition("/")[0] or "."
            way = for_caller(f"open the store with `wsi_screen.PatchStore.open({location!r}, slide=PATH)`",
                             f"screen or embed it at its new path with `stores`={folder}")
            raise StoreError(f"{location}: reads its patches from the slide {path}, which cannot be opened ({exc}); "
                             f"a slide moved to another folder under the same file name is recognised by its "
                             f"fingerprint: {way}; a renamed one is not (the fingerprint includes the file name): "
                             "give it back its name, or tile it again") from exc
        if info.get("fingerprint") and self.slide.info.fingerprint != info["fingerprint"]:
            self.slide.close()
            raise StoreError(f"{location}: the slide {path} is not the file this store was made from (another "
                             "file name or content: the fingerprint includes the file name, so a renamed slide is "
                             "another file); pass the original file, or re-tile it")
        self._normalize = _normalizer(attrs.get("stain") or {})
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # one read at a time shares the pool and the slide's tile cache

    def read(self, xy: np.ndarray) -> np.ndarray:
        """Patches at level-0 ``xy`` (n, 2): uint8 (n, S, S, 3), stain-normalised as the store's settings say."""
        out = np.empty((len(xy), self.size_px, self.size_px, 3), dtype=np.uint8)
        if len(xy) == 0:
            return out
        with self._lock:
            if self.workers == 1 or len(xy) == 1:
                read_into(self.slide, xy, self.tile_l0, self.size_px, out)
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="store-read")
                for f in split_reads(self._pool, self.slide, xy, self.tile_l0, self.size_px, out, self.workers):
                    f.result()
        return out if self._normalize is None else self._normalize(out)[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.slide.close()


def _normalizer(stain: Mapping[str, Any]) -> Any:
    """The stored stain fit as the tiler's normaliser (None where the tiler normalised nothing)."""
    if stain.get("method", "none") == "none" or not stain.get("fitted"):
        return None
    from wsi_screen.tiling.stain import Normalizer, StainParams

    return Normalizer(StainParams.from_json(stain["source"]), StainParams.from_json(stain["target"])).apply

