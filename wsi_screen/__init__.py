"""wsi-screen: screen whole-slide images for cancer.

Importing the package is cheap: heavy modules (torch, timm, zarr, openslide) load on first use. The public
API is re-exported lazily; ``import wsi_screen`` also registers the project's own architectures in timm's
model registry when timm is first needed (see :mod:`wsi_screen.models`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Sequence
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any

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


class _TimmRegistration(importlib.abc.MetaPathFinder):
    """Register wsi-screen's architectures (``screen_cnn32``) in timm's registry as soon as timm is imported.

    ``import wsi_screen`` must stay cheap, so it cannot import timm (and torch) itself; and timm has no
    plug-in entry point for models. This finder sits on ``sys.meta_path`` until ``timm`` is imported, lets
    the normal finders locate it, and wraps its loader so that ``wsi_screen.models`` (whose import registers
    the models) is imported right after timm finishes loading. It then removes itself. If timm is already
    imported when wsi_screen is, the registration happens at once. Cost when timm is never used: one
    string comparison per import.
    """

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)  # the remaining finders, without this one
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # give the module back its real loader (importlib.resources and friends look at it)
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        module.__loader__ = self._inner
        self._inner.exec_module(module)
        _register_models()


def _register_models() -> None:
    try:
        import_module("wsi_screen.models")
    except Exception as exc:  # never break `import timm` for the user
        logging.getLogger(__name__).warning("could not register wsi-screen models in timm: %s", exc)


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmRegistration)]


def _install_hook() -> None:
    if "timm" in sys.modules:
        _register_models()
    elif not any(isinstance(f, _TimmRegistration) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmRegistration())


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_screen' has no attribute {name!r}")
    return getattr(import_module(module), name)


_install_hook()
