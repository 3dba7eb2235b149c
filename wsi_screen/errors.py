"""Exception hierarchy.

Every error the toolkit raises on purpose is a :class:`WsiScreenError`; each subclass also inherits the
builtin that matches its meaning (``OSError`` for I/O, ``ValueError`` for bad values), so callers can catch
either. The CLI prints ``str(error)`` as one line and exits non-zero; messages therefore name the file or
setting at fault and, where there is one, the fix.
"""

from __future__ import annotations


class WsiScreenError(Exception):
    """Base class of every error raised on purpose by wsi-screen."""


# --- slides -------------------------------------------------------------------------------------------
class SlideError(WsiScreenError):
    """A slide could not be used."""


class SlideOpenError(SlideError, OSError):
    """A slide file could not be opened (missing, unreadable, corrupt header)."""


class UnsupportedFormatError(SlideOpenError):
    """The file is not a brightfield RGB whole-slide image that any reader here understands."""


class SlideReadError(SlideError, OSError):
    """Pixel data could not be decoded (corrupt or truncated tile data)."""


class SlideReaderCrashError(SlideError, OSError):
    """The native slide reader died (a signal such as SIGSEGV) while reading the slide; only that slide fails."""


class SlideTimeoutError(SlideError, TimeoutError):
    """The slide made no progress (opening it, or reading its patches) within the time limit."""


class MissingMppError(SlideError, ValueError):
    """The slide does not declare its level-0 resolution and none was given."""


class ResolutionError(SlideError, ValueError):
    """The requested resolution cannot be served by the slide (finer than level 0, or absurd)."""


class NoSlidesFoundError(WsiScreenError, FileNotFoundError):
    """A path given on the command line holds no slide."""


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
    """An encoder's weights are neither cached nor downloadable (offline, unknown repository, gated without a
    token); the message says where it looked and how to get them."""


class DeviceError(WsiScreenError, ValueError):
    """A compute device was asked for that is not a device name, or is absent on this machine (``cuda`` with no
    CUDA GPU, ``cuda:3`` with two, ``mps`` off Apple silicon)."""


class ConfigError(WsiScreenError, ValueError):
    """A configuration value or file is invalid."""


class RunError(WsiScreenError, RuntimeError):
    """A run folder cannot be used (other model or settings, or it is not a run)."""


class SchedulerError(WsiScreenError, ConnectionError):
    """A Dask scheduler could not be reached or used."""


# --- outputs ------------------------------------------------------------------------------------------
class OutputWriteError(WsiScreenError, OSError):
    """An output file (run folder, report, GeoJSON) could not be written: disk full, read-only, permissions."""
