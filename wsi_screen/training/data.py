"""Labelled patch datasets: reading, validating, splitting and decoding them.

A dataset is a folder in one of two layouts:

* ``labels.csv`` with a ``path`` column (relative to the folder), a label column (``label`` unless told
  otherwise), optionally a split column (``split``: train / valid / test; ``val`` and ``validation`` are
  accepted for valid), a group column (patient, slide or source-photo id) and an ``mpp`` column;
* an ImageFolder tree ``<class>/<image>`` or ``<split>/<class>/<image>`` (split folders named train,
  valid or val, test).

Validation problems (missing columns, empty labels, missing images, unknown split names) raise
:class:`~wsi_screen.errors.DatasetError` naming the file and the fix. Validation splits are carved from
train only when the dataset has none: seeded, stratified by label, and grouped when a group column is
given (so copies of one source image never straddle train and valid). The test split is never touched by
training or tuning.

Small datasets are decoded once into memory as uint8 (:func:`load_images`); larger ones stream through
:class:`PatchImageDataset` with DataLoader workers. (Patch stores are read for scoring by
:mod:`wsi_screen.screening.score`.)
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from wsi_screen import progress
from wsi_screen.errors import DatasetError
from wsi_screen.models.pixels import numpy_to_tensor, resize_uint8

log = logging.getLogger(__name__)

#: row indices into a PatchFolder
Rows = Sequence[int] | np.ndarray

LABELS_CSV = "labels.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid",
                 "validation": "valid", "test": "test", "testing": "test"}


# --- the dataset table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchFolder:
    """A labelled patch dataset: one row per image, paths relative to ``root``.

    ``splits`` holds normalised split names (train / valid / test) or is None when the dataset has no
    split; ``groups`` is None unless a group column was chosen.
    """

    root: Path
    paths: tuple[str, ...]
    labels: tuple[str, ...]
    splits: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    label_column: str = "label"
    group_column: str | None = None
    layout: str = LABELS_CSV
    mpp: float | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        """Sorted distinct labels."""
        return sorted(set(self.labels))

    def describe(self) -> str:
        return f"{self.root} ({self.layout}, column {self.label_column!r})"

    def indices(self, split: str) -> np.ndarray:
        """Row indices of a split ('train', 'valid', 'test' or 'all'); an empty split is an error.

        A dataset without splits has only 'all' (asking it for 'test' gives every image, logged).
        """
        if split == "all":
            return np.arange(len(self))
        name = SPLIT_ALIASES.get(split.lower())
        if name is None:
            raise DatasetError(f"unknown split {split!r}; use train, valid, test or all")
        if self.splits is None:
            if name == "test":
                log.info("%s has no split column: using all %d images", self.root, len(self))
                return np.arange(len(self))
            raise DatasetError(f"{self.root}: has no split column, so no {name!r} split; use `split`=all")
        idx = np.flatnonzero(np.asarray(self.splits) == name)
        if idx.size == 0:
            present = ", ".join(sorted(set(self.splits)))
            raise DatasetError(f"{self.root}: split {name!r} is empty (the dataset has: {present})")
        return idx

    def label_indices(self, classes: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
        """Labels of ``rows`` as indices into ``classes``; unknown labels are an error."""
        lookup = {c: i for i, c in enumerate(classes)}
        labels = [self.labels[i] for i in (range(len(self)) if rows is None else rows)]
        unknown = sorted({lab for lab in labels if lab not in lookup})
        if unknown:
            raise DatasetError(f"{self.describe()}: unknown labels {', '.join(map(repr, unknown[:5]))} "
                               f"(expected one of {', '.join(classes)})")
        return np.array([lookup[lab] for lab in labels], dtype=np.int64)


def open_patch_folder(root: str | Path, *, label_column: str = "label", split_column: str | None = "split",
                      group_column: str | None = None, require_split_column: bool = False,
                      check_files: bool = True) -> PatchFolder:
    """Read and validate a dataset folder (``labels.csv`` or an ImageFolder tree)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if (root / LABELS_CSV).is_file():
        folder = _read_labels_csv(root, label_column, split_column, group_column, require_split_column)
    else:
        folder = _read_image_tree(root, label_column, group_column, require_split_column)
    if not len(folder):
        raise DatasetError(f"{folder.describe()}: no images")
    if check_files:
        missing = [p for p in folder.paths if not (root / p).is_file()]
        if missing:
            raise DatasetError(f"{root}: {len(missing)} listed images do not exist, e.g. {missing[0]} "
                               "(paths in labels.csv are relative to the dataset folder)")
    dupes = [p for p, n in Counter(folder.paths).items() if n > 1]
    if dupes:
        log.warning("%s: %d images are listed more than once, e.g. %s", root, len(dupes), dupes[0])
    log.debug("%s: %d images, classes %s", folder.describe(), len(folder), ", ".join(folder.classes))
    return folder


def _read_labels_csv(root: Path, label_column: str, split_column: str | None, group_column: str | None,
                     require_split_column: bool) -> PatchFolder:
    path = root / LABELS_CSV
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from None
    have = ", ".join(columns) or "none"
    for name, what in (("path", "path"), (label_column, "`label_column`"), (group_column, "`group_column`")):
        if name is not None and name not in columns:
            raise DatasetError(f"{path}: no column {name!r} for {what} (columns: {have})")
    if require_split_column and split_column not in columns:
        raise DatasetError(f"{path}: no column {split_column!r} for `split_column` (columns: {have})")
    paths, labels = [], []
    for n, row in enumerate(rows, start=2):
        p, lab = (row.get("path") or "").strip(), (row.get(label_column) or "").strip()
        if not p or not lab:
            raise DatasetError(f"{path}: line {n} has an empty {'path' if not p else label_column!r} value")
        if not inside_folder(p):
            raise DatasetError(f"{path}: line {n}: image path {p!r} leaves the dataset folder (paths in {LABELS_CSV} "
                               "are relative to it: no absolute paths, no '..')")
        paths.append(p)
        labels.append(lab)
    splits = None
    if split_column and split_column in columns:
        splits = _normalise_splits(path, split_column, [(r.get(split_column) or "").strip() for r in rows])
    groups = None
    if group_column:
        groups = tuple((r.get(group_column) or "").strip() for r in rows)
        if not all(groups):
            raise DatasetError(f"{path}: some rows have an empty {group_column!r} value")
    return PatchFolder(root=root, paths=tuple(paths), labels=tuple(labels), splits=splits, groups=groups,
                       label_column=label_column, group_column=group_column, layout=LABELS_CSV,
                       mpp=_mpp_from_rows(path, rows) if "mpp" in columns else None)


def inside_folder(relative: str) -> bool:
    """Whether a ``labels.csv`` path stays inside the dataset folder: relative, without ``..``, no drive.

    Checked on the text (``/`` and ``\\`` both count as separators), so a file made on another system cannot
    point at ``/etc/passwd`` or ``..\\..\\secrets``. Symbolic links inside the folder are the owner's choice and
    are followed.
    """
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    return not (posix.is_absolute() or windows.anchor or ".." in windows.parts)


def _normalise_splits(path: Path, column: str, values: list[str]) -> tuple[str, ...] | None:
    if not any(values):
        log.info("%s: column %r is empty; treating the dataset as unsplit", path, column)
        return None
    if not all(values):
        raise DatasetError(f"{path}: {sum(not v for v in values)} rows have no {column!r} value "
                           "(use train, valid or test for every row, or leave the column empty)")
    unknown = sorted({v for v in values if v.lower() not in SPLIT_ALIASES})
    if unknown:
        raise DatasetError(f"{path}: unknown {column!r} values {', '.join(map(repr, unknown[:5]))} "
                           "(use train, valid or test)")
    return tuple(SPLIT_ALIASES[v.lower()] for v in values)


def _mpp_from_rows(path: Path, rows: list[dict[str, str]]) -> float | None:
    try:
        values = {float(r["mpp"]) for r in rows if (r.get("mpp") or "").strip()}
    except ValueError:
        raise DatasetError(f"{path}: column 'mpp' holds a value that is not a number") from None
    if len(values) == 1:
        return values.pop()
    if values:
        log.warning("%s: patches have %d different mpp values; set `mpp` to record one", path, len(values))
    return None


def _read_image_tree(root: Path, label_column: str, group_column: str | None,
                     require_split_column: bool) -> PatchFolder:
    if label_column != "label" or group_column or require_split_column:
        raise DatasetError(f"{root}: has no {LABELS_CSV}; `label_column`, `group_column` and `split_column` "
                           "need one (an ImageFolder tree has only folder-name labels)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DatasetError(f"{root}: neither {LABELS_CSV} nor class folders found (a labels.csv, "
                           "or one folder of images per class)")
    split_layout = all(p.name.lower() in SPLIT_ALIASES for p in subdirs)
    paths: list[str] = []
    labels: list[str] = []
    splits: list[str] = []
    for top in subdirs:
        class_dirs = sorted(p for p in top.iterdir() if p.is_dir()) if split_layout else [top]
        for class_dir in class_dirs:
            for image in sorted(class_dir.rglob("*")):
                if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file():
                    paths.append(image.relative_to(root).as_posix())
                    labels.append(class_dir.name)
                    splits.append(SPLIT_ALIASES[top.name.lower()] if split_layout else "")
    return PatchFolder(root=root, paths=tuple(paths), labels=tuple(labels),
                       splits=tuple(splits) if split_layout else None, label_column="label",
                       layout="split/class folders" if split_layout else "class folders")


# --- splits ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Row indices used for fitting (``train``) and for every choice (``valid``); how they were made."""

    train: np.ndarray
    valid: np.ndarray
    source: str  # "dataset" (the dataset's own split) or "carved" (from train, seeded)
    description: str


def make_split(folder: PatchFolder, *, valid_fraction: float = 0.15, seed: int = 0,
               carve_valid: bool = False) -> Split:
    """Train and validation rows: the dataset's own, or valid carved from train (stratified, grouped).

    Test rows are never returned. A dataset without a split column is all training data. With
    ``carve_valid`` the dataset's own valid rows are left unused (held out like test) and validation is
    carved from train.
    """
    if folder.splits is None:
        pool, own_valid = np.arange(len(folder)), np.zeros(0, np.int64)
    else:
        pool, own_valid = _rows(folder, "train"), _rows(folder, "valid")
        if pool.size == 0:
            raise DatasetError(f"{folder.root}: split 'train' is empty; training needs train rows")
    if carve_valid and own_valid.size:
        log.info("%s: leaving the dataset's %d valid images unused (`carve_valid`)", folder.root, own_valid.size)
        own_valid = np.zeros(0, np.int64)
    if own_valid.size:
        _warn_group_leaks(folder)
        return Split(train=pool, valid=own_valid, source="dataset",
                     description=f"dataset split: {pool.size} train, {own_valid.size} valid")
    if folder.splits is not None:
        _warn_group_leaks(folder)
    train, valid = carve_validation(folder, pool, valid_fraction=valid_fraction, seed=seed)
    how = f"grouped by {folder.group_column!r}, " if folder.groups is not None else ""
    return Split(train=train, valid=valid, source="carved",
                 description=f"valid carved from train ({how}stratified by label, fraction {valid_fraction}, "
                             f"seed {seed}): {train.size} train, {valid.size} valid")


def _rows(folder: PatchFolder, name: str) -> np.ndarray:
    if folder.splits is None:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.asarray(folder.splits) == name)


def carve_validation(folder: PatchFolder, pool: np.ndarray, *, valid_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` rows into (train, valid): stratified by label, by group when the folder has groups."""
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"valid fraction must be between 0 and 1, got {valid_fraction}")
    labels = np.asarray(folder.labels)[pool]
    counts = Counter(labels.tolist())
    if len(counts) < 2:
        raise DatasetError(f"{folder.describe()}: training rows hold only one class ({next(iter(counts))})")
    if folder.groups is not None:
        from sklearn.model_selection import StratifiedGroupKFold

        groups = np.asarray(folder.groups)[pool]
        n_splits = max(2, round(1.0 / valid_fraction))
        if len(set(groups.tolist())) < n_splits:
            raise DatasetError(f"{folder.root}: only {len(set(groups.tolist()))} groups in "
                               f"{folder.group_column!r}; too few to carve a grouped validation split")
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # small classes: sklearn warns, the split is still valid
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            train_pos, valid_pos = next(cv.split(np.zeros(len(pool)), labels, groups))
    else:
        from sklearn.model_selection import train_test_split

        rare = [c for c, n in counts.items() if n < 2]
        if rare:
            raise DatasetError(f"{folder.describe()}: class {rare[0]!r} has a single training image; cannot "
                               "carve a stratified validation split (add a 'valid' split)")
        n_valid = max(len(counts), math.ceil(valid_fraction * len(pool)))
        train_pos, valid_pos = train_test_split(np.arange(len(pool)), test_size=n_valid, stratify=labels,
                                                random_state=seed)
    train, valid = np.sort(pool[train_pos]), np.sort(pool[valid_pos])
    missing = sorted(set(counts) - set(labels[valid_pos].tolist()))
    if missing:
        log.warning("%s: carved validation split has no %s images", folder.root, ", ".join(missing))
    return train, valid


def group_leaks(folder: PatchFolder) -> dict[str, set[str]]:
    """Groups that appear in more than one split of the dataset's own split column."""
    if folder.groups is None or folder.splits is None:
        return {}
    seen: dict[str, set[str]] = {}
    for g, s in zip(folder.groups, folder.splits, strict=True):
        seen.setdefault(g, set()).add(s)
    return {g: s for g, s in seen.items() if len(s) > 1}


def _warn_group_leaks(folder: PatchFolder) -> None:
    leaks = group_leaks(folder)
    if leaks:
        g = next(iter(leaks))
        log.warning("%s: %d %r groups appear in more than one split (e.g. %s in %s): the dataset's split "
                    "leaks", folder.root, len(leaks), folder.group_column, g, ", ".join(sorted(leaks[g])))


def write_split_csv(path: Path, folder: PatchFolder, split: Split) -> None:
    """Record which rows trained and which validated (``split.csv`` in the model folder)."""
    assigned = [(int(i), "train") for i in split.train] + [(int(i), "valid") for i in split.valid]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"] + (["group"] if folder.groups is not None else []))
        for i, name in sorted(assigned):
            extra = [folder.groups[i]] if folder.groups is not None else []
            writer.writerow([folder.paths[i], folder.labels[i], name, *extra])


def read_trained_images(path: Path, role: str = "train") -> set[tuple[str, str]]:
    """(path, label) of every image a model's ``split.csv`` (:func:`write_split_csv`) marks ``role``: ``train``,
    the images that trained it, which under cross-validation are the whole pool (each image trained all fold
    models but one), or ``valid``, those that chose its epoch and threshold. Empty when there is no such file."""
    if not path.is_file():
        return set()
    with path.open(newline="", encoding="utf-8") as fh:
        return {(row["path"], row["label"]) for row in csv.DictReader(fh) if row.get("split") == role}


def file_digests(folder: PatchFolder, rows: Rows, *, workers: int = 4) -> list[str]:
    """sha256 of each row's file bytes, in row order."""
    def digest(i: int) -> str:
        return hashlib.sha256((folder.root / folder.paths[i]).read_bytes()).hexdigest()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(digest, rows))


def fingerprint(folder: PatchFolder, rows: Rows, roles: Sequence[str], *, workers: int = 4,
                digests: Sequence[str] | None = None) -> str:
    """sha256 over (path, label, role, sha256 of the file's bytes) of the given rows, in path order (``digests``:
    the rows' :func:`file_digests`, where the caller has them)."""
    if digests is None:
        digests = file_digests(folder, rows, workers=workers)
    h = hashlib.sha256()
    for line in sorted(f"{folder.paths[i]}\t{folder.labels[i]}\t{role}\t{d}\n"
                       for i, role, d in zip(rows, roles, digests, strict=True)):
        h.update(line.encode())
    return "sha256:" + h.hexdigest()


# --- decoding --------------------------------------------------------------------------------------------
def read_image(path: Path, *, in_dataset: bool = False) -> np.ndarray:
    """Decode one image as uint8 RGB (H, W, 3); an unreadable file is a :class:`DatasetError` (``in_dataset``: one
    of a dataset's images, and the message says to fix or remove it there)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc, in_dataset=in_dataset) from None


def _unreadable(path: Path, exc: Exception, *, in_dataset: bool) -> DatasetError:
    fix = "; fix or remove it from the dataset" if in_dataset else ""
    return DatasetError(f"{path}: unreadable image ({exc}){fix}")


def _read_resized(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    arr = read_image(path, in_dataset=True)
    shape = (arr.shape[1], arr.shape[0])
    if arr.shape[:2] != (size, size):
        arr = resize_uint8(numpy_to_tensor(arr)[None], size)[0].numpy()
    return arr, shape


@dataclass(frozen=True)
class LoadedImages:
    """Images decoded into memory (uint8 NHWC at one size) and the sizes they had on disk."""

    images: np.ndarray
    original_sizes: Counter[tuple[int, int]]


def iter_images(folder: PatchFolder, rows: Rows, size: int, *, workers: int = 2,
                chunk: int = 512) -> Iterator[LoadedImages]:
    """Decode ``rows`` in order, ``chunk`` at a time (bounded memory), resized to ``size`` where needed."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(rows), chunk):
            paths = [folder.root / folder.paths[i] for i in rows[start:start + chunk]]
            decoded = list(pool.map(lambda p: _read_resized(p, size), paths))
            yield LoadedImages(images=np.stack([a for a, _ in decoded]),
                               original_sizes=Counter(shape for _, shape in decoded))


def load_images(folder: PatchFolder, rows: Rows, size: int, *, workers: int = 2,
                desc: str = "decoding") -> LoadedImages:
    """Decode ``rows`` into one uint8 array (N, size, size, 3), resizing where needed, with a progress bar."""
    parts: list[np.ndarray] = []
    sizes: Counter[tuple[int, int]] = Counter()
    with progress.bar(total=len(rows), desc=desc, unit="img") as bar:
        for loaded in iter_images(folder, rows, size, workers=workers):
            parts.append(loaded.images)
            sizes.update(loaded.original_sizes)
            bar.update(len(loaded.images))
    images = np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)
    return LoadedImages(images=images, original_sizes=sizes)


def image_sizes(folder: PatchFolder, rows: Rows) -> Counter[tuple[int, int]]:
    """(width, height) of the images at ``rows``, from their headers (no decoding)."""
    sizes: Counter[tuple[int, int]] = Counter()
    for i in rows:
        path = folder.root / folder.paths[i]
        try:
            with Image.open(path) as im:
                sizes[im.size] += 1
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise _unreadable(path, exc, in_dataset=True) from None
    return sizes


class PatchImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Streams images from disk (for datasets too big to decode into memory): (uint8 HWC tensor, label).

    Holds only paths, so it pickles cheaply to DataLoader workers.
    """

    def __init__(self, folder: PatchFolder, rows: Rows, targets: Rows, size: int) -> None:
        self.paths = [folder.root / folder.paths[i] for i in rows]
        self.targets = [int(t) for t in targets]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr, _ = _read_resized(self.paths[i], self.size)
        return torch.from_numpy(np.array(arr)), self.targets[i]


class BatchSource:
    """uint8 NHWC batches and targets for training and validation, from memory or streamed from disk."""

    def __init__(self, targets: np.ndarray, *, images: torch.Tensor | None = None,
                 stream: PatchImageDataset | None = None, workers: int = 0, pin_memory: bool = False) -> None:
        if (images is None) == (stream is None):
            raise ValueError("give images or stream")
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.int64))
        self.images = images
        self.stream = stream
        self.workers = workers
        #: pin streamed batches in page-locked memory (for a faster, asynchronous copy to a CUDA GPU)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        """Bytes of the images held in memory (0 for a source streamed from disk)."""
        return 0 if self.images is None else self.images.nbytes

    def to(self, device: torch.device) -> None:
        """Move the images held in memory to ``device`` (batches are then cut there); a stream stays as it is."""
        if self.images is not None:
            self.images = self.images.to(device)

    def batches(self, batch_size: int, *, order: torch.Tensor | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in ``order`` (a permutation of rows; default: in order)."""
        order = torch.arange(len(self)) if order is None else order
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        if self.images is not None:
            for i in range(0, stop, batch_size):
                idx = order[i:i + batch_size]
                yield self.images[idx], self.targets[idx]
            return
        loader = torch.utils.data.DataLoader(self.stream, batch_size=batch_size,  # type: ignore[arg-type]
                                             sampler=order[:stop].tolist(), num_workers=self.workers,
                                             drop_last=drop_last, pin_memory=self.pin_memory)
        yield from loader


def in_memory(n: int, size: int, cache_limit_mb: float) -> bool:
    """Whether ``n`` images of ``size`` px fit the decode-into-memory limit (a setting, never free RAM)."""
    return n * size * size * 3 <= cache_limit_mb * 2**20


def subset(folder: PatchFolder, rows: Rows) -> PatchFolder:
    """A folder holding only ``rows`` (same root)."""
    pick = list(rows)
    return replace(folder, paths=tuple(folder.paths[i] for i in pick),
                   labels=tuple(folder.labels[i] for i in pick),
                   splits=None if folder.splits is None else tuple(folder.splits[i] for i in pick),
                   groups=None if folder.groups is None else tuple(folder.groups[i] for i in pick))
