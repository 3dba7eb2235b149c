"""A dataset's embeddings under one encoder, computed once and cached.

Training a head (:mod:`wsi_screen.training.heads`) needs the encoder's embedding of every train and valid image;
with a foundation encoder that is the expensive part, so it is done once and kept in a cache folder
(``embedding_cache``; default ``$WSI_SCREEN_CACHE/embeddings``, else ``~/.cache/wsi-screen/embeddings``),
one safetensors file per key. The key is the sha256 of the encoder's identity (reference, weights sha256, pooling,
input size, mean/std) and arithmetic, the images (the content hash of every train and valid file) and the size
they are decoded at: any change to one of them computes the embeddings afresh; a rerun with the same ones reads
them back. While they are computed, each chunk of images embedded is kept beside the file to be
(``<key>.parts/``), so a run killed half-way goes on from there when rerun. An image's embedding depends on its
bytes only, not on its path, label or role, so a rerun that splits the same images otherwise (another seed, valid
fraction or group column carving the validation split) or a dataset folder moved elsewhere reuses them; the file
holds one row per distinct image (byte-identical copies once), in the order of their hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
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
#: the version of the cached files' layout (part of the key): 2, one row per distinct image (1: train and valid)
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``$WSI_SCREEN_CACHE/embeddings``, else ``~/.cache/wsi-screen/embeddings`` (``XDG_CACHE_HOME`` honoured)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "embeddings"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "wsi-screen" / "embeddings"


def cache_folder(cache_dir: str | Path | None) -> Path:
    """The folder the embeddings are cached in: ``cache_dir``, else :func:`default_cache_dir`."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def cache_key(encoder: Encoder, images: Sequence[str], size: int) -> str:
    """sha256 of what the embeddings depend on (see the module docstring); ``images``: the sorted distinct
    content hashes of the images."""
    i = encoder.identity
    what = {"version": CACHE_VERSION, "ref": i.ref, "weights_sha256": i.weights_sha256, "pooling": i.pooling,
            "input_size": i.input_size, "mean": list(i.mean), "std": list(i.std),
            "images": hashlib.sha256("\n".join(images).encode()).hexdigest(), "size": size,
            "precision": encoder.precision}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class DatasetEmbeddings:
    """Embeddings (float32) of the train and valid rows, in row order, and where they came from."""

    train: torch.Tensor
    valid: torch.Tensor
    path: Path
    reused: bool


#: images decoded and embedded at a time; with a parts folder, each such chunk is kept there as soon as it is made
CHUNK = 512


def embed_rows(encoder: Encoder, folder: PatchFolder, rows: np.ndarray, size: int, *, workers: int = 2,
               batch_size: int = 128, desc: str = "embedding", parts: Path | None = None) -> torch.Tensor:
    """Decode ``rows`` at ``size`` px (:data:`CHUNK` at a time) and embed them: float32 (N, D). With ``parts``, each
    chunk's embeddings are written there as they are made (``<first row's position>.safetensors``), and the chunks
    a killed call left there are read back instead of computed again: a rerun goes on where it stopped, with the
    same chunks, so the same numbers."""
    done: list[np.ndarray] = _kept_parts(parts, len(rows), encoder.dim) if parts is not None else []
    start = sum(len(d) for d in done)
    if start:
        log.info("%d of %d images already embedded (%s); embedding the rest", start, len(rows), parts)
    with progress.bar(total=len(rows), desc=desc, unit="img") as bar:
        bar.update(start)
        for offset, loaded in zip(range(start, len(rows), CHUNK),
                                  iter_images(folder, rows[start:], size, workers=workers, chunk=CHUNK), strict=True):
            features = encoder.embed(loaded.images, batch_size=batch_size)
            if parts is not None:
                try:
                    parts.mkdir(parents=True, exist_ok=True)
                    write_safetensors(parts / f"{offset:09d}.safetensors", {"features": torch.from_numpy(features)})
                except OSError as exc:  # keeping them only saves a rerun's work
                    log.warning("cannot keep embeddings in %s: %s", parts, exc)
                    parts = None
            done.append(features)
            bar.update(len(loaded.images))
    out = np.concatenate(done) if done else np.zeros((0, encoder.dim), np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def _kept_parts(parts: Path, n: int, dim: int) -> list[np.ndarray]:
    """The chunks an interrupted :func:`embed_rows` kept in ``parts``: the unbroken run of them from the first row."""
    kept: list[np.ndarray] = []
    start = 0
    while start < n:
        path = parts / f"{start:09d}.safetensors"
        if not path.is_file():
            break
        try:
            features = read_weights(path)["features"].numpy()
        except (ModelError, KeyError):
            break
        if features.shape != (min(CHUNK, n - start), dim):
            break
        kept.append(features)
        start += len(features)
    return kept


def dataset_embeddings(encoder: Encoder, folder: PatchFolder, train_rows: np.ndarray, valid_rows: np.ndarray, *,
                       size: int, digests: Sequence[str], cache_dir: str | Path | None = None, workers: int = 2,
                       batch_size: int = 128) -> DatasetEmbeddings:
    """The embeddings of ``train_rows`` and ``valid_rows`` (``digests``: their files' content hashes, train rows
    then valid rows, :func:`wsi_screen.training.data.file_digests`): read from the cache when there, else computed
    and cached (written atomically)."""
    rows = np.concatenate([train_rows, valid_rows]).astype(np.int64)
    if len(digests) != len(rows):
        raise ModelError(f"{len(digests)} content hashes for {len(rows)} images")
    first_row: dict[str, int] = {}
    for row, digest in zip(rows.tolist(), digests, strict=True):
        first_row.setdefault(digest, row)
    images = sorted(first_row)
    position = {digest: k for k, digest in enumerate(images)}
    picks = torch.tensor([position[d] for d in digests], dtype=torch.long)
    n_train = len(train_rows)
    folder_path = cache_folder(cache_dir)
    path = folder_path / f"{cache_key(encoder, images, size)}.safetensors"
    parts = path.with_suffix(".parts")  # the chunks made so far: an interrupted run goes on from them
    if path.is_file():
        try:
            features = read_weights(path)["features"]
            if features.shape == (len(images), encoder.dim):
                log.info("embeddings of %d + %d images reused from %s", n_train, len(valid_rows), path)
                shutil.rmtree(parts, ignore_errors=True)  # left by a run killed once the file was written
                features = features.float()[picks]
                return DatasetEmbeddings(features[:n_train], features[n_train:], path, reused=True)
            log.warning("%s: cached embeddings have the wrong shape; computing them again", path)
        except (ModelError, KeyError) as exc:
            log.warning("%s: unreadable cached embeddings (%s); computing them again", path, exc)
    log.info("embedding %d train and %d valid images (%d distinct) with %s (cached in %s)", n_train,
             len(valid_rows), len(images), encoder.identity.name, folder_path)
    features = embed_rows(encoder, folder, np.array([first_row[d] for d in images], dtype=np.int64), size,
                          workers=workers, batch_size=batch_size, desc="embedding", parts=parts)
    try:
        folder_path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {"features": features},
                          {"encoder": encoder.identity.name, "dataset": str(folder.root), "size": str(size)})
        shutil.rmtree(parts, ignore_errors=True)
    except OSError as exc:  # a cache that cannot be written costs a recomputation next time, nothing more
        log.warning("cannot cache embeddings in %s: %s", folder_path, exc)
    features = features[picks]
    return DatasetEmbeddings(features[:n_train], features[n_train:], path, reused=False)
