"""PatchClassifier: a model with its contract, ready to score uint8 RGB patches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsi_screen.errors import ModelError
from wsi_screen.metrics import decide
from wsi_screen.models.device import resolve_device
from wsi_screen.models.domain import DomainModel, feature_tap, joined
from wsi_screen.models.pixels import ImageBatch, as_uint8_batch, normalise, numpy_to_tensor, resize_uint8, to_unit_float
from wsi_screen.models.precision import DOMAIN_REFINE_BAND, REFINE_BAND, autocast, resolve
from wsi_screen.models.spec import ModelSpec

log = logging.getLogger(__name__)


class PatchClassifier:
    """A patch classifier: ``module`` (eval mode, channels-last, CPU unless moved) and its ``spec``.

    ``predict(images)`` returns class probabilities (N, C) in ``spec.classes`` order for uint8 RGB images
    (N, H, W, 3) or a list of arrays / PIL images. Images of another size are resized to the model input,
    with a logged warning. For streaming large numbers of patches, use :meth:`preprocess` and
    :meth:`predict_tensor` with your own DataLoader.

    ``precision`` is the forward pass's arithmetic (see :mod:`wsi_screen.models.precision`): ``fp32``,
    ``bf16``, or ``auto`` (bf16 where the device computes it natively); :attr:`precision` holds the resolved one.
    """

    def __init__(self, module: nn.Module, spec: ModelSpec, *, device: str | torch.device = "cpu",
                 domain: DomainModel | None = None, precision: str = "fp32") -> None:
        self.spec = spec
        #: the folder the model was loaded from (its slide rule, card and domain model live there); None for a
        #: classifier built in memory
        self.model_dir: Path | None = None
        #: how far inputs are from the training data (see :mod:`wsi_screen.models.domain`); None if not fitted
        self.domain = domain
        self.device = resolve_device(device)
        #: ``fp32`` or ``bf16``: what the forward pass computes in
        self.precision = resolve(precision, self.device)
        #: probabilities (of the positive class) that decide something: in ``bf16``, scores near them are
        #: rescored in float32 (see :meth:`score_tensor`); the model's own threshold, plus what a slide rule adds
        self.decision_thresholds: tuple[float, ...] = () if spec.threshold is None else (float(spec.threshold),)
        self.module = module.to(self.device).to(memory_format=torch.channels_last).eval()
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self._warned_sizes: set[tuple[int, int]] = set()

    def __repr__(self) -> str:
        return (f"PatchClassifier(arch={self.spec.arch!r}, classes={self.spec.classes}, "
                f"input_size={self.spec.input_size}, mpp={self.spec.mpp}, precision={self.precision!r})")

    @property
    def classes(self) -> list[str]:
        return self.spec.classes

    def to(self, device: str | torch.device) -> PatchClassifier:
        """Move the model to another device (``cpu``, ``auto``, ``cuda``, ``cuda:N``, ``mps`` or a
        :class:`torch.device`; returns self)."""
        self.device = resolve_device(device)
        self.module.to(self.device)
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        return self

    def _warn_resize(self, h: int, w: int) -> None:
        if (h, w) not in self._warned_sizes:
            self._warned_sizes.add((h, w))
            size = self.spec.input_size
            log.warning("images of %dx%d px are resized to the model input of %dx%d px", w, h, size, size)

    def preprocess(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, H, W, 3) -> normalised float (N, 3, S, S), channels-last, on the model's device."""
        x = numpy_to_tensor(batch) if isinstance(batch, np.ndarray) else batch
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ModelError(f"preprocess expects uint8 (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        size = self.spec.input_size
        if x.shape[1] != size or x.shape[2] != size:
            self._warn_resize(int(x.shape[1]), int(x.shape[2]))
            x = resize_uint8(x, size)
        return normalise(to_unit_float(x.to(self.device, non_blocking=True)), self._mean, self._std)

    def predict_tensor(self, x: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
        """Probabilities (N, C) for a preprocessed batch, under ``torch.inference_mode`` (and bfloat16
        autocast when ``precision``, default :attr:`precision`, is ``bf16``; the softmax is float32 either
        way). One forward pass, nothing refined: :meth:`score_tensor` is what scoring uses."""
        with torch.inference_mode():
            with autocast(precision or self.precision, self.device):
                logits = self.module(x.to(self.device))
            return torch.softmax(logits.float(), dim=1)

    def score_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """Probabilities (N, C) and, when the model has a domain model, each image's domain distance (one
        forward pass: the distance uses the features the classifier layer receives).

        In ``bf16``, the images whose positive-class probability lies within :data:`REFINE_BAND` of one of
        :attr:`decision_thresholds`, or whose domain distance lies within :data:`DOMAIN_REFINE_BAND` (relative)
        of the domain threshold, are scored again in float32: every decision at those thresholds is then
        float32's wherever bfloat16 moved a score by less than the band (it moves them by ~0.002 on average,
        0.02 at most on PCam valid; see docs/default-model.md).
        """
        probs, distance = self._score(x, self.precision)
        if self.precision == "fp32":
            return probs, distance
        near = self._near_decision(probs, distance)
        if near.any():
            index = torch.from_numpy(np.flatnonzero(near))
            p32, d32 = self._score(x[index], "fp32")
            with torch.inference_mode():  # probs is an inference tensor
                probs[index] = p32
            if distance is not None and d32 is not None:
                distance[near] = d32
        return probs, distance

    def _score(self, x: torch.Tensor, precision: str) -> tuple[torch.Tensor, np.ndarray | None]:
        if self.domain is None:
            return self.predict_tensor(x, precision=precision), None
        with feature_tap(self.module) as captured:
            probs = self.predict_tensor(x, precision=precision)
        return probs, self.domain.distance({k: v.cpu() for k, v in joined(captured).items()})

    def _near_decision(self, probs: torch.Tensor, distance: np.ndarray | None) -> np.ndarray:
        """Which images have a score close enough to a decision threshold to be rescored in float32."""
        near = np.zeros(len(probs), dtype=bool)
        index = self.spec.positive_index
        if index is not None and self.decision_thresholds:
            p = probs[:, index].cpu().numpy()
            for t in self.decision_thresholds:
                near |= np.abs(p - t) < REFINE_BAND
        if distance is not None and self.domain is not None:
            near |= np.abs(distance - self.domain.threshold) < DOMAIN_REFINE_BAND * self.domain.threshold
        return near

    def predict(self, images: ImageBatch, *, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, C), float32, columns in ``spec.classes`` order."""
        return self.predict_with_domain(images, batch_size=batch_size)[0]

    def predict_with_domain(self, images: ImageBatch, *,
                            batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict``'s probabilities and the images' domain distances (None without a domain model)."""
        batch = as_uint8_batch(images)
        if isinstance(batch, list):
            size = self.spec.input_size
            for arr in batch:
                if arr.shape[:2] != (size, size):
                    self._warn_resize(arr.shape[0], arr.shape[1])
            batch = np.stack([resize_uint8(numpy_to_tensor(a)[None], size)[0].numpy() for a in batch]) \
                if batch else np.zeros((0, size, size, 3), np.uint8)
        probs, dists = [], []
        for i in range(0, len(batch), batch_size):
            p, d = self.score_tensor(self.preprocess(batch[i:i + batch_size]))
            probs.append(p.cpu().numpy())
            if d is not None:
                dists.append(d)
        if not probs:
            return np.zeros((0, self.spec.num_classes), np.float32), \
                None if self.domain is None else np.zeros(0, np.float32)
        return np.concatenate(probs), np.concatenate(dists) if self.domain is not None else None

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class indices: see :func:`decide`."""
        return decide(probs, self.spec.positive_index, self.spec.threshold)

    def positive_scores(self, probs: np.ndarray) -> np.ndarray:
        """The positive class column of ``predict``'s output."""
        index = self.spec.positive_index
        if index is None:
            raise ModelError(f"model {self.spec.arch} has no positive class (classes {self.spec.classes})")
        return probs[:, index]
