"""Checks of the arguments a caller passes: one place for the rules the public API's entry points share.

A public function (``wsi_screen.open_slide``, ``tile``, ``call_slide``, ...) checks what it is given with these
before it works, so a wrong type is one :class:`~wsi_screen.errors.ConfigError` naming the parameter, in backticks
(:mod:`wsi_screen.errors` rewrites a setting the API names otherwise), not a ``TypeError`` or ``AttributeError``
from deep inside. Each returns the value it checked, so a check reads as an assignment.
"""

from __future__ import annotations

import math
import os
import reprlib
from numbers import Integral, Real
from typing import TypeVar

from wsi_screen.errors import ConfigError

_T = TypeVar("_T")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def shown(value: object) -> str:
    """``value`` as a message shows it: a short repr and its type, e.g. ``'96' (str)``."""
    return f"{_short.repr(value)} ({type(value).__name__})"


def instance(value: _T | object, kind: type[_T] | tuple[type, ...], setting: str, what: str) -> _T:
    """``value`` if it is a ``kind``; a ConfigError saying that `setting` must be ``what`` otherwise."""
    if not isinstance(value, kind):
        raise ConfigError(f"`{setting}` must be {what}, not {shown(value)}")
    return value  # type: ignore[return-value]


def path(value: object, setting: str = "path") -> str | os.PathLike[str]:
    """``value`` if it is a file system path (a ``str`` or an ``os.PathLike``)."""
    return instance(value, (str, os.PathLike), setting, "a path (a str or a pathlib.Path)")


def whole(value: object, setting: str, *, at_least: int, unit: str = "") -> int:
    """``value`` as an int where it is a whole number (an int, not a bool or a float) of at least ``at_least``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < at_least:
        of = f" of {unit}" if unit else ""
        raise ConfigError(f"`{setting}` must be a whole number{of}, at least {at_least}; got {_short.repr(value)}")
    return int(value)


def number(value: object, setting: str, *, low: float, high: float = math.inf) -> float:
    """``value`` as a float where it is a number (not a bool or a string) in [``low``, ``high``]."""
    got = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan
    if not low <= got <= high:
        where = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ConfigError(f"`{setting}` must be a number {where}, got {_short.repr(value)}")
    return got


def positive_mpp(mpp: object, setting: str = "mpp") -> float:
    """``mpp`` as a float where it is a positive, finite number of microns per pixel (0 or a negative one would be
    clamped or divided by; a string or a bool is no number)."""
    value = float(mpp) if isinstance(mpp, Real) and not isinstance(mpp, bool) else math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"`{setting}` must be a positive number of microns per pixel, got {mpp!r}")
    return value
