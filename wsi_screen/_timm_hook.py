"""Register wsi-screen's architectures in timm's model registry as soon as timm is imported.

``import wsi_screen`` must stay cheap, so it cannot import timm (and torch) itself, and timm has no plug-in
entry point for models. :func:`install` puts a finder on ``sys.meta_path`` that waits for ``timm``; when it
is imported, ``wsi_screen.models`` (whose import registers the models) is imported right after it. Private
plumbing: the public API lives in ``wsi_screen/__init__.py``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Sequence
from importlib import import_module
from types import ModuleType


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


def install() -> None:
    if "timm" in sys.modules:
        _register_models()
    elif not any(isinstance(f, _TimmRegistration) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmRegistration())
