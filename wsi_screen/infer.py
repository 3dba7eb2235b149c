"""Score patch stores with a patch classifier.

Patches stream out of the stores through a torch ``DataLoader``: each item is a contiguous run of patches of
one store (read from its shards by a worker process), the main process normalises them and runs the model
under ``inference_mode`` in ``channels_last``. Batches never span two slides, so a slide's scores do not
depend on which other slides were scored with it (a distributed run gives the same numbers). Workers are
started with ``spawn`` (zarr keeps an event-loop thread that must not be forked), and only when a slide has
enough batches to repay their start-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsi_screen import progress
from wsi_screen.errors import ModelMismatchError
from wsi_screen.models import ModelSpec, PatchClassifier
from wsi_screen.store import PatchStore

log = logging.getLogger(__name__)

#: relative mpp difference tolerated between a store and a model
MPP_RTOL = 0.02
#: below this many batches a slide is read in the main process (worker start-up would cost more)
MIN_BATCHES_FOR_WORKERS = 8


class StoreBatches(Dataset[tuple[int, torch.Tensor]]):
    """Contiguous batches ``(location, start, stop)`` of store patches as uint8 NHWC tensors.

    Pickles as a list of plain tuples; each worker opens the stores it needs by location.
    """

    def __init__(self, items: Sequence[tuple[str, int, int]]) -> None:
        self.items = list(items)
        self._open: dict[str, PatchStore] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        location, start, stop = self.items[index]
        store = self._open.get(location)
        if store is None:
            store = self._open[location] = PatchStore.open(location)
        return index, torch.from_numpy(np.ascontiguousarray(store.read(slice(start, stop))))

    def __getstate__(self) -> dict[str, Any]:
        return {"items": self.items}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.items = state["items"]
        self._open = {}


def plan_batches(sizes: Sequence[tuple[str, int]], batch_size: int) -> list[tuple[str, int, int]]:
    """Split each store of ``n`` patches into consecutive batches of at most ``batch_size``."""
    items = []
    for location, n in sizes:
        for start in range(0, n, batch_size):
            items.append((location, start, min(n, start + batch_size)))
    return items


def check_store_matches_model(attrs: Mapping[str, Any], spec: ModelSpec, location: str) -> None:
    """Refuse a store whose patches are not what the model was trained on (resolution, size, stain)."""
    if spec.mpp is None:
        raise ModelMismatchError(f"model {spec.arch} does not record the mpp of its training patches; "
                                 "retrain it with `wsi-screen train --mpp X`")
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
        fix = (f"wsi-screen tile ... --mpp {spec.mpp:g} --size {spec.input_size} --stain {spec.stain_method}")
        raise ModelMismatchError(f"{location}: store does not match the model ({'; '.join(problems)}); re-tile "
                                 f"with `{fix}`, or let `wsi-screen infer` tile into another --stores folder "
                                 "(or pass --overwrite)")


def score_stores(locations: Sequence[str], classifier: PatchClassifier, *, batch_size: int = 128,
                 workers: int = 2, desc: str = "scoring") -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(location, probabilities (N, C))`` for each store, in order, as soon as it is scored."""
    sizes = []
    for location in locations:
        store = PatchStore.open(location)
        check_store_matches_model(store.attrs, classifier.spec, location)
        sizes.append((location, len(store)))
    items = plan_batches(sizes, batch_size)
    per_store = {loc: np.zeros((n, classifier.spec.num_classes), dtype=np.float32) for loc, n in sizes}
    remaining = {loc: sum(1 for it in items if it[0] == loc) for loc, _ in sizes}
    emitted: set[str] = set()

    def flush_ready(upto: int) -> Iterator[tuple[str, np.ndarray]]:
        for loc, _n in sizes[:upto]:
            if loc not in emitted and remaining[loc] == 0:
                emitted.add(loc)
                yield loc, per_store.pop(loc)

    loader = make_loader(StoreBatches(items), workers)
    total = sum(n for _, n in sizes)
    with progress.bar(total=total, desc=desc, unit="patch") as bar:
        order = {loc: i for i, (loc, _) in enumerate(sizes)}
        for index, batch in loader:
            location, start, stop = items[int(index)]
            probs = classifier.predict_tensor(classifier.preprocess(batch))
            per_store[location][start:stop] = probs.float().numpy()
            remaining[location] -= 1
            bar.update(stop - start)
            yield from flush_ready(order[location] + 1)
    yield from flush_ready(len(sizes))


def make_loader(dataset: StoreBatches, workers: int) -> DataLoader[tuple[int, torch.Tensor]]:
    """A DataLoader over whole batches (``batch_size=None``), in order, with spawned workers."""
    # spawning workers costs seconds: only worth it when there is enough to read
    workers = 0 if len(dataset) < MIN_BATCHES_FOR_WORKERS else min(workers, len(dataset))
    if workers == 0:
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                      multiprocessing_context="spawn", prefetch_factor=4, persistent_workers=False)
