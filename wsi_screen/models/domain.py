"""Domain distance: how far an image is from the data the model was trained on.

A patch classifier answers every input, including tissue it never saw (skin, colon, a Pap smear): its
probabilities then mean little. The model's own features say when that happens. Two views of an image are
taken from the same forward pass that scores it:

* ``penultimate``: the features the classifier layer receives (what the model "sees");
* ``stem``: the mean and standard deviation of each feature map of the network's first stage, pooled 2x2
  (colour and texture statistics: stain, tissue type and scanner show there first).

For each, a class-conditional Gaussian with one shared covariance is fitted on the training split (Lee et
al. 2018, "Mahalanobis" out-of-distribution detection; Ledoit-Wolf shrinkage keeps the covariance well
conditioned); an image's squared Mahalanobis distance to the nearest class mean is divided by its median
on the valid split. The **domain distance** is ``stem + 0.25 * penultimate`` of those (:data:`WEIGHTS`:
chosen on the measurements in docs/default-model.md, where the penultimate features alone missed
colorectal tiles and the QC tiles). The threshold is the distance that flags :data:`FLAG_RATE` (1 %) of the
**valid** split: an image is ``in_domain`` when its distance is at most the threshold. A sample flags a whole
number of images, the nearest to 1 % of it (:func:`flag_threshold`: 1 of 100, 10 of 1,000; none of 50 or fewer,
where the threshold is the largest valid distance); ``domain.json`` records the share flagged.

Stored beside the model's weights, never pickled: ``domain.safetensors`` (per view, the whitening matrix
and the whitened class means) and ``domain.json`` (threshold, scales, weights, what it was fitted and
calibrated on, and the slide rule: the least fraction of a slide's patches that must be in domain,
:data:`SLIDE_MIN_IN_DOMAIN`). It costs a few matrix products per batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_screen.errors import ModelError

DOMAIN_WEIGHTS = "domain.safetensors"
DOMAIN_CONFIG = "domain.json"
#: fraction of the valid split the threshold flags
FLAG_RATE = 0.01
#: default slide rule: a slide with fewer than this fraction of its patches in domain is out of domain
SLIDE_MIN_IN_DOMAIN = 0.5
#: the views of an image and their weights in the distance
WEIGHTS = {"stem": 1.0, "penultimate": 0.25}

Features = dict[str, torch.Tensor]


def _stem(module: nn.Module) -> nn.Module:
    """The network's first stage: timm's first feature module (``act1`` of a ResNet), else the first
    convolution (``screen_cnn32``)."""
    info = getattr(module, "feature_info", None)
    if info:
        try:
            first = info[0]["module"] if isinstance(info, list) else info.module_name(0)
            found: nn.Module = dict(module.named_modules())[first]
            return found
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            return sub
    raise ModelError(f"{type(module).__name__} has no convolutional stem to take statistics from")


@contextmanager
def feature_tap(module: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect each forward pass's ``penultimate`` features (the classifier layer's input) and ``stem``
    statistics (mean and sd of each first-stage feature map) as (N, D) float tensors.

    Works for every architecture here: timm models and ``screen_cnn32`` expose ``get_classifier()``.
    """
    get = getattr(module, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise ModelError(f"{type(module).__name__} has no classifier layer to take features from")
    captured: dict[str, list[torch.Tensor]] = {"stem": [], "penultimate": []}

    def on_head(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured["penultimate"].append(inputs[0].detach().flatten(1).float())

    def on_stem(_m: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured["stem"].append(stem_statistics(output.detach().float()))

    handles = [head.register_forward_pre_hook(on_head), _stem(module).register_forward_hook(on_stem)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def stem_statistics(maps: torch.Tensor) -> torch.Tensor:
    """(N, 2C): each channel's mean and standard deviation over the 2x2-pooled feature map.

    Pooling first keeps the cost a few percent of the forward pass (the stem's maps are the network's
    largest); the mean is exact, the sd is that of 2x2 block means (a texture statistic all the same).
    Both come from average pooling, which runs fast on channels-last tensors.
    """
    if maps.shape[-1] >= 4 and maps.shape[-2] >= 4:
        maps = nn.functional.avg_pool2d(maps, 2)
    mean = nn.functional.adaptive_avg_pool2d(maps, 1).flatten(1)
    square = nn.functional.adaptive_avg_pool2d(maps * maps, 1).flatten(1)
    return torch.cat([mean, (square - mean * mean).clamp_min(0).sqrt()], dim=1)


def joined(captured: dict[str, list[torch.Tensor]]) -> Features:
    """:func:`feature_tap`'s lists as one (N, D) tensor per view."""
    return {k: torch.cat(v) if v else torch.zeros(0, 0) for k, v in captured.items()}


def collect_features(module: nn.Module, batches: Iterable[torch.Tensor | np.ndarray],
                     mean: torch.Tensor, std: torch.Tensor) -> Features:
    """Both views (see :func:`feature_tap`) of uint8 NHWC ``batches`` at the model's input size, normalised
    with ``mean``/``std`` (1, 3, 1, 1) as in training and inference. The batches run on the device of ``mean``
    (the model's); the features come back on the CPU."""
    from wsi_screen.models.pixels import normalise, to_unit_float

    module.eval()
    with torch.inference_mode(), feature_tap(module) as captured:
        for batch in batches:
            module(normalise(to_unit_float(torch.as_tensor(batch).to(mean.device)), mean, std))
    return {k: v.cpu() for k, v in joined(captured).items()}


@dataclass(frozen=True)
class View:
    """One view's Gaussian: ``whiten`` (D, D) and the whitened class means (C, D); distances are divided by
    ``scale`` (their median on the valid split) and weighted by ``weight``."""

    whiten: torch.Tensor = field(repr=False)
    means_w: torch.Tensor = field(repr=False)
    scale: float = 1.0
    weight: float = 1.0

    def __repr__(self) -> str:  # the tensors are thousands of numbers; their shapes say what the view is
        return (f"View({self.whiten.shape[0]} features, {self.means_w.shape[0]} classes, scale={self.scale:.4g}, "
                f"weight={self.weight:.4g})")

    def squared(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row to the nearest class mean, over ``scale``."""
        x = torch.as_tensor(features, dtype=torch.float32).flatten(1)
        if x.shape[1] != self.whiten.shape[0]:
            raise ModelError(f"domain model expects {self.whiten.shape[0]} features, got {x.shape[1]}")
        return torch.cdist(x @ self.whiten, self.means_w).square().min(dim=1).values / self.scale


@dataclass(frozen=True)
class DomainModel:
    """The fitted distance (see the module docstring)."""

    views: dict[str, View]
    threshold: float
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # one line: the views by name (their tensors are thousands of numbers), not ``info``
        views = ", ".join(f"{k}: {v!r}" for k, v in self.views.items())
        return (f"DomainModel(views={{{views}}}, threshold={self.threshold:.4g}, "
                f"slide_min_in_domain={self.slide_min_in_domain:.4g})")

    @property
    def slide_min_in_domain(self) -> float:
        """Least fraction of a slide's patches in domain for the slide to count as in domain."""
        return float(self.info.get("slide_min_in_domain", SLIDE_MIN_IN_DOMAIN))

    def distance(self, features: Features) -> np.ndarray:
        """Domain distance of each image from its views' features (see :func:`feature_tap`)."""
        missing = set(self.views) - set(features)
        if missing:
            raise ModelError(f"domain model needs the {', '.join(sorted(missing))} features")
        total = sum(v.weight * v.squared(features[k]) for k, v in self.views.items())
        return torch.as_tensor(total).numpy().astype(np.float32)

    def in_domain(self, distance: np.ndarray) -> np.ndarray:
        return np.asarray(distance) <= self.threshold

    # --- files ----------------------------------------------------------------------------------------------
    def save(self, model_dir: str | Path) -> None:
        """Write ``domain.safetensors`` and ``domain.json`` into ``model_dir``."""
        from wsi_screen._safe_write import atomic_write_text
        from wsi_screen.models.checkpoint import write_safetensors

        out = Path(model_dir)
        tensors = {f"{k}.{name}": t.contiguous() for k, v in self.views.items()
                   for name, t in (("whiten", v.whiten), ("means_w", v.means_w))}
        write_safetensors(out / DOMAIN_WEIGHTS, tensors, {"format": "pt"})
        views = {k: {"scale": v.scale, "weight": v.weight, "features": int(v.whiten.shape[0])}
                 for k, v in self.views.items()}
        atomic_write_text(out / DOMAIN_CONFIG, json.dumps({"threshold": self.threshold, "views": views, **self.info},
                                                     indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> DomainModel | None:
        """The model folder's domain model, or None when it has none (models trained before it existed)."""
        folder = Path(model_dir)
        if not (folder / DOMAIN_CONFIG).exists():
            return None
        from wsi_screen.models.checkpoint import read_weights

        try:
            info = json.loads((folder / DOMAIN_CONFIG).read_text(encoding="utf-8"))
            tensors = read_weights(folder / DOMAIN_WEIGHTS)
            threshold = float(info.pop("threshold"))
            views = {k: View(whiten=tensors[f"{k}.whiten"].float(), means_w=tensors[f"{k}.means_w"].float(),
                             scale=float(v["scale"]), weight=float(v["weight"]))
                     for k, v in info.pop("views").items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{folder}: unreadable domain model ({DOMAIN_CONFIG}, {DOMAIN_WEIGHTS}): {exc}") from exc
        square = all(v.whiten.ndim == 2 and v.whiten.shape[0] == v.whiten.shape[1]
                     and v.means_w.shape[1:] == v.whiten.shape[1:] for v in views.values())
        if not views or not math.isfinite(threshold) or not square:
            raise ModelError(f"{folder}: malformed domain model ({DOMAIN_WEIGHTS})")
        return cls(views=views, threshold=threshold, info=info)


def _gaussian(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Whitening matrix and whitened class means of a shared-covariance Gaussian (and its shrinkage)."""
    from sklearn.covariance import LedoitWolf

    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    cov = LedoitWolf(assume_centered=True).fit(x - means[np.searchsorted(classes, y)])
    precision = np.linalg.inv(cov.covariance_)
    whiten = np.linalg.cholesky((precision + precision.T) / 2.0)  # precision = L L^T: d^2 = |(x - mu) L|^2
    return torch.from_numpy(whiten).float(), torch.from_numpy(means @ whiten).float(), float(cov.shrinkage_)


def flag_threshold(distances: np.ndarray, flag_rate: float) -> float:
    """The threshold that flags (distance above it) the whole number of ``distances`` nearest to ``flag_rate`` of
    them: the next lower distance below the ``round(flag_rate * n)`` largest (fewer where distances tie; none, the
    largest distance, where that rounds to 0). A quantile (``method="higher"``) read with ``in_domain``'s ``<=``
    flagged none of 100 images and 9 of 1,000 instead of 1 and 10."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    k = min(len(d) - 1, round(flag_rate * len(d)))
    return float(d[len(d) - 1 - k])


def fit(train: Features, train_labels: np.ndarray, valid: Features, *, flag_rate: float = FLAG_RATE,
        weights: dict[str, float] | None = None, info: dict[str, Any] | None = None,
        calibrated_on: str = "valid") -> DomainModel:
    """Fit each view on the training split's features, scale it and set the threshold on the valid split's.
    ``calibrated_on`` names the images ``valid`` holds (``train`` where there is no unseen split: cross-validation
    passes the training images themselves), for ``domain.json``."""
    weights = dict(WEIGHTS if weights is None else weights)
    y = np.asarray(train_labels)
    n = {len(train[k]) for k in weights}
    if n == {0} or len(n) != 1 or any(len(valid[k]) == 0 for k in weights) or len(y) not in n:
        raise ModelError("the domain model needs training and validation features of every view")
    views, shrinkage = {}, {}
    for key, weight in weights.items():
        whiten, means_w, shrinkage[key] = _gaussian(np.asarray(train[key], dtype=np.float64), y)
        raw = View(whiten=whiten, means_w=means_w)
        scale = float(np.median(raw.squared(valid[key]).numpy())) or 1.0
        views[key] = View(whiten=whiten, means_w=means_w, scale=scale, weight=weight)
    model = DomainModel(views=views, threshold=math.inf)
    valid_d = model.distance(valid)
    threshold = flag_threshold(valid_d, flag_rate)
    details = {
        "method": "per view (stem statistics, penultimate features): class-conditional Gaussian with a shared "
                  "Ledoit-Wolf covariance; squared Mahalanobis distance to the nearest class mean over its valid "
                  "median; distance = weighted sum of the views",
        "fitted_on": {"split": "train", "n": int(next(iter(n)))},
        "threshold_rule": f"flags {flag_rate:.0%} of the {calibrated_on} split",
        "calibrated_on": {"split": calibrated_on, "n": len(valid_d),
                          "flagged_fraction": float(np.mean(valid_d > threshold))},
        "shrinkage": shrinkage, "slide_min_in_domain": SLIDE_MIN_IN_DOMAIN,
        **(info or {}),
    }
    return DomainModel(views=views, threshold=threshold, info=details)
