"""A dataset's embeddings under one encoder, computed once and cached.

Training a head (:mod:`wsi_screen.training.heads`) needs the encoder's embedding of every train and valid image;
with a foundation encoder that is the expensive part, so it is done once and kept in a cache folder
(``embedding_cache``; default ``$WSI_SCREEN_CACHE/embeddings``, else ``~/.cache/wsi-screen/embeddings``),
one safetensors file per key. The key is the sha256 of the encoder's identity (reference, weights sha256, pooling,
input size, mean/std) and arithmetic, the dataset's fingerprint (every train and valid file's path, label, role
and content hash) and the size the images are decoded at: any change to one of them computes the embeddings
afresh; a rerun with the same ones reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_screen import progress
from wsi_screen.errors import ModelError
from wsi_screen.models.checkpoint import read_weights, write_safetensors
from wsi_screen.models.encoder import Encoder
from wsi_screen.training.data import PatchFolder, iter_images

log = logging.getLogger(__name__)

CACHE_ENV = "WSI_SCREEN_CACHE"
#: the version of the cached files' layout (part of the key)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$WSI_SCREEN_CACHE/embeddings``, else ``~/.cache/wsi-screen/embeddings`` (``XDG_CACHE_HOME`` honoured)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "embeddings"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "wsi-screen" / "embeddings"


def cache_folder(cache_dir: str | Path | None) -> Path:
    """The folder the embeddings are cached in: ``cache_dir``, else :func:`default_cache_dir`."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def cache_key(encoder: Encoder, data_fingerprint: str, size: int) -> str:
    """sha256 of what the embeddings depend on (see the module docstring)."""
    i = encoder.identity
    what = {"version": CACHE_VERSION, "ref": i.ref, "weights_sha256": i.weights_sha256, "pooling": i.pooling,
            "input_size": i.input_size, "mean": list(i.mean), "std": list(i.std), "data": data_fingerprint,
            "size": size, "precision": encoder.precision}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class DatasetEmbeddings:
    """Embeddings (float32) of the train and valid rows, in row order, and where they came from."""

    train: torch.Tensor
    valid: torch.Tensor
    path: Path
    reused: bool


def embed_rows(encoder: Encoder, folder: PatchFolder, rows: np.ndarray, size: int, *, workers: int = 2,
               batch_size: int = 128, desc: str = "embedding") -> torch.Tensor:
    """Decode ``rows`` at ``size`` px (a chunk at a time) and embed them: float32 (N, D)."""
    parts: list[np.ndarray] = []
    with progress.bar(total=len(rows), desc=desc, unit="img") as bar:
        for loaded in iter_images(folder, rows, size, workers=workers):
            parts.append(encoder.embed(loaded.images, batch_size=batch_size))
            bar.update(len(loaded.images))
    out = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def dataset_embeddings(encoder: Encoder, folder: PatchFolder, train_rows: np.ndarray, valid_rows: np.ndarray, *,
                       size: int, data_fingerprint: str, cache_dir: str | Path | None = None, workers: int = 2,
                       batch_size: int = 128) -> DatasetEmbeddings:
    """The embeddings of ``train_rows`` and ``valid_rows``: read from the cache when there, else computed and
    cached (written atomically)."""
    folder_path = cache_folder(cache_dir)
    path = folder_path / f"{cache_key(encoder, data_fingerprint, size)}.safetensors"
    if path.is_file():
        try:
            state = read_weights(path)
            train, valid = state["train"], state["valid"]
            if train.shape == (len(train_rows), encoder.dim) and valid.shape == (len(valid_rows), encoder.dim):
                log.info("embeddings of %d + %d images reused from %s", len(train), len(valid), path)
                return DatasetEmbeddings(train.float(), valid.float(), path, reused=True)
            log.warning("%s: cached embeddings have the wrong shape; computing them again", path)
        except (ModelError, KeyError) as exc:
            log.warning("%s: unreadable cached embeddings (%s); computing them again", path, exc)
    log.info("embedding %d train and %d valid images with %s (cached in %s)", len(train_rows), len(valid_rows),
             encoder.identity.name, folder_path)
    train = embed_rows(encoder, folder, train_rows, size, workers=workers, batch_size=batch_size,
                       desc="embedding train")
    valid = embed_rows(encoder, folder, valid_rows, size, workers=workers, batch_size=batch_size,
                       desc="embedding valid")
    try:
        folder_path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {"train": train, "valid": valid},
                          {"encoder": encoder.identity.name, "dataset": str(folder.root), "size": str(size)})
    except OSError as exc:  # a cache that cannot be written costs a recomputation next time, nothing more
        log.warning("cannot cache embeddings in %s: %s", folder_path, exc)
    return DatasetEmbeddings(train, valid, path, reused=False)
