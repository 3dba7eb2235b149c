"""Exception hierarchy.

Every error the toolkit raises on purpose is a :class:`WsiScreenError`; each subclass also inherits the
builtin that matches its meaning (``OSError`` for I/O, ``ValueError`` for bad values), so callers can catch
either. The CLI prints ``str(error)`` as one line and exits non-zero; messages therefore name the file or
setting at fault and, where there is one, the fix.

**Settings in messages.** A message (an error's or a log record's) names a setting as the Python API spells it,
in backticks: `` `slide_mpp` ``, `` `slide_mpp`=0.25 ``. A front end that calls its settings something else
installs its words with :func:`name_settings` (the CLI: its options), and the places where text leaves the
package for a person (the CLI's error line, the terminal log, the run log file, results.csv and run.json) pass it
through :func:`in_user_words`. The package's own text never holds a front end's words.

The settings' names in messages are those of the configuration dataclasses (``TileConfig.slide_mpp``); the public
Python API (``wsi_screen.open_slide``, ``tile``, ``score``, ...) names some of them otherwise (``mpp``, ``size``).
Its functions are wrapped in :func:`speaks_api`, which rewrites an escaping error's message in :data:`API_WORDS`,
so a notebook user reads the parameters they can pass. Where a front end has installed its words (the CLI), the
message is left for :func:`in_user_words`. A log record's text is not an exception's: the place that logs a setting
passes its text through :func:`in_callers_words`, which speaks the API's words while a wrapped function runs.

**Checking arguments.** The public functions check what they are given with :func:`check_type`, :func:`check_path`,
:func:`check_whole`, :func:`check_number` and :func:`positive_mpp` before they work, so a wrong type is one
:class:`ConfigError` naming the parameter in backticks, not a ``TypeError`` or ``AttributeError`` from deep inside.
Each returns the value it checked.
"""

from __future__ import annotations

import functools
import math
import os
import re
import reprlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Integral, Real
from typing import ParamSpec, TypeVar

#: a setting named in a message: an identifier in backticks
SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")
_words: dict[str, str] = {}


@contextmanager
def name_settings(words: Mapping[str, str]) -> Iterator[None]:
    """While the block runs, :func:`in_user_words` names each setting of ``words`` (``slide_mpp``) by its value
    (the CLI's option for it); afterwards, as before."""
    before = dict(_words)
    _words.clear()
    _words.update(words)
    try:
        yield
    finally:
        _words.clear()
        _words.update(before)


def in_user_words(text: str) -> str:
    """``text`` with each `setting` that :func:`name_settings` installed a word for spelt that way (the backticks
    go); unchanged where none is installed."""
    if not _words:
        return text
    return SETTING.sub(lambda m: _words.get(m.group(1), m.group(0)), text)


#: the public Python API's words for the settings its parameters name otherwise (each value in backticks, so
#: it reads as code; none of them is itself a key, so rewriting twice changes nothing)
API_WORDS: dict[str, str] = {
    "slide_mpp": "`mpp`",                                       # open_slide(path, mpp=), screen(path, mpp=)
    "slide_mpps": "`wsi_screen.open_slide(path, force_mpp=...)`",   # replaces the declared resolution (screen too)
    "size_px": "`size`", "overlap_px": "`overlap`", "stain_method": "`stain`",   # tile(slide, ...)
    "slide_threshold": "`threshold`",                           # call_slide(scores, threshold=)
    "no_pixels": "`pixels=False`", "keep_pixels": "`pixels=True`",  # tile(slide, pixels=)
    "list_models": "`wsi_screen.models.list_models()`", "list_encoders": "`wsi_screen.models.encoders.list_encoders()`",
}

_P = ParamSpec("_P")
_R = TypeVar("_R")


def in_api_words(text: str) -> str:
    """``text`` with each `setting` the public Python API names otherwise (:data:`API_WORDS`) spelt its way."""
    return SETTING.sub(lambda m: API_WORDS.get(m.group(1), m.group(0)), text)


#: whether a public API function (:func:`speaks_api`) is running in this context
_in_api: ContextVar[bool] = ContextVar("wsi_screen_in_api", default=False)


def in_callers_words(text: str) -> str:
    """``text`` (a log record's, naming settings) as :func:`speaks_api` words an error: in :data:`API_WORDS` while
    a public API function runs and no front end has installed its words; otherwise unchanged (a front end's
    terminal log rewrites it with :func:`in_user_words`)."""
    return in_api_words(text) if _in_api.get() and not _words else text


def for_caller(api: str, front_end: str) -> str:
    """``front_end`` where a front end has installed its words (:func:`name_settings`: the CLI is running), ``api``
    otherwise: for advice only one of them can follow (a Python call to make, or an option to set), which
    :data:`API_WORDS` cannot rewrite into the other."""
    return front_end if _words else api


def speaks_api(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Wrap a public API function: a :class:`WsiScreenError` it raises names settings in :data:`API_WORDS`,
    unless a front end has installed its own words (:func:`name_settings`; the CLI then rewrites the message);
    so do the log records it makes through :func:`in_callers_words`."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        token = _in_api.set(True)
        try:
            return func(*args, **kwargs)
        except WsiScreenError as exc:
            if not _words and exc.args and isinstance(exc.args[0], str):
                exc.args = (in_api_words(exc.args[0]), *exc.args[1:])
            raise
        finally:
            _in_api.reset(token)

    return wrapper


class WsiScreenError(Exception):
    """Base class of every error raised on purpose by wsi-screen."""


# --- slides -------------------------------------------------------------------------------------------
class SlideError(WsiScreenError):
    """A slide could not be used."""


class SlideOpenError(SlideError, OSError):
    """A slide file could not be opened (missing, unreadable, corrupt header)."""


class UnsupportedFormatError(SlideOpenError):
    """The file is not a brightfield RGB whole-slide image that any reader here understands."""


class SlideClosedError(SlideError, ValueError):
    """A slide was read after it was closed (as a closed Python file refuses I/O with a ``ValueError``)."""


class SlideReadError(SlideError, OSError):
    """Pixel data could not be decoded (corrupt or truncated tile data)."""


class SlideReaderCrashError(SlideError, OSError):
    """The native slide reader died (a signal such as SIGSEGV) while reading the slide; only that slide fails."""


class SlideTimeoutError(SlideError, TimeoutError):
    """The slide made no progress (opening it, or reading its patches) within the time limit."""


class MissingMppError(SlideError, ValueError):
    """No usable level-0 resolution (mpp) for a slide, for one of four causes:

    * the slide declares none and no fallback mpp was given;
    * a given mpp (fallback or per-slide) lies outside the plausible range;
    * the declared mpp is implausible (not finite, or outside the plausible range);
    * the declared pixels are not square (x and y differ by more than 5 %).
    """


class ResolutionError(SlideError, ValueError):
    """The requested resolution cannot be served by the slide (finer than level 0, or absurd)."""


class StainFitError(WsiScreenError, ValueError):
    """Stain parameters could not be fitted (too little stained tissue in the sample)."""


# --- stores -------------------------------------------------------------------------------------------
class StoreError(WsiScreenError, OSError):
    """A patch store could not be read or written."""


class StoreMismatchError(StoreError, ValueError):
    """A store exists but was made from another slide version or with other settings."""


class SchemaVersionError(StoreError, ValueError):
    """A store was written with a schema this version does not read."""


class IncompleteStoreError(StoreError):
    """A store was opened for reading but is not marked complete."""


class StoreLockedError(StoreError):
    """Another process holds the lock on this store."""


# --- data, models, configuration --------------------------------------------------------------------
class DatasetError(WsiScreenError, ValueError):
    """A labelled patch dataset is malformed (missing columns, unknown labels, unreadable images...)."""


class ModelError(WsiScreenError, ValueError):
    """A model name, checkpoint or model configuration is unusable."""


class UnknownModelError(ModelError, KeyError):
    """An architecture name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsafeFileError(ModelError):
    """A file would need unpickling (arbitrary code execution) to load; it is refused."""


class ModelMismatchError(ModelError):
    """A model cannot be applied to the given store or data (other mpp, patch size, stain or classes)."""


class EncoderNotFoundError(ModelError, FileNotFoundError):
    """An encoder's weights are neither cached nor downloadable (offline, the hub unreachable, unknown repository,
    gated without a token); the message says where it looked and how to get them.

    ``reason`` is the message without its advice and ``repo`` the hub repository (both empty where not set), so
    that a caller whose user has other means (a head model's ``load_model``) can give its own advice."""

    reason: str = ""
    repo: str = ""


class DeviceError(WsiScreenError, ValueError):
    """A compute device was asked for that is not a device name, or is absent on this machine (``cuda`` with no
    CUDA GPU, ``cuda:3`` with two, ``mps`` off Apple silicon)."""


class ConfigError(WsiScreenError, ValueError):
    """A configuration value or file is invalid."""


class TrainingDivergedError(WsiScreenError, FloatingPointError):
    """A training's loss or validation scores stopped being finite numbers (the learning rate is too high)."""


class RunError(WsiScreenError, RuntimeError):
    """A run folder cannot be used (other model or settings, or it is not a run)."""


class SlideBusyError(RunError):
    """Another wsi-screen process is writing this slide's results in the same run folder."""


class SchedulerError(WsiScreenError, ConnectionError):
    """A Dask scheduler could not be reached or used."""


# --- outputs ------------------------------------------------------------------------------------------
class OutputWriteError(WsiScreenError, OSError):
    """An output file (run folder, report, GeoJSON) could not be written: disk full, read-only, permissions."""


# --- argument checks (see the module docstring) -----------------------------------------------------------
_T = TypeVar("_T")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def shown(value: object) -> str:
    """``value`` as a message shows it: a short repr and its type, e.g. ``'96' (str)``."""
    return f"{_short.repr(value)} ({type(value).__name__})"


def check_type(value: _T | object, kind: type[_T] | tuple[type, ...], setting: str, what: str) -> _T:
    """``value`` if it is a ``kind``; a ConfigError saying that `setting` must be ``what`` otherwise."""
    if not isinstance(value, kind):
        raise ConfigError(f"`{setting}` must be {what}, not {shown(value)}")
    return value  # type: ignore[return-value]


def check_path(value: object, setting: str = "path") -> str | os.PathLike[str]:
    """``value`` if it is a file system path (a ``str`` or an ``os.PathLike``)."""
    return check_type(value, (str, os.PathLike), setting, "a path (a str or a pathlib.Path)")


def plain_number(value: object) -> object:
    """``value`` as Python's own int or float where it is a number of another kind (numpy's ``int64``, ``float32``:
    a DataFrame's or an array's, which JSON does not take); anything else (a bool, a string, None) as it is, for
    its check to refuse."""
    if isinstance(value, bool) or not isinstance(value, Real) or type(value) in (int, float):
        return value
    if isinstance(value, Integral):
        return int(value)
    # numpy's float32(0.15) is 0.15000000596...: the shortest decimal that is it (numpy's str) is the number meant
    return float(str(value)) if hasattr(value, "dtype") else float(value)


def check_whole(value: object, setting: str, *, at_least: int, unit: str = "") -> int:
    """``value`` as an int where it is a whole number (an int, not a bool or a float) of at least ``at_least``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < at_least:
        of = f" of {unit}" if unit else ""
        raise ConfigError(f"`{setting}` must be a whole number{of}, at least {at_least}; got {_short.repr(value)}")
    return int(value)


def check_number(value: object, setting: str, *, low: float, high: float = math.inf) -> float:
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
