"""The operating point: how a model's class probabilities become a class (one rule, used everywhere).

``predict``, ``evaluate``, the heatmap contour, the QuPath GeoJSON and the report all call a patch through
:func:`decide`. ``predict`` and ``evaluate`` decide at the model's threshold; a slide's outputs (heatmap contour,
GeoJSON tile classes, report, notebook) at the patch threshold its call read
(:func:`wsi_screen.screening.aggregate.call_patch_threshold`), so every picture of a slide shows one operating point.
"""

from __future__ import annotations

import numpy as np


def decide(probs: np.ndarray, positive_index: int | None, threshold: float | None) -> np.ndarray:
    """Class decisions for probabilities (N, C).

    A binary model with a positive class calls it when its probability is at least ``threshold`` (the
    operating point chosen on validation); otherwise, and for more than two classes, the most probable
    class wins.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0:
        return np.zeros(probs.shape[:1], dtype=np.int64)
    if probs.shape[1] == 2 and positive_index is not None and threshold is not None:
        called = probs[:, positive_index] >= threshold
        return np.where(called, positive_index, 1 - positive_index).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)
