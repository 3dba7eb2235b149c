"""A training dataset's inputs, shared by whole-network training (:mod:`wsi_screen.training.train`) and heads on
an encoder (:mod:`wsi_screen.training.heads`): the dataset read and split, its positive class, the input size
and the patches' mpp, and the columns of ``history.csv``."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from wsi_screen.errors import ConfigError, DatasetError
from wsi_screen.models import ModelSpec
from wsi_screen.models.registry import fixed_input_size
from wsi_screen.training.config import TrainConfig
from wsi_screen.training.data import PatchFolder, Split, image_sizes, make_split, open_patch_folder

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy",
                   "valid_balanced_accuracy", "valid_auc", "monitor", "seconds", "best")


#: words in a class name that make it the positive (screening) class
POSITIVE_CLASS_WORDS = frozenset({"tumour", "tumor", "abnormal", "cancer", "cancerous", "malignant", "positive",
                            "metastasis", "metastatic", "carcinoma", "aca", "adenocarcinoma", "lesion"})


# --- preparing the data ----------------------------------------------------------------------------------
def resolve_positive(classes: list[str], positive: str | None) -> str | None:
    """The positive (disease) class: the one given, else for two classes the one whose name says so."""
    if positive is not None:
        if positive not in classes:
            raise ConfigError(f"`positive` {positive!r} is not one of the classes ({', '.join(classes)})")
        return positive
    if len(classes) != 2:
        return None
    matches = [c for c in classes if set(re.split(r"[^a-z0-9]+", c.lower())) & POSITIVE_CLASS_WORDS]
    if len(matches) != 1:
        raise ConfigError(f"cannot tell which class is positive; set `positive` (one of "
                          f"{', '.join(classes)})")
    log.info("positive class: %s (from its name; `positive` chooses another)", matches[0])
    return matches[0]


def resolve_size(config: TrainConfig, folder: PatchFolder, rows: np.ndarray,
                 pretrained: ModelSpec | None) -> tuple[int, Counter[tuple[int, int]]]:
    fixed = fixed_input_size(config.arch)
    sizes = image_sizes(folder, rows)
    if config.size is not None:
        return config.size, sizes
    if fixed is not None:
        return fixed, sizes
    if pretrained is not None:
        return pretrained.input_size, sizes
    (w, h), _ = sizes.most_common(1)[0]
    if w != h:
        raise ConfigError(f"{folder.root}: images are {w}x{h} px, not square; set `size`")
    return w, sizes


def read_split(dataset: str | Path, config: TrainConfig) -> tuple[PatchFolder, Split, list[str], str | None]:
    """Read and validate the dataset and split it: (folder, split, classes, positive class)."""
    folder = open_patch_folder(dataset, label_column=config.label_column, split_column=config.split_column,
                               group_column=config.group_column,
                               require_split_column=config.require_split_column)
    split = make_split(folder, valid_fraction=config.valid_fraction, seed=config.seed,
                       carve_valid=config.carve_valid)
    log.info("%s: %s", folder.root, split.description)
    train_labels = {folder.labels[i] for i in split.train}
    stray = sorted({folder.labels[i] for i in split.valid} - train_labels)
    if stray:
        raise DatasetError(f"{folder.describe()}: labels {', '.join(stray)} occur in valid but not in train")
    classes = sorted(train_labels)
    if len(classes) < 2:
        raise DatasetError(f"{folder.describe()}: training rows hold a single class ({classes[0]})")
    return folder, split, classes, resolve_positive(classes, config.positive)


def resolve_mpp(config: TrainConfig, folder: PatchFolder, sizes: Counter[tuple[int, int]], size: int, *,
                warn_missing: bool = False, encoder: tuple[str, float | None] | None = None) -> float | None:
    """The model's mpp: the training patches' (``config.mpp``, else the dataset's mpp column; a warning when they
    differ) at the input ``size`` they are resized to from their ``sizes`` (:func:`mpp_at_size`). None
    is logged as information, or as a warning with ``warn_missing`` (a head model). ``encoder`` (its name and
    recorded mpp) is never taken for the patches' mpp: that is the resolution the encoder was trained at, a fact
    about it, not about patches cut elsewhere, and a wrong mpp would make ``infer`` tile slides at the wrong scale
    without a word; the warning offers it as the value to set if the patches were cut at it."""
    mpp = config.mpp if config.mpp is not None else folder.mpp
    if config.mpp is not None and folder.mpp is not None \
            and not math.isclose(config.mpp, folder.mpp, rel_tol=0.05):
        log.warning("`mpp` %.3g differs from the dataset's mpp column (%.3g); recording %.3g", config.mpp,
                    folder.mpp, config.mpp)
    if mpp is None and warn_missing:
        name, trained_at = encoder if encoder is not None else ("", None)
        hint = "" if trained_at is None else \
            f" (the encoder {name} was trained at {trained_at:g} um/px: `mpp`={trained_at:g} if the patches were cut " \
            "at that; it is not assumed)"
        log.warning("training patches have no recorded mpp: the model will score patches (evaluate, predict) but "
                    "infer cannot apply it to slides without the patches' mpp; set `mpp` to their um/px%s", hint)
    elif mpp is None:
        log.info("training patches have no recorded mpp; set `mpp` so the model can be applied to slides")
    return None if mpp is None else mpp_at_size(mpp, sizes, size)


def mpp_at_size(mpp: float, sizes: Counter[tuple[int, int]], size: int) -> float:
    """The um/px of images of ``sizes`` (width, height: count) at ``mpp`` once resized to ``size`` px: the scale the
    model learns and ``infer`` must tile slides at (``mpp`` x S / ``size`` for images of S px). Images of several
    sizes (or not square) end at several scales: a warning, and the most common size's is taken."""
    (w, h), _ = sizes.most_common(1)[0]
    scaled = mpp * w / size
    if len(sizes) > 1 or w != h:
        log.warning("the training images are not all %dx%d px (%s): resized to %d px they end at different scales; "
                    "recording the most common's, %.4g um/px (cut the patches at one size for one scale)",
                    w, h, ", ".join(f"{k} of {a}x{b}" for (a, b), k in sorted(sizes.items())), size, scaled)
    if w != size:
        log.info("images of %d px at %.4g um/px resized to %d px: recording the model's mpp as %.4g um/px "
                 "(infer tiles slides at it)", w, mpp, size, scaled)
    return scaled


def log_resizing(sizes: Counter[tuple[int, int]], size: int, n: int) -> None:
    other = {s: k for s, k in sizes.items() if s != (size, size)}
    if other:
        log.info("resizing %d of %d images to %dx%d px (%s)", sum(other.values()), n, size, size,
                 ", ".join(f"{k} of {w}x{h}" for (w, h), k in sorted(other.items())))
