"""Slide: open a whole-slide image by path, know its mpp and pyramid, read patches and thumbnails.

Which reader serves a file is decided here, once, and recorded in the slide's identity:

* OME-TIFF pyramids (QuPath, bfconvert) -> :class:`~wsi_screen.slide.readers.tiff_reader.TiffReader`, because
  OpenSlide sees them as one flat level;
* Aperio SVS and generic tiled TIFF whose pyramid is JPEG (or RGB JPEG 2000) tiles -> TiffReader as a fast
  path (the file's own tiles decoded directly, several threads at once), with OpenSlide's metadata; it
  gives OpenSlide's pixels exactly at level 0 and within a grey level or two at reduced levels (both
  interpolate sub-pixel offsets bilinearly);
* everything else OpenSlide recognises (NDPI, MRXS, SCN, BIF, VMS, DICOM, ...) ->
  :class:`~wsi_screen.slide.readers.openslide_reader.OpenSlideReader`;
* other 8-bit RGB TIFFs (plain strip TIFFs) -> TiffReader, but only with a user-stated mpp.

Grayscale, 16-bit and multi-channel (fluorescence) files are refused up front. Level-0 mpp comes from the
file; where it is missing or absurd, :class:`~wsi_screen.errors.MissingMppError` names the slide and says to
set ``slide_mpp``. Nothing is guessed. All coordinates are level-0 pixels, (x, y); sizes are (w, h).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import numpy as np
from PIL import Image

from wsi_screen.errors import (
    ConfigError,
    MissingMppError,
    SlideClosedError,
    SlideOpenError,
    UnsupportedFormatError,
    check_path,
    check_type,
    in_callers_words,
    positive_mpp,
    speaks_api,
)
from wsi_screen.slide.dicom_series import series_files, series_name
from wsi_screen.slide.readers import Reader, into
from wsi_screen.slide.threads import run_each

if TYPE_CHECKING:
    from tifffile import TiffFile

#: A declared mpp outside this range is treated as absent (scanners write 0, 1 or inch-based junk).
PLAUSIBLE_MPP = (0.05, 100.0)
#: Largest side a slide may declare; beyond it the header is corrupt.
MAX_SIDE_PX = 2_000_000
#: Output block edge when building thumbnails from large levels.
_THUMB_BLOCK = 1024
#: most pixels one read may give or read from a level (768 MiB of RGB): beyond it the caller asked for the whole
#: slide at full resolution, or for a resolution so coarse that one output pixel spans more than the slide
MAX_READ_PIXELS = 1 << 28
#: an mpp this much finer than level 0's is still level 0's (rounding in a declared or derived resolution)
_FINER_TOLERANCE = 1e-3

ReaderChoice = Literal["auto", "openslide", "tifffile"]

log = logging.getLogger(__name__)

#: (slide, forced mpp) pairs whose `force_mpp` warning this process has given since :func:`forget_warnings`: a run
#: opens a slide more than once (checking its store, tiling it), and says so once
_warned_forced: set[tuple[Path, float]] = set()


def forget_warnings() -> None:
    """Forget which forced resolutions were warned of, so the next run warns of each again (a run's slide reading
    starts with it: :func:`wsi_screen.slide.isolation.slide_calls`; its child process starts with none)."""
    _warned_forced.clear()


@dataclass(frozen=True, kw_only=True)
class SlideInfo:
    """A slide's identity and geometry, JSON-serialisable (recorded in every store)."""

    path: str
    name: str
    vendor: str
    reader: str
    mpp: float
    mpp_source: Literal["slide", "user"]
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    fingerprint: str
    size_bytes: int
    mtime: float
    properties: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "name": self.name, "vendor": self.vendor, "reader": self.reader,
            "mpp": self.mpp, "mpp_source": self.mpp_source, "dimensions": list(self.dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples), "fingerprint": self.fingerprint,
            "size_bytes": self.size_bytes, "mtime": self.mtime, "properties": dict(self.properties),
        }


def slide_files(path: Path) -> list[Path]:
    """The files that make up a slide: the file itself, a DICOM series folder's ``.dcm`` files, or for one
    file of a DICOM series the files of its series (see :mod:`wsi_screen.slide.dicom_series`)."""
    from wsi_screen.slide.readers.sanity import is_dicom

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
        if not files:
            raise UnsupportedFormatError(f"{path}: folder holds no .dcm files of a DICOM series")
        return files
    if path.suffix.lower() == ".dcm" or is_dicom(path):
        return [path.parent / f.name for f in series_files(path)]
    return [path]


def fingerprint(files: list[Path]) -> tuple[str, int, float]:
    """Fast content fingerprint (name, size, first and last MiB of each file), total bytes, newest mtime.

    A file reached through a symlink counts by the name of the file it points to, as its content and stat do:
    a slide linked into a cohort folder under another name has the fingerprint of the file itself, which is
    the file a store records (:attr:`SlideInfo.path` is resolved) and reopens.
    """
    h = hashlib.blake2b(digest_size=16)
    total, mtime = 0, 0.0
    for f in files:
        st = f.stat()
        total += st.st_size
        mtime = max(mtime, st.st_mtime)
        h.update(os.fsencode(f.resolve().name))
        h.update(st.st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
    return h.hexdigest(), total, mtime


def warn_if_touched(name: str, recorded: Any, now: float, *, made: str, kept: str, redo: str) -> bool:
    """The rule for reusing what was made from a slide whose file's modification time changed since: the slide is
    known the same by its :func:`fingerprint` (file name, size, first and last MiB), not by its whole content, so
    the reuse stands (a copy without its times, ``cp`` without ``-p``, or a ``touch`` changes only the time, and
    reusing is right then) with one warning naming the slide, both times, what was compared and how to make it
    afresh: an edit in place that keeps the size and both ends would go unnoticed.

    ``recorded`` is the time the earlier output recorded (anything but a float: none recorded, no warning), ``now``
    the file's; ``made`` says what was made ("its scores were made"), ``kept`` what is reused ("the earlier scores
    are reused"), ``redo`` how to make it afresh. Returns whether it warned."""
    if not isinstance(recorded, float) or recorded == now:
        return False

    def when(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    log.warning("%s", in_callers_words(
        f"{name}: the slide file's modification time changed since {made} ({when(recorded)}, now {when(now)}); only "
        f"its size and first and last MiB were compared, and they match, so {kept}: {redo}"))
    return True


def _open_reader(path: Path, choice: ReaderChoice) -> Reader:
    """Pick and open the reader for ``path`` (see module docstring)."""
    from wsi_screen.slide.readers import openslide_reader
    from wsi_screen.slide.readers.sanity import check_dicom, check_tiff, is_dicom
    from wsi_screen.slide.readers.tiff_reader import inspect_tiff

    files = slide_files(path)
    target = files[0] if path.is_dir() else path  # any one file of a DICOM series opens the whole series
    for f in files:
        if not os.access(f, os.R_OK):
            raise SlideOpenError(f"{f}: permission denied")
        if f.stat().st_size == 0:
            raise SlideOpenError(f"{f}: empty file (0 bytes)")
    if path.is_dir() or is_dicom(target):  # DICOM: OpenSlide finds a series' sibling instances itself
        level0 = check_dicom(files, series=len(files) > 1)
        if openslide_reader.detect(target) is None:
            what = "the .dcm files are not a DICOM whole-slide image series" if path.is_dir() else \
                "not a slide format wsi-screen reads (a DICOM file, but not a whole-slide image)"
            raise UnsupportedFormatError(f"{path}: {what}")
        reader = openslide_reader.OpenSlideReader(target)
        if level0 != (0, 0) and reader.level_dimensions[0] != level0:
            reader.close()
            raise SlideOpenError(f"{path}: its {level0[0]} x {level0[1]} px level 0 cannot be read (the reader "
                                 f"offers only {reader.level_dimensions[0][0]} x {reader.level_dimensions[0][1]} "
                                 "px); a damaged file of the slide?")
        return reader

    check_tiff(target)
    tif = inspect_tiff(target)
    try:
        return _tiff_or_openslide(target, tif, choice)
    except BaseException:
        if tif is not None:  # never leak the handle of a file that failed (thousands of slides per run)
            tif.close()
        raise


def _tiff_or_openslide(target: Path, tif: TiffFile | None, choice: ReaderChoice) -> Reader:
    """The reader for a single file that tifffile did (``tif``) or did not (None) open."""
    from wsi_screen.slide.readers import openslide_reader
    from wsi_screen.slide.readers.tiff_reader import TiffReader, check_brightfield, check_intact, fast_path_ok

    if tif is not None:
        try:
            check_brightfield(tif, target)
        except (IndexError, ValueError, KeyError) as exc:  # tifffile's view of a broken structure
            what = "no readable image directory" if isinstance(exc, IndexError) else str(exc)
            raise SlideOpenError(f"{target}: truncated or corrupt TIFF ({what})") from exc
        if tif.is_ome or choice == "tifffile":
            check_intact(tif, target)
            return TiffReader(target, tif)  # the reader owns ``tif`` from here
    vendor = openslide_reader.detect(target)
    if vendor is not None:
        osr = openslide_reader.OpenSlideReader(target)
        try:
            fast = choice == "auto" and tif is not None and fast_path_ok(tif, vendor, osr.level_dimensions)
            meta = (osr.vendor, osr.mpp(), osr.properties()) if fast else None
        except BaseException:
            osr.close()
            raise
        if tif is not None and meta is not None:
            # same pyramid, JPEG tiles: decode them directly, keep OpenSlide's metadata
            osr.close()
            return TiffReader(target, tif, vendor=meta[0], mpp=meta[1], properties=meta[2])
        if tif is not None:
            tif.close()
        return osr
    if tif is not None:  # a TIFF OpenSlide does not recognise: a plain TIFF, or a damaged slide
        check_intact(tif, target)
        return TiffReader(target, tif)
    raise UnsupportedFormatError(
        f"{target}: not a slide format wsi-screen reads (OpenSlide formats such as SVS, NDPI, MRXS, "
        "SCN, DICOM and tiled TIFF; OME-TIFF; plain RGB TIFF with `slide_mpp`)")


class Level(NamedTuple):
    """One level of a slide's pyramid (see :attr:`Slide.levels`)."""

    dimensions: tuple[int, int]
    downsample: float
    mpp: float


class Slide:
    """An open whole-slide image (:func:`open_slide`). Pickles by path, so it can be sent to worker processes.

    Attributes: ``mpp`` (level-0 microns per pixel), ``dimensions`` (level-0 (w, h)), ``levels``,
    ``level_dimensions`` and ``level_downsamples`` (as openslide names them), ``name``, ``path``.

    Parameters
    ----------
    path:
        A slide file, or a folder holding one DICOM WSI series.
    name:
        Display name (defaults to the file stem, or the folder name for a DICOM series).
    mpp:
        Level-0 microns per pixel for a file that declares none; a declared value wins.
    force_mpp:
        Level-0 microns per pixel that replaces even a declared value (a per-slide table: scanners do write
        wrong ones); a warning names both when they differ by more than 5 %, once per slide and value in a
        process (a run opens a slide more than once).
    force_mpp_warning:
        False where ``force_mpp`` restores a resolution already warned of when it was set (a patch store
        reopening its slide; a slide unpickled in a worker): no warning then.
    reader:
        ``"auto"`` (see module docstring), or force ``"openslide"`` / ``"tifffile"``.

    Examples
    --------
    >>> import wsi_screen
    >>> with wsi_screen.Slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     print(slide)
    Slide('examples/CMU-1-Small-Region.svs', 2220x2967 px, 0.499 um/px, aperio)
    """

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None, mpp: float | None = None,
                 reader: ReaderChoice = "auto", force_mpp: float | None = None,
                 force_mpp_warning: bool = True) -> None:
        # checked up front, even where the file's declared resolution will make ``mpp`` unused
        self._mpp_override = None if mpp is None else positive_mpp(mpp, "slide_mpp")
        self._mpp_force = None if force_mpp is None else positive_mpp(force_mpp, "force_mpp")
        self._reader_choice: ReaderChoice = reader_choice(reader)
        self.path = Path(check_path(path))
        if name is not None:
            check_type(name, str, "name", "a str (or None: the file's)")
        self.name = name or slide_name(self.path)
        self._force_warning = force_mpp_warning
        if not self.path.exists() and not self.path.is_symlink():
            raise SlideOpenError(f"{self.path}: no such file or folder")
        try:
            self._handle: Reader | None = _open_reader(self.path, reader)
        except OSError as exc:
            if isinstance(exc, SlideOpenError):
                raise
            raise SlideOpenError(f"{self.path}: cannot open: {exc.strerror or exc}") from exc
        self._vendor, self._reader_name = self._reader.vendor, self._reader.name
        self.level_dimensions = self._reader.level_dimensions
        self.level_downsamples = self._reader.level_downsamples
        self.dimensions = self.level_dimensions[0]
        w, h = self.dimensions
        if not (0 < w <= MAX_SIDE_PX and 0 < h <= MAX_SIDE_PX):
            self.close()
            raise SlideOpenError(f"{self.path}: declares absurd dimensions {w} x {h} px (corrupt header?)")
        self.mpp, self.mpp_source = self._resolve_mpp()
        self._info: SlideInfo | None = None
        self._warned: set[str] = set()

    # -------------------------------------------------------------------------------------- identity
    def _user_mpp(self, value: float, option: str) -> tuple[float, Literal["slide", "user"]]:
        mpp = float(value)
        if not (PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
            self.close()
            raise MissingMppError(f"{self.path}: {option} {mpp} is outside the plausible range "
                                  f"{PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px")
        return mpp, "user"

    def _resolve_mpp(self) -> tuple[float, Literal["slide", "user"]]:
        """The file's own resolution; ``force_mpp`` replaces it, ``mpp`` fills in only where it is missing."""
        declared = self._reader.mpp()
        if self._mpp_force is not None:
            mpp, source = self._user_mpp(self._mpp_force, "`force_mpp`")
            if declared is not None:
                own = (declared[0] + declared[1]) / 2.0
                key = (self.path.absolute(), mpp)
                if self._force_warning and key not in _warned_forced and math.isfinite(own) and own > 0 \
                        and abs(own - mpp) / own > 0.05:
                    _warned_forced.add(key)
                    log.warning("%s: using %.4g um/px from `force_mpp`; the file declares %.4g um/px",
                                self.path, mpp, own)
            return mpp, source
        if declared is None:
            if self._mpp_override is not None:
                return self._user_mpp(self._mpp_override, "`slide_mpp`")
            self.close()
            raise MissingMppError(f"{self.path}: the slide does not declare its resolution (microns per "
                                  "pixel); set `slide_mpp` (e.g. `slide_mpp`=0.25 for a 40x scan)")
        mx, my = declared
        ok = all(math.isfinite(v) and PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in (mx, my))
        if not ok:
            self.close()
            raise MissingMppError(f"{self.path}: declared resolution {mx} x {my} um/px is implausible; "
                                  "set this slide's resolution with `slide_mpps`")
        if abs(mx - my) / max(mx, my) > 0.05:
            self.close()
            raise MissingMppError(f"{self.path}: non-square pixels ({mx} x {my} um/px) are not supported; "
                                  "set this slide's resolution with `slide_mpps`")
        return (mx + my) / 2.0, "slide"

    @property
    def info(self) -> SlideInfo:
        """The slide's identity (computed once; the fingerprint reads 2 MiB per file)."""
        if self._info is None:
            files = slide_files(self.path)
            fp, size, mtime = fingerprint(files)
            self._info = SlideInfo(
                path=str(self.path.resolve()), name=self.name, vendor=self._reader.vendor,
                reader=self._reader.name, mpp=self.mpp, mpp_source=self.mpp_source,
                dimensions=self.dimensions, level_dimensions=self.level_dimensions,
                level_downsamples=self.level_downsamples, fingerprint=fp, size_bytes=size, mtime=mtime,
                properties=self._reader.properties())
        return self._info

    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def reader_name(self) -> str:
        return self._reader_name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has closed the slide (its pixels can then no longer be read)."""
        return getattr(self, "_handle", None) is None

    def check_open(self) -> None:
        """:class:`~wsi_screen.errors.SlideClosedError` where the slide is closed (a caller that will read it later,
        or elsewhere, asks before it starts)."""
        self._open_handle()

    @property
    def _reader(self) -> Reader:
        """The open reader: every read goes through here, so a closed slide is refused in one place (its reader's
        file descriptors are freed, and may already belong to another file)."""
        return self._open_handle()

    def _open_handle(self) -> Reader:
        handle: Reader | None = getattr(self, "_handle", None)
        if handle is None:
            raise SlideClosedError(f"{self.path} is closed; open it again with open_slide")
        return handle

    # ---------------------------------------------------------------------------------------- pixels
    def best_level(self, downsample: float) -> int:
        """The coarsest level whose resolution is at least as fine as ``downsample`` (vs level 0)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = i
        return best

    @property
    def levels(self) -> tuple[Level, ...]:
        """The pyramid, finest first: each level's (w, h), downsample from level 0 and microns per pixel."""
        return tuple(Level(dimensions=d, downsample=ds, mpp=self.mpp * ds)
                     for d, ds in zip(self.level_dimensions, self.level_downsamples, strict=True))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of pyramid ``level`` as openslide reads them: ``location`` is the level-0 (x, y) of the
        top-left corner, ``size`` the (w, h) in that level's pixels. RGB uint8 (h, w, 3); white outside the
        scanned area (openslide-python returns RGBA with transparent there). A ``location`` that is not an (x, y) of
        whole pixels, a ``size`` that is not a positive (w, h) or a ``level`` the slide lacks is a
        :class:`~wsi_screen.errors.ConfigError`.

        >>> import wsi_screen
        >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
        ...     region = slide.read_region((1000, 800), 0, (256, 128))
        >>> region.shape, region.dtype
        ((128, 256, 3), dtype('uint8'))
        """
        try:
            index = int(level)
        except (TypeError, ValueError, OverflowError):
            index = -1
        if isinstance(level, bool) or index != level or not 0 <= index < len(self.level_dimensions):
            raise ConfigError(f"{self.path}: `level` {level!r} does not exist (the slide has levels 0-"
                              f"{len(self.level_dimensions) - 1})")
        xy = _location(location, "location")
        w, h = self._within_budget(_pixel_size(size), "a read_region", "read a smaller `size`, or a coarser `level`")
        return self._reader.read_region(index, xy, (w, h))

    def read_at(self, location_l0: tuple[int, int], size: tuple[int, int], mpp: float,
                out: np.ndarray | None = None) -> np.ndarray:
        """A region at a resolution: ``size`` (w, h) pixels of ``mpp`` microns each, from level-0 ``location_l0``.

        Read from the coarsest pyramid level still at least as fine as ``mpp`` and resized with an
        anti-aliasing filter; the tiler reads its patches this way, so ``read_at(store.coords[i], (S, S),
        store.mpp)`` gives patch ``i`` of an unnormalised store. RGB uint8 (h, w, 3).

        >>> import wsi_screen
        >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
        ...     patch = slide.read_at((1000, 800), (224, 224), mpp=1.0)   # 224 px at 1 um/px
        >>> patch.shape
        (224, 224, 3)

        ``mpp`` must be a positive number (:class:`~wsi_screen.errors.ConfigError` otherwise). An ``mpp`` finer
        than level 0's is served by upsampling level 0, which adds no detail; that is warned of once per slide.
        """
        mpp = positive_mpp(mpp)
        xy = _location(location_l0, "location_l0")
        if mpp < self.mpp * (1.0 - _FINER_TOLERANCE):
            self._warn_once("read_at", "%s: read_at at %g um/px is finer than the slide's level 0 (%.4g um/px): the "
                            "region is upsampled from level 0, which adds no detail", self.path, mpp, self.mpp)
        w, h = self._within_budget(_pixel_size(size), "a read_at", "read a smaller `size`, or at a coarser `mpp`")
        scale = mpp / self.mpp  # level-0 pixels per output pixel
        return self._read_l0(xy, (max(1, round(w * scale)), max(1, round(h * scale))), (w, h), out)

    def read(self, xy_l0: tuple[int, int], tile_size_l0: int, size_px: int,
             out: np.ndarray | None = None) -> np.ndarray:
        """A square patch covering ``tile_size_l0`` level-0 pixels from ``xy_l0``, as ``size_px`` RGB (the
        tiler's read: its grid fixes ``tile_size_l0``; see :meth:`read_at`).

        With ``out`` (uint8, ``(size_px, size_px, 3)``) the patch is written there and ``out`` returned; when
        no resize is needed, tile pixels go straight into it.
        """
        return self._read_l0(xy_l0, (tile_size_l0, tile_size_l0), (size_px, size_px), out)

    def _read_l0(self, xy_l0: tuple[int, int], size_l0: tuple[int, int], size_px: tuple[int, int],
                 out: np.ndarray | None = None) -> np.ndarray:
        """``size_l0`` level-0 pixels from ``xy_l0`` as ``size_px`` (w, h): read from the coarsest level that
        is still at least as fine as the target, then resized down with an anti-aliasing filter (PIL's
        Lanczos, whose support widens with the scale factor)."""
        level = self.best_level(min(size_l0[0] / size_px[0], size_l0[1] / size_px[1]))
        ds = self.level_downsamples[level]
        region = self._within_budget((max(1, round(size_l0[0] / ds)), max(1, round(size_l0[1] / ds))),
                                     f"the region (at level {level})", "read a smaller `size`, or at a finer `mpp`")
        if region == size_px:
            return self._reader.read_region(level, xy_l0, region, out)
        return into(out, resize(self._reader.read_region(level, xy_l0, region), size_px))

    def _within_budget(self, size: tuple[int, int], what: str, fix: str) -> tuple[int, int]:
        """``size`` (w, h), or a :class:`~wsi_screen.errors.ConfigError` naming it (and ``fix``) where it holds more
        than :data:`MAX_READ_PIXELS` (a MemoryError of terabytes otherwise)."""
        w, h = size
        if w * h > MAX_READ_PIXELS:
            raise ConfigError(f"{self.path}: {what} of {w} x {h} px ({w * h * 3 / 2**30:,.1f} GiB of RGB) is more than "
                              f"one read gives ({MAX_READ_PIXELS:,} px); {fix}")
        return w, h

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        """Log ``msg`` the first time this slide does ``what`` (a notebook loop would repeat it on every call)."""
        if what not in self._warned:
            self._warned.add(what)
            log.warning(msg, *args)

    def clamp_mpp(self, mpp: float, *, what: str = "a thumbnail") -> float:
        """The resolution ``what`` (a picture of the whole slide) is made at for ``mpp``: ``mpp`` itself, or level
        0's where ``mpp`` is finer (a picture finer than the scan adds no detail; warned of once per slide and
        ``what``). ``mpp`` must be a positive number (:class:`~wsi_screen.errors.ConfigError` otherwise)."""
        mpp = positive_mpp(mpp)
        if mpp >= self.mpp * (1.0 - _FINER_TOLERANCE):
            return max(mpp, self.mpp)
        self._warn_once(what, "%s: %s at %g um/px would be finer than the slide's level 0; it is made at level 0's "
                        "%.4g um/px", self.path, what, mpp, self.mpp)
        return self.mpp

    def thumbnail(self, mpp: float, *, workers: int = 1) -> np.ndarray:
        """The whole slide at ``mpp`` microns per pixel, RGB uint8.

        ``mpp`` must be a positive number (:class:`~wsi_screen.errors.ConfigError` otherwise); one finer than
        level 0's is clamped to level 0's (:meth:`clamp_mpp`, warned of once per slide).

        Large levels are read and reduced block by block (``workers`` threads), so memory stays bounded by
        the output size. Every block uses the same exact scale, so the result does not depend on ``workers``.

        >>> import wsi_screen
        >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
        ...     thumb = slide.thumbnail(8.0)      # 8 microns per pixel
        >>> thumb.shape
        (185, 138, 3)
        """
        w0, h0 = self.dimensions
        scale = max(self.clamp_mpp(mpp) / self.mpp, 1.0)  # level-0 pixels per output pixel
        out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        level = self.best_level(scale)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        f = scale / ds  # level pixels per output pixel
        self._within_budget((out_w, out_h), "a thumbnail", "make it at a coarser `mpp`")
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        # the resampling filter's context, in level pixels: two output pixels' worth, but never more than the level
        # (an output pixel wider than the slide, at an absurdly coarse mpp, would read a vast white border)
        margin = min(math.ceil(2 * f) + 2, max(lw, lh))

        def block(origin: tuple[int, int]) -> None:
            ox, oy = origin
            bw, bh = min(_THUMB_BLOCK, out_w - ox), min(_THUMB_BLOCK, out_h - oy)
            # one exact scale for every block; readers pad past the slide's edge with white
            sx0, sy0 = ox * f, oy * f
            sx1, sy1 = (ox + bw) * f, (oy + bh) * f
            rx0, ry0 = max(0, math.floor(sx0) - margin), max(0, math.floor(sy0) - margin)
            rx1 = min(lw + margin, math.ceil(sx1) + margin)
            ry1 = min(lh + margin, math.ceil(sy1) + margin)
            src = self._reader.read_region(level, (round(rx0 * ds), round(ry0 * ds)), (rx1 - rx0, ry1 - ry0))
            # within what was read: the box reaches past it only where the margin was capped (all white there)
            box = (sx0 - rx0, sy0 - ry0, min(sx1, rx1) - rx0, min(sy1, ry1) - ry0)
            out[oy:oy + bh, ox:ox + bw] = resize(src, (bw, bh), box=box)

        blocks = [(ox, oy) for oy in range(0, out_h, _THUMB_BLOCK) for ox in range(0, out_w, _THUMB_BLOCK)]
        run_each(block, blocks, workers=workers, name="thumbnail")
        return out

    # ------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the slide's files; reading it afterwards raises :class:`~wsi_screen.errors.SlideClosedError`
        (closing it again does nothing)."""
        reader = getattr(self, "_handle", None)
        self._handle = None
        if reader is not None:
            reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "mpp": self._mpp_override,
                "reader": self._reader_choice, "force_mpp": self._mpp_force}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], name=state["name"], mpp=state["mpp"],  # type: ignore[misc]
                      reader=state["reader"], force_mpp=state.get("force_mpp"), force_mpp_warning=False)

    def __repr__(self) -> str:
        w, h = self.dimensions
        closed = ", closed" if self.closed else ""
        return f"Slide({str(self.path)!r}, {w}x{h} px, {self.mpp:.4g} um/px, {self.vendor}{closed})"


@speaks_api
def open_slide(path: str | os.PathLike[str], mpp: float | None = None, *, name: str | None = None,
               reader: ReaderChoice = "auto", force_mpp: float | None = None) -> Slide:
    """Open a whole-slide image; use it as a context manager (it closes the file).

    Parameters
    ----------
    path
        A slide file (SVS, NDPI, MRXS, SCN, OME-TIFF, tiled or plain RGB TIFF, ...) or a folder holding
        one DICOM WSI series.
    mpp
        Level-0 microns per pixel, for a file that declares none (a declared value wins).
    name
        Display name; the file name without its extension by default.
    reader
        ``"auto"``, or force ``"openslide"`` / ``"tifffile"``.
    force_mpp
        Level-0 microns per pixel that replaces the declared value, for a file that declares a wrong, implausible
        or non-square one (a warning names both when they differ by more than 5 %).

    Returns
    -------
    Slide
        With ``mpp``, ``dimensions`` and ``levels``; ``read_region(location, level, size)`` in openslide's
        order, ``read_at(location_l0, size, mpp)`` and ``thumbnail(mpp)``, all RGB uint8.

    Raises
    ------
    ConfigError
        ``mpp`` or ``force_mpp`` that is not a positive number, or a ``reader`` not named above (checked even where
        ``mpp`` goes unused).
    SlideOpenError, UnsupportedFormatError, MissingMppError
        A file that cannot be read, is no slide, or has no usable resolution (pass ``mpp``, or ``force_mpp`` for
        a declared one that is wrong).

    Examples
    --------
    >>> import wsi_screen
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     print(slide.dimensions, round(slide.mpp, 3), len(slide.levels))
    (2220, 2967) 0.499 1
    """
    return Slide(path, name=name, mpp=mpp, reader=reader, force_mpp=force_mpp)


def _location(location: object, setting: str) -> tuple[int, int]:
    """``location`` as a level-0 (x, y) of whole pixels (:class:`~wsi_screen.errors.ConfigError` otherwise: one
    number, a string, a fraction; a whole float such as 8.0 is taken, as ``size`` and ``level`` take one)."""
    try:
        xy: tuple[Any, ...] = tuple(location)  # type: ignore[arg-type]
    except TypeError:
        xy = ()
    if len(xy) != 2 or not all(isinstance(v, Real) and not isinstance(v, bool) and float(v).is_integer()
                               for v in xy):
        raise ConfigError(f"`{setting}` must be a level-0 (x, y) of whole pixels, got {location!r}")
    return int(xy[0]), int(xy[1])


def _pixel_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as a positive (w, h) in pixels (:class:`~wsi_screen.errors.ConfigError` otherwise)."""
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"`size` must be a positive (w, h) in pixels, got {size!r}") from None
    if w < 1 or h < 1:
        raise ConfigError(f"`size` must be a positive (w, h) in pixels, got {tuple(size)}")
    return w, h


#: the readers ``reader`` names (:data:`ReaderChoice`)
READERS: tuple[str, ...] = get_args(ReaderChoice)


def reader_choice(reader: object) -> ReaderChoice:
    """``reader`` if it names one of :data:`READERS`; :class:`~wsi_screen.errors.ConfigError` otherwise."""
    if not isinstance(reader, str) or reader not in READERS:
        raise ConfigError(f"`reader` must be one of {', '.join(READERS)}; got {reader!r}")
    return reader  # type: ignore[return-value]


def slide_name(path: Path) -> str:
    """A slide's display name: the file name without slide extensions, or a DICOM folder's name; a file of a
    DICOM series takes its series' name where it has one (:func:`~wsi_screen.slide.dicom_series.series_name`),
    never an instance UID."""
    if path.is_dir():
        return text_name(path.name)
    name = path.name
    if path.suffix.lower() == ".dcm":
        named = series_name(path)
        if named:
            return text_name(named)
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return text_name(name[: -len(ext)])
    return text_name(path.stem if path.suffix else name)


def text_name(name: str) -> str:
    """``name`` as valid Unicode: bytes of a file name that are not UTF-8 (a Latin-1 name from an old share)
    become ``\\xNN`` escapes, so the name can be written into JSON, CSV, HTML and zarr attributes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def resize(img: np.ndarray, size: tuple[int, int],
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Anti-aliased resize of an RGB uint8 array to ``size`` (w, h), optionally of a sub-``box``."""
    out = Image.fromarray(img).resize(size, Image.Resampling.LANCZOS, box=box)
    return np.asarray(out)


def read_mpp_table(path: str | os.PathLike[str]) -> dict[str, float]:
    """The per-slide mpp table (``slide_mpps``): a CSV with columns ``slide`` (a slide's name, file name or path)
    and ``mpp``."""
    from wsi_screen.slide.tables import first_rows, read_table

    p = Path(path)
    rows = read_table(p, ("slide", "mpp"), "`slide_mpps`")
    found: list[tuple[int, str, object]] = []
    for i, row in enumerate(rows, start=2):
        key = (row.get("slide") or "").strip()
        try:
            value = float(row.get("mpp") or "")
        except ValueError:
            raise ConfigError(f"{p}:{i}: mpp {row.get('mpp')!r} is not a number") from None
        if not key or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{p}:{i}: needs a slide name and a positive mpp")
        found.append((i, key, value))
    return {key: float(value) for key, (_, value) in first_rows(found, p, "mpp").items()}  # type: ignore[arg-type]


def warn_unmatched_mpp(table: dict[str, float], sources: Sequence[Any]) -> list[str]:
    """Warn (one line) about the rows of the per-slide mpp table that name none of ``sources`` (objects with ``path``
    and ``name``): a typo there would otherwise leave a slide at a resolution the user meant to replace."""
    named = set()
    for s in sources:
        named |= {s.name, s.path.name, str(s.path), slide_name(s.path)}
    from wsi_screen.slide.tables import few

    unmatched = sorted(k for k in table if k not in named)
    if unmatched:
        shown = few(unmatched)
        log.warning("`slide_mpps`: %d row(s) name no slide of this run (by name, file name or path): %s",
                    len(unmatched), shown)
    return unmatched


def mpp_for(table: dict[str, float] | None, path: Path, name: str) -> float | None:
    """The mpp ``table`` sets for a slide, by its name, file name or path (None if it names none)."""
    if not table:
        return None
    for key in (name, path.name, str(path), slide_name(path)):
        if key in table:
            return table[key]
    return None
