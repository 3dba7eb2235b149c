"""wsi-screen: screen whole-slide images for cancer.

Importing the package is cheap: heavy modules (torch, timm, zarr, openslide) load on first use. The public
API is re-exported lazily; ``import wsi_screen`` also registers the project's own architectures in timm's
model registry when timm is first needed (see :mod:`wsi_screen.models`).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from wsi_screen import _timm_hook

try:
    __version__ = version("wsi-screen")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "Slide": "wsi_screen.slide.slide",
    "open_slide": "wsi_screen.slide.slide",
    "PatchStore": "wsi_screen.tiling.store",
    "load_model": "wsi_screen.models",
    "create_model": "wsi_screen.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_screen' has no attribute {name!r}")
    return getattr(import_module(module), name)


_timm_hook.install()
