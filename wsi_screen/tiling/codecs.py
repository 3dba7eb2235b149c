"""How a store encodes each patch: the codec table, its numcodecs codecs, and the rule for their settings.

Every patch chunk of a store is encoded by one real numcodecs codec, so plain zarr (with the codecs registered,
see docs/store.md) reads every store:

========= ====================================================== =================================================
name      numcodecs codec (zarr v3 name)                         what
========= ====================================================== =================================================
``lz4``   ``numcodecs.blosc`` as zarr's own ``blosc``            lossless: Blosc/lz4 level 5, no shuffle
``jpeg``  ``imagecodecs_jpeg`` (``numcodecs.imagecodecs_jpeg``)  lossy JPEG, 4:4:4 (no chroma subsampling)
``jpegxl`` ``imagecodecs_jpegxl`` (``numcodecs.imagecodecs_jpegxl``) lossy JPEG XL at effort 3 (~10x slower)
========= ====================================================== =================================================

JPEG keeps full chroma: with 4:2:0 a JPEG-scanned slide's patches lose ~10 dB of PSNR (28-30 dB on the bench
slide at any quality) for ~1.5x smaller chunks. WebP is not offered: its lossy mode is always 4:2:0 (30 dB
on the same patches) and its lossless mode saved less than 40 % at 1/300 of lz4's speed. The figures behind
the defaults are in docs/store.md. This module is pure configuration; :mod:`wsi_screen.tiling.store` (the only
zarr importer) turns it into zarr metadata and shard bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Final

from wsi_screen.errors import ConfigError

#: the codecs ``tile --codec`` offers
CODECS: Final = ("lz4", "jpeg", "jpegxl")
#: ``tile``'s default codec (docs/store.md: 0.18 of the lz4 store, 41.6 dB, 38.3 dB stain-normalised, PCam AUC
#: +0.0002; the fastest lossy codec here)
DEFAULT_CODEC: Final = "jpeg"
#: default quality (0-100) of the lossy codecs
DEFAULT_QUALITY: Final = {"jpeg": 90, "jpegxl": 95}
#: JPEG XL encoder effort (1 fastest .. 9 smallest): 3 encodes ~50 MB/s a core, ~10x effort 7's speed
JPEGXL_EFFORT: Final = 3
#: Blosc settings of the lossless codec (and of every other array of a store). Patches are JPEG-decoded
#: pixels: on tissue, zstd-1 saves ~11 % and lz4 ~7 %, but lz4 encodes ~7x and decodes ~9x faster.
BLOSC_CNAME: Final = "lz4"
BLOSC_CLEVEL: Final = 5


def refuse_pixel_settings(given: list[str]) -> None:
    """A coordinates-only store keeps no patch pixels, so a setting of how they are kept (``codec``, ``quality``)
    given with it is a :class:`~wsi_screen.errors.ConfigError` at any value, not silently ignored: the one rule
    for the API's ``tile(pixels=False)`` and the ``tile`` command's coordinates-only stores. ``given``: the
    settings the caller gave."""
    if given:
        many = len(given) > 1
        raise ConfigError(f"{' and '.join(f'`{name}`' for name in given)} {'say' if many else 'says'} how patch "
                          f"pixels are kept, and `no_pixels` keeps none (a coordinates-only store): drop "
                          f"{'them' if many else 'it'}, or use `keep_pixels`")


#: how messages name each codec (:attr:`PatchCodec.label`)
_LABELS: Final = {"jpeg": "JPEG", "jpegxl": "JPEG XL"}


@dataclass(frozen=True)
class PatchCodec:
    """One codec with its quality (``None`` for the lossless ``lz4``, which refuses one: a
    :class:`~wsi_screen.errors.ConfigError`)."""

    name: str = DEFAULT_CODEC
    quality: int | None = None

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ConfigError(f"`codec` {self.name!r} is not a patch codec; choose one of {', '.join(CODECS)}")
        if self.name == "lz4":
            if self.quality is not None:  # the one rule, for the API's tile() and the tile command alike
                raise ConfigError("lz4 is lossless and has no quality; use `codec` jpeg or jpegxl (or drop "
                                  "`quality`)")
        elif self.quality is None:
            object.__setattr__(self, "quality", DEFAULT_QUALITY[self.name])
        elif isinstance(self.quality, bool) or not isinstance(self.quality, Integral) or not 1 <= self.quality <= 100:
            raise ConfigError(f"`quality` {self.quality!r} is not a quality of {self.label}: give a whole number "
                              "from 1 to 100")
        else:
            object.__setattr__(self, "quality", int(self.quality))

    @property
    def lossy(self) -> bool:
        return self.name != "lz4"

    @property
    def label(self) -> str:
        """The codec's name for people: ``JPEG``, ``JPEG XL``, ``lz4``."""
        return _LABELS.get(self.name, self.name)

    def to_json(self) -> dict[str, Any]:
        """What a store records in its ``settings`` (a store is reused only when this matches)."""
        return {"name": self.name, "quality": self.quality}

    @classmethod
    def from_json(cls, data: Any) -> PatchCodec:
        """The codec a store's settings name; stores written before codecs existed are lz4."""
        if not isinstance(data, dict):
            return cls("lz4")
        return cls(str(data.get("name", "lz4")), data.get("quality"))

    def numcodec(self) -> Any:
        """The numcodecs codec that encodes (and decodes) one patch chunk."""
        if self.name == "lz4":
            from numcodecs import Blosc

            return Blosc(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=Blosc.NOSHUFFLE, blocksize=0)
        from imagecodecs import numcodecs as image_codecs

        if self.name == "jpeg":
            return image_codecs.Jpeg(level=self.quality, subsampling="444")
        return image_codecs.Jpegxl(level=self.quality, effort=JPEGXL_EFFORT, lossless=False)

    def __str__(self) -> str:
        return self.name if self.quality is None else f"{self.name} (quality {self.quality})"
