"""wsi-screen: screen whole-slide images for cancer.

The public API (docs/api.md), from a slide to its call:

>>> import wsi_screen
>>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:       # doctest: +SKIP
...     mask = wsi_screen.tissue_mask(slide)                     # glass, tissue, pen, artifact
...     store = wsi_screen.tile(slide, mpp=0.972, size=96)        # a PatchStore, in memory
...     model = wsi_screen.load_model()                          # the bundled default model
...     scores = wsi_screen.score(store, model)                  # probabilities, coords, domain distance
...     call = wsi_screen.call_slide(scores, model)              # diagnosis, score, foci, in-domain fraction
...     fig = wsi_screen.heatmap(slide, scores, call)            # a matplotlib Figure
>>> wsi_screen.screen("examples/CMU-1-Small-Region.svs")       # doctest: +SKIP

Importing the package is cheap: heavy modules (torch, timm, zarr, openslide) load on first use of a name.
``import wsi_screen`` also registers the project's own architectures in timm's model registry when timm is
first needed (see :mod:`wsi_screen.models`).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from wsi_screen import _timm_hook

if TYPE_CHECKING:  # the names with their types, for type checkers and editors (never run: they load by _LAZY);
    # `as` re-exports them, as a typed package must for pyright
    from wsi_screen.models import create_model as create_model
    from wsi_screen.models import load_model as load_model
    from wsi_screen.screening.api import Scores as Scores
    from wsi_screen.screening.api import SlideCall as SlideCall
    from wsi_screen.screening.api import call_slide as call_slide
    from wsi_screen.screening.api import heatmap as heatmap
    from wsi_screen.screening.api import score as score
    from wsi_screen.screening.api import screen as screen
    from wsi_screen.slide.slide import Slide as Slide
    from wsi_screen.slide.slide import open_slide as open_slide
    from wsi_screen.tiling.pipeline import tile as tile
    from wsi_screen.tiling.pipeline import tissue_mask as tissue_mask
    from wsi_screen.tiling.store import PatchStore as PatchStore

try:
    __version__ = version("wsi-screen")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "open_slide": "wsi_screen.slide.slide",
    "Slide": "wsi_screen.slide.slide",
    "tissue_mask": "wsi_screen.tiling.pipeline",
    "tile": "wsi_screen.tiling.pipeline",
    "PatchStore": "wsi_screen.tiling.store",
    "load_model": "wsi_screen.models",
    "create_model": "wsi_screen.models",
    "score": "wsi_screen.screening.api",
    "Scores": "wsi_screen.screening.api",
    "call_slide": "wsi_screen.screening.api",
    "SlideCall": "wsi_screen.screening.api",
    "heatmap": "wsi_screen.screening.api",
    "screen": "wsi_screen.screening.api",
}

__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_screen' has no attribute {name!r}")
    return getattr(import_module(module), name)


_timm_hook.install()
