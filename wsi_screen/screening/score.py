"""Score patch stores with a patch classifier.

Patches stream out of the stores through a torch ``DataLoader``: each item is a contiguous run of patches of
one store (decoded straight from its shards, see :meth:`PatchStore.read`), the main process normalises them
and runs the model under ``inference_mode`` in ``channels_last``. Batches never span two slides, so a slide's
scores do not depend on which other slides were scored with it (a distributed run gives the same numbers).

A coordinates-only store (``pixels=False``, ``infer``'s default) has no pixels: reading a batch reads its
patches from the slide with ``read_threads`` reader threads and normalises them (:meth:`PatchStore.read`), in the
same background thread, so slide reading overlaps the model as decoding a store does. Given a ``reader`` (``infer``
passes its slide reader's caller, :mod:`wsi_screen.slide.isolation`), those slide reads run in the reader's child
process and the batch comes back through its pipe (a few milliseconds for 128 patches): a native crash or hang
there fails the slide being scored, and the run goes on.

Reading a batch of 128 patches from a store takes a few milliseconds against a few hundred for the forward pass, so by
default (``workers=0``) the DataLoader runs in one background thread of this process, a few batches ahead of
the model: I/O hides behind compute without worker processes, which on a small machine take cores from the
model (measured in bench/infer.py, figures in bench/RESULTS.md). ``workers=N`` starts N DataLoader worker
processes (``spawn``: zarr keeps an event-loop thread that must not be forked), for machines where reading
is the slower side; only when a slide has enough batches to repay their start-up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsi_screen import progress
from wsi_screen.errors import ModelMismatchError, check_whole
from wsi_screen.models import ModelSpec, PatchClassifier
from wsi_screen.slide import isolation
from wsi_screen.slide.isolation import Caller
from wsi_screen.tiling.store import PatchStore, close_rows, read_rows

log = logging.getLogger(__name__)

#: relative mpp difference tolerated between a store and a model
MPP_RTOL = 0.02
#: below this many batches a slide is read without worker processes (their start-up would cost more)
MIN_BATCHES_FOR_WORKERS = 8
#: batches read ahead of the model
PREFETCH_BATCHES = 4

T = TypeVar("T")


class StoreBatches(Dataset[tuple[int, torch.Tensor]]):
    """Contiguous batches ``(location, start, stop)`` of store patches as uint8 NHWC tensors.

    ``reader`` runs the slide reads of coordinates-only stores (see the module docstring; None, or
    :func:`isolation.direct <wsi_screen.slide.isolation.direct>`: here, by this object's own open stores). Pickles
    as a list of plain tuples, without the reader; each DataLoader worker process opens the stores it needs by
    location and reads them itself.
    """

    def __init__(self, items: Sequence[tuple[str, int, int]], read_threads: int = 2,
                 reader: Caller | None = None, slides: Mapping[str, str] | None = None) -> None:
        self.items = list(items)
        self.read_threads = read_threads
        self.reader = None if reader is isolation.direct else reader
        self.slides = dict(slides or {})
        self._open: dict[str, PatchStore] = {}
        self._reader_holds = False  # the reader holds a store open (closed with ours)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        location, start, stop = self.items[index]
        store = self._open.get(location)
        if store is None:
            store = self._open[location] = PatchStore.open(location, workers=self.read_threads,
                                                           slide=self.slides.get(location))
        if self.reader is None or store.has_pixels:
            return index, torch.from_numpy(np.ascontiguousarray(store.read(slice(start, stop))))
        self._reader_holds = False  # a failed read leaves nothing to close (a crashed or hung child was replaced)
        patches = self.reader(read_rows, location, start, stop, self.read_threads, self.slides.get(location))
        self._reader_holds = True
        return index, torch.from_numpy(patches)

    def close(self) -> None:
        """Close the slides coordinates-only stores read from (here, and in the reader)."""
        for store in self._open.values():
            store.close()
        self._open.clear()
        if self._reader_holds and self.reader is not None:
            self._reader_holds = False
            try:
                self.reader(close_rows)
            except Exception as exc:  # the scores stand; the child closes it with its next store, or ends
                log.debug("closing the slide reader's store: %s", exc)

    def __getstate__(self) -> dict[str, Any]:
        return {"items": self.items, "read_threads": self.read_threads, "slides": self.slides}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.items = state["items"]
        self.read_threads = state.get("read_threads", 2)
        self.slides = state.get("slides", {})
        self.reader = None
        self._open = {}
        self._reader_holds = False


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size that is no whole number of patches of at least 1."""
    check_whole(batch_size, "batch_size", at_least=1, unit="patches")


def plan_batches(sizes: Sequence[tuple[str, int]], batch_size: int) -> list[tuple[str, int, int]]:
    """Split each store of ``n`` patches into consecutive batches of at most ``batch_size``."""
    check_batch_size(batch_size)
    items = []
    for location, n in sizes:
        for start in range(0, n, batch_size):
            items.append((location, start, min(n, start + batch_size)))
    return items


#: the other ways out of a mismatching store for a screening run (its stores folder is a setting)
SCREEN_AGAIN = "or screen into other `stores` (or with `overwrite`)"


def check_store_matches_model(attrs: Mapping[str, Any], spec: ModelSpec, location: str, *,
                              other_way: str = SCREEN_AGAIN) -> None:
    """Refuse a store whose patches are not what the model was trained on (resolution, size, stain); the message
    says how to tile it again and, after that, ``other_way`` (the caller's other way out)."""
    if spec.mpp is None:
        raise ModelMismatchError(f"model {spec.arch} does not record the mpp of its training patches; "
                                 "retrain it with their `mpp` set")
    problems = []
    mpp = float(attrs.get("mpp", math.nan))
    if not math.isclose(mpp, spec.mpp, rel_tol=MPP_RTOL):
        problems.append(f"{mpp:g} um/px instead of {spec.mpp:g}")
    if int(attrs.get("patch_size", -1)) != spec.input_size:
        problems.append(f"{attrs.get('patch_size')} px patches instead of {spec.input_size}")
    stain = attrs.get("stain", {}) or {}
    if stain.get("method", "none") != spec.stain_method:
        problems.append(f"stain {stain.get('method')!r} instead of {spec.stain_method!r}")
    if problems:
        raise ModelMismatchError(f"{location}: store does not match the model ({'; '.join(problems)}); tile it "
                                 f"again with `mpp`={spec.mpp:g}, `size_px`={spec.input_size} and "
                                 f"`stain`={spec.stain_method}, {other_way}")


def score_stores(locations: Sequence[str], classifier: PatchClassifier, *, batch_size: int = 128,
                 workers: int = 0, desc: str = "scoring", read_threads: int = 2,
                 reader: Caller | None = None,
                 slides: Mapping[str, str] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Yield ``(location, probabilities (N, C), domain distances (N,) or None)`` for each store, in order, as
    soon as it is scored (distances when the model has a domain model, from the same forward pass).
    ``read_threads``: slide reader threads of coordinates-only stores; ``reader``: where their slide reads run
    (see the module docstring; None: here); ``slides``: by location, the slide file a coordinates-only store
    reads its patches from instead of the one it records (a moved slide, checked by fingerprint; see
    :meth:`PatchStore.open <wsi_screen.tiling.store.PatchStore.open>`)."""
    sizes = []
    for location in locations:
        store = PatchStore.open(location)
        check_store_matches_model(store.attrs, classifier.spec, location)
        sizes.append((location, len(store)))
    items = plan_batches(sizes, batch_size)
    per_store = {loc: np.zeros((n, classifier.spec.num_classes), dtype=np.float32) for loc, n in sizes}
    per_store_d = {loc: np.zeros(n, dtype=np.float32) for loc, n in sizes} if classifier.domain is not None else {}
    remaining = {loc: sum(1 for it in items if it[0] == loc) for loc, _ in sizes}
    emitted: set[str] = set()

    def flush_ready(upto: int) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
        for loc, _n in sizes[:upto]:
            if loc not in emitted and remaining[loc] == 0:
                emitted.add(loc)
                yield loc, per_store.pop(loc), per_store_d.pop(loc, None)

    total = sum(n for _, n in sizes)
    with stream_batches(items, workers=workers, read_threads=read_threads, reader=reader, slides=slides,
                        pin_memory=classifier.device.type == "cuda") as loader, \
            progress.bar(total=total, desc=desc, unit="patch") as bar:
        order = {loc: i for i, (loc, _) in enumerate(sizes)}
        for index, batch in loader:
            location, start, stop = items[int(index)]
            probs, distance = classifier.score_tensor(classifier.preprocess(batch))
            per_store[location][start:stop] = probs.float().cpu().numpy()
            if distance is not None:
                per_store_d[location][start:stop] = distance
            remaining[location] -= 1
            bar.update(stop - start)
            yield from flush_ready(order[location] + 1)
    yield from flush_ready(len(sizes))


@contextlib.contextmanager
def stream_batches(items: Sequence[tuple[str, int, int]], *, workers: int = 0, read_threads: int = 2,
                   reader: Caller | None = None, slides: Mapping[str, str] | None = None,
                   pin_memory: bool = False) -> Iterator[Iterator[tuple[int, torch.Tensor]]]:
    """The batches ``items`` of :class:`StoreBatches`, ``(index, uint8 NHWC tensor)`` in order, read
    :data:`PREFETCH_BATCHES` ahead of the caller (:func:`make_loader`, :func:`prefetch`). On leaving, the reading
    thread is stopped first, then the slides it read from (here and in ``reader``) are closed. ``slides``: as
    :func:`score_stores` takes them."""
    dataset = StoreBatches(items, read_threads, reader, slides)
    loader = prefetch(make_loader(dataset, workers, pin_memory=pin_memory), PREFETCH_BATCHES)
    try:
        yield loader
    finally:
        loader.close()
        dataset.close()


def prefetch(iterable: Iterable[T], depth: int) -> Generator[T, None, None]:
    """Iterate ``iterable`` in a background thread, at most ``depth`` items ahead; errors re-raised here.

    Closing the generator early (a failed slide, Ctrl-C) stops the thread after its current item.
    """
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        items.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            items.put(("error", exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                items.get_nowait()
        thread.join(timeout=5)


def make_loader(dataset: StoreBatches, workers: int, *,
                pin_memory: bool = False) -> DataLoader[tuple[int, torch.Tensor]]:
    """A DataLoader over whole batches (``batch_size=None``), in order, with spawned workers; ``pin_memory``
    (for a CUDA model) pins each batch for a faster, asynchronous copy to the GPU."""
    # spawning workers costs seconds: only worth it when there is enough to read
    workers = 0 if len(dataset) < MIN_BATCHES_FOR_WORKERS else min(workers, len(dataset))
    if workers == 0:
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      multiprocessing_context="spawn", prefetch_factor=4, persistent_workers=False)
