"""What a type checker sees of the public API (docs/api.md): every name of ``wsi_screen`` with its own type.

Nothing runs this file: mypy checks it with the package (pyproject.toml's ``[tool.mypy]`` ``files``, so
``tests/test_quality.py::test_mypy``). The names load lazily (``wsi_screen.__getattr__``), which a checker cannot
follow: each was ``Any`` to mypy, pyright and editors until the package imported them under ``TYPE_CHECKING``, so
a wrong argument in a notebook or script went unnoticed. ``assert_type`` fails on ``Any``.
"""

from __future__ import annotations

from typing import assert_type

import numpy as np
import torch.nn as nn
from matplotlib.figure import Figure

import wsi_screen
from wsi_screen.models.classifier import PatchClassifier
from wsi_screen.screening.api import Scores, SlideCall
from wsi_screen.slide.slide import Slide
from wsi_screen.tiling.store import PatchStore
from wsi_screen.tiling.tissue import TissueMask


def the_api_example(path: str) -> None:
    """docs/api.md's example, each value with the type its function declares (the mpp checked: a checker needs it)."""
    model = wsi_screen.load_model()
    assert_type(model, PatchClassifier)
    with wsi_screen.open_slide(path) as slide:
        assert_type(slide, Slide)
        assert_type(wsi_screen.tissue_mask(slide), TissueMask)
        mpp = model.spec.mpp
        assert mpp is not None  # float | None: a model trained on patches of no known resolution records none
        store = wsi_screen.tile(slide, mpp=mpp, size=model.spec.input_size)
        assert_type(store, PatchStore)
        scores = wsi_screen.score(store, model)
        assert_type(scores, Scores)
        call = wsi_screen.call_slide(scores, model)
        assert_type(call, SlideCall)
        assert_type(call.score, float | None)
        assert_type(wsi_screen.heatmap(slide, scores, call), Figure)
    assert_type(scores.top(8), list[int])
    assert_type(scores.store[0], np.ndarray)
    assert_type(wsi_screen.screen(path), SlideCall)
    assert_type(wsi_screen.create_model("screen_cnn32", 2), nn.Module)
    assert_type(wsi_screen.PatchStore.open(path), PatchStore)
    assert_type(wsi_screen.Slide(path), Slide)
    assert_type(wsi_screen.Scores, type[Scores])
    assert_type(wsi_screen.SlideCall, type[SlideCall])
