"""tifffile-backed reader that decodes the file's own tiles or strips directly (pread + imagecodecs).

Used for files OpenSlide does not read as a pyramid: OME-TIFF exports (QuPath, bfconvert), whose
sub-resolutions OpenSlide cannot see, and plain RGB TIFFs. Their resolution: OME's PhysicalSize, Aperio's
``MPP =``, or X/YResolution in pixels per centimetre (OpenSlide's rules); else the user must state it.
Tile decoding releases the GIL and each read uses ``os.pread`` on its own descriptor, so several threads
can read from one reader at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import weakref
import xml.etree.ElementTree as ET
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsi_screen.errors import SlideOpenError, SlideReadError, UnsupportedFormatError
from wsi_screen.slide.readers import into

#: decoded tiles kept per reader (LRU). The tiler reads patches in band order (``tiling.BAND_COLUMNS``): each
#: row of tiles serves about two rows of patches, so decoding every tile once takes ~2.5 rows of tiles across
#: one band: 73 tiles of 256 px (14 MB) for 224-px patches at 0.5 um/px from a 0.5 um/px scan, 140 (27 MB)
#: from a 0.25 um/px scan (larger patches decode some tiles twice). A fixed size keeps memory independent of
#: the slide's size.
TILE_CACHE_BYTES = 32 << 20

# OME length units -> microns
_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6,
              "Å": 1e-4, "pm": 1e-6}


#: Hamamatsu's private tag: present in the first IFD of every NDPI file
NDPI_FORMAT_FLAG = 65420


def is_ndpi(path: Path) -> bool:
    """Whether ``path`` is a Hamamatsu NDPI by its content (the first IFD holds :data:`NDPI_FORMAT_FLAG`).

    tifffile decides by the file name: an Aperio SVS or a generic TIFF named ``.ndpi`` would be parsed with
    NDPI's 64-bit offsets and read as garbage, while OpenSlide (rightly) goes by the content.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8 or head[:4] != b"II*\x00":  # NDPI is a classic little-endian TIFF
                return False
            fh.seek(int.from_bytes(head[4:8], "little"))
            count = int.from_bytes(fh.read(2), "little")
            entries = fh.read(12 * min(count, 4096))
    except OSError:
        return False
    return any(int.from_bytes(entries[i:i + 2], "little") == NDPI_FORMAT_FLAG for i in range(0, len(entries) - 1, 12))


def inspect_tiff(path: Path) -> tifffile.TiffFile | None:
    """Open ``path`` with tifffile, or return None when it is not a TIFF at all."""
    try:
        return tifffile.TiffFile(str(path), is_ndpi=is_ndpi(path))
    except (tifffile.TiffFileError, ValueError, IndexError, struct_error()):
        return None
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot read: {exc.strerror or exc}") from exc


#: TIFF compressions the direct decoder serves for OpenSlide formats: JPEG, and JPEG 2000 in RGB (Aperio 33005,
#: generic 34712). Aperio's YCbCr JPEG 2000 (33003) stays with OpenSlide, which converts its colours.
FAST_COMPRESSIONS = frozenset({7, 33005, 34712})
#: OpenSlide vendors whose files are plain tiled TIFF pyramids tifffile reads the same way
FAST_VENDORS = frozenset({"aperio", "generic-tiff"})


def fast_path_ok(tif: tifffile.TiffFile, vendor: str, level_dimensions: tuple[tuple[int, int], ...]) -> bool:
    """Whether the direct tile decoder can serve a file OpenSlide opened as ``vendor``, pixel for pixel."""
    if vendor not in FAST_VENDORS or tif.is_ome:
        return False
    try:
        levels = tif.series[0].levels or [tif.series[0]]
        pages = [lvl.keyframe for lvl in levels]
    except (IndexError, ValueError, KeyError):
        return False
    dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
    return dims == tuple(level_dimensions) and all(
        p.is_tiled and int(p.compression) in FAST_COMPRESSIONS and int(p.planarconfig) == 1
        and int(p.photometric) in (2, 6) for p in pages)


#: a 0xFF byte that is neither stuffed (0xFF00) nor a restart marker (0xFFD0-0xFFD7), or ends the data
_BAD_FF = re.compile(rb"\xff(?![\x00\xd0-\xd7])")


def jpeg_stream_ok(data: bytes) -> bool:
    """Structural check of a (possibly abbreviated) JPEG stream, as strict as OpenSlide's decoder.

    libjpeg only *warns* about damaged entropy-coded data and fills the rest of the tile; OpenSlide treats
    that as an error and so do we. After the last SOS header, every 0xFF byte must be a stuffed 0xFF00 or a
    restart marker, and the stream must end with EOI. Costs microseconds per tile.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[-2] != 0xFF or data[-1] != 0xD9:
        return False
    i = 2
    while i + 4 <= n:  # header segments up to the start of scan
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return False
        i += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
    else:
        return False
    # in the entropy-coded data every 0xFF must be a stuffed 0xFF00 or a restart marker (one regex scan, ~0.6 us
    # per kB: this runs once per decoded tile, holding the GIL)
    return _BAD_FF.search(data, i, n - 2) is None


def check_intact(tif: tifffile.TiffFile, path: Path) -> None:
    """Raise :class:`SlideOpenError` when the file is cut short or its IFD chain is broken.

    tifffile stops quietly (logging only) at an IFD offset past the end of the file, and then shows a
    truncated slide as a smaller, valid-looking TIFF. An intact chain ends with a zero offset, and every
    tile or strip of series 0 lies inside the file.
    """
    fh = tif.filehandle
    problem = ""
    try:
        pos = tif.pages.next_page_offset
        if pos is not None:
            fh.seek(pos)
            raw = fh.read(tif.tiff.offsetsize)
            if len(raw) != tif.tiff.offsetsize or int.from_bytes(raw, "big" if tif.byteorder == ">" else "little"):
                problem = "its directory chain points past the end of the file or loops"
        series = tif.series[0]
        for level in series.levels or [series]:
            page = level.keyframe
            ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
            if not problem and ends and max(ends) > fh.size:
                problem = (f"pixel data of its {page.imagewidth} x {page.imagelength} level lies past the end of "
                           "the file")
    except (IndexError, ValueError, KeyError, OSError, struct_error()) as exc:
        problem = f"malformed structure: {exc}"
    if problem:
        raise SlideOpenError(f"{path}: truncated or corrupt TIFF ({problem})")


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def check_brightfield(tif: tifffile.TiffFile, path: Path) -> None:
    """Raise UnsupportedFormatError unless series 0 is 8-bit RGB(A) brightfield pixels."""
    series = tif.series[0]
    page = series.keyframe
    if series.dtype != np.uint8 and page.dtype != np.uint8:
        raise UnsupportedFormatError(f"{path}: {page.dtype} pixels ({page.bitspersample}-bit); wsi-screen "
                                     "reads 8-bit brightfield RGB slides")
    samples = int(page.samplesperpixel)
    pages_per_level = len(series.levels[0].pages) if series.levels else len(series.pages)
    if samples == 1 and pages_per_level > 1:
        raise UnsupportedFormatError(f"{path}: multi-channel image ({pages_per_level} planes of one "
                                     "channel each, e.g. fluorescence); wsi-screen reads brightfield RGB")
    if samples == 1:
        raise UnsupportedFormatError(f"{path}: grayscale image; wsi-screen reads brightfield RGB slides")
    if samples not in (3, 4):
        raise UnsupportedFormatError(f"{path}: {samples} channels per pixel; wsi-screen reads "
                                     "brightfield RGB slides")


def ome_mpp(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Image, in microns, or None."""
    xml = tif.ome_metadata
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("}Pixels") or el.tag == "Pixels":
            try:
                sx = float(el.attrib["PhysicalSizeX"])
                sy = float(el.attrib.get("PhysicalSizeY", sx))
            except (KeyError, ValueError):
                return None
            fx = _OME_UNITS.get(el.attrib.get("PhysicalSizeXUnit", "µm"))
            fy = _OME_UNITS.get(el.attrib.get("PhysicalSizeYUnit", "µm"))
            if fx is None or fy is None:
                return None
            return sx * fx, sy * fy
    return None


def aperio_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """``MPP = x`` of an Aperio (SVS) ImageDescription, as OpenSlide reads it, or None."""
    description = page.description or ""
    if not description.startswith("Aperio"):
        return None
    found = re.search(r"\|\s*MPP\s*=\s*([^|\s]+)", description)
    try:
        value = float(found.group(1)) if found else math.nan
    except ValueError:
        return None
    return (value, value) if math.isfinite(value) else None


def centimetre_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """X/YResolution in pixels per centimetre as microns per pixel (OpenSlide's rule for generic TIFFs: inch
    resolutions are usually a screen's 72 or 300 dpi, not a scan's), or None."""
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    if unit is None or int(unit.value) != 3:  # RESUNIT.CENTIMETER
        return None
    try:
        per_cm = [float(n) / float(d) for n, d in (tags["XResolution"].value, tags["YResolution"].value)]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in per_cm):
        return None
    return 1e4 / per_cm[0], 1e4 / per_cm[1]


class TiffReader:
    """Direct tile/strip decoder for series 0 of a TIFF and its pyramid levels."""

    name = "tifffile"

    def __init__(self, path: Path, tif: tifffile.TiffFile | None = None, *, vendor: str | None = None,
                 mpp: tuple[float, float] | None = None, properties: dict[str, str] | None = None) -> None:
        """Open series 0 of ``path``; ``vendor``, ``mpp`` and ``properties`` may come from OpenSlide."""
        self.path = path
        self._declared_mpp = mpp
        self._extra_properties = dict(properties or {})
        tif = tif if tif is not None else inspect_tiff(path)
        if tif is None:
            raise UnsupportedFormatError(f"{path}: not a TIFF file")
        self._tif = tif
        try:
            check_brightfield(tif, path)
            series = tif.series[0]
            levels = series.levels or [series]
            self._pages = [lvl.keyframe for lvl in levels]
        except (IndexError, ValueError, KeyError) as exc:
            tif.close()
            raise SlideOpenError(f"{path}: malformed TIFF structure: {exc}") from exc
        except UnsupportedFormatError:
            tif.close()
            raise
        self.vendor = vendor or ("ome-tiff" if tif.is_ome else ("aperio" if tif.is_svs else "tiff"))
        dims = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        self.level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        self._fd = os.open(str(path), os.O_RDONLY)
        # closes the descriptor and the TIFF once: on close(), or when a reader nobody closed is collected (a
        # notebook's `slide = open_slide(...)` run again and again would otherwise hold one descriptor per run)
        self._release = weakref.finalize(self, _release, self._fd, tif)
        self._file_size = os.fstat(self._fd).st_size
        self._whole: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._decoding: dict[tuple[int, int], Future[np.ndarray]] = {}
        self._cache_bytes = 0

    # ------------------------------------------------------------------ metadata
    def mpp(self) -> tuple[float, float] | None:
        if self._declared_mpp is not None:
            return self._declared_mpp
        if self._tif.is_ome:
            return ome_mpp(self._tif)
        return aperio_mpp(self._pages[0]) or centimetre_mpp(self._pages[0])

    def properties(self) -> dict[str, str]:
        page = self._pages[0]
        return {
            **self._extra_properties,
            "tiff.compression": str(page.compression.name if hasattr(page.compression, "name")
                                    else page.compression),
            "tiff.photometric": str(getattr(page.photometric, "name", page.photometric)),
            "tiff.tiled": str(bool(page.is_tiled)),
            "tiff.levels": str(len(self._pages)),
        }

    def compression(self, level: int = 0) -> int:
        """TIFF compression code of ``level`` (7 JPEG, 33003/33005 Aperio JPEG 2000, ...)."""
        return int(self._pages[level].compression)

    # ------------------------------------------------------------------ pixels
    def read_region(self, level: int, xy_l0: tuple[int, int], size: tuple[int, int],
                    out: np.ndarray | None = None) -> np.ndarray:
        """Pixels of ``level`` from level-0 ``xy_l0``; sub-pixel positions are interpolated bilinearly.
        Whole-pixel regions are copied from the decoded tiles straight into ``out`` when it is given.

        A level-0 position rarely falls on a whole pixel of a reduced level; like OpenSlide, the region is
        then resampled at the exact fractional offset (so both readers agree within a grey level or two).
        """
        ds = self.level_downsamples[level]
        fx, fy = xy_l0[0] / ds, xy_l0[1] / ds
        x0, y0 = math.floor(fx + 1e-9), math.floor(fy + 1e-9)
        tx, ty = fx - x0, fy - y0
        tx = 0.0 if tx < 1e-6 else tx
        ty = 0.0 if ty < 1e-6 else ty
        w, h = int(size[0]), int(size[1])
        if tx == 0.0 and ty == 0.0:
            return self._read_level(level, x0, y0, w, h, out)
        raw = self._read_level(level, x0, y0, w + 1, h + 1).astype(np.float32)
        mixed = ((1 - tx) * (1 - ty)) * raw[:h, :w] + (tx * (1 - ty)) * raw[:h, 1:] \
            + ((1 - tx) * ty) * raw[1:, :w] + (tx * ty) * raw[1:, 1:]
        return into(out, np.floor(mixed + 0.5).astype(np.uint8))

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Whole pixels ``[x0, x0 + w) x [y0, y0 + h)`` of ``level`` (into ``out`` if given); white outside
        the image."""
        page = self._pages[level]
        W, H = self.level_dimensions[level]
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, W), min(y0 + h, H)
        if out is None:
            out = np.empty((h, w, 3), dtype=np.uint8)
        if (ix0, iy0, ix1, iy1) != (x0, y0, x0 + w, y0 + h):
            out[...] = 255  # part of the region lies outside the image
        if ix0 >= ix1 or iy0 >= iy1:
            return out
        if int(page.planarconfig) != 1 or not page.dataoffsets:
            whole = self._whole_page(level)
            out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = whole[iy0:iy1, ix0:ix1, :3]
            return out
        ch, cw = int(page.chunks[0]), int(page.chunks[1])
        ncols = int(page.chunked[1]) if page.is_tiled else 1
        for ty in range(iy0 // ch, (iy1 - 1) // ch + 1):
            for tx in range(ix0 // cw, (ix1 - 1) // cw + 1):
                tile = self._tile(page, ty * ncols + tx, level)
                tx0, ty0 = tx * cw, ty * ch
                sx0, sy0 = max(ix0, tx0), max(iy0, ty0)
                sx1, sy1 = min(ix1, tx0 + cw), min(iy1, ty0 + ch)
                if tile.shape[1] < sx1 - tx0 or tile.shape[0] < sy1 - ty0:
                    raise SlideReadError(f"{self.path}: tile {ty * ncols + tx} at level {level} is smaller "
                                         "than the TIFF declares")
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0]
        return out

    def _tile(self, page: Any, index: int, level: int) -> np.ndarray:
        """A decoded tile, from the small LRU cache when neighbouring patches already needed it.

        A tile is decoded once even when reader threads ask for it at the same moment (neighbouring patches
        in flight on two threads share tiles): the later ones wait for the first decode.
        """
        key = (level, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
            pending = self._decoding.get(key)
            if pending is None:
                pending = self._decoding[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            tile = self._decode(page, index, level)
        except BaseException as exc:
            with self._lock:
                del self._decoding[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._decoding[key]
            self._cache[key] = tile
            self._cache_bytes += tile.nbytes
            while self._cache_bytes > TILE_CACHE_BYTES and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        pending.set_result(tile)
        return tile

    def _decode(self, page: Any, index: int, level: int) -> np.ndarray:
        try:
            offset = int(page.dataoffsets[index])
            count = int(page.databytecounts[index])
        except IndexError as exc:
            raise SlideReadError(f"{self.path}: level {level} has no chunk {index} (truncated file?)") from exc
        if count == 0:  # no data: never shown as white glass (the slide is damaged, or a format we do not know)
            raise SlideReadError(f"{self.path}: tile {index} at level {level} holds no pixel data (byte count 0)")
        if offset + count > self._file_size:
            raise SlideReadError(f"{self.path}: tile data lies beyond the end of the file (truncated)")
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise SlideReadError(f"{self.path}: tile {index} at level {level} is cut short (truncated file)")
        if int(page.compression) == 7 and not jpeg_stream_ok(data):
            raise SlideReadError(f"{self.path}: corrupt JPEG data in tile {index} at level {level}")
        try:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # imagecodecs raises its own error types per codec
            raise SlideReadError(f"{self.path}: corrupt tile data at level {level}, tile {index}: "
                                 f"{' '.join(str(exc).split()) or type(exc).__name__}") from exc
        if segment is None:
            raise SlideReadError(f"{self.path}: tile {index} at level {level} could not be decoded")
        tile = np.asarray(segment)
        tile = tile.reshape(tile.shape[-3:])  # (1, h, w, s) -> (h, w, s)
        return tile[..., :3]

    def _whole_page(self, level: int) -> np.ndarray:
        with self._lock:
            if level not in self._whole:
                try:
                    arr = self._pages[level].asarray()
                except Exception as exc:
                    raise SlideReadError(f"{self.path}: cannot decode level {level}: {exc}") from exc
                if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
                    arr = np.moveaxis(arr, 0, -1)
                self._whole[level] = np.ascontiguousarray(arr[..., :3])
            return self._whole[level]

    def close(self) -> None:
        self._release()


def _release(fd: int, tif: tifffile.TiffFile) -> None:
    """Close a reader's descriptor and TIFF (its finalizer: no reference to the reader itself)."""
    with contextlib.suppress(OSError):
        os.close(fd)
    tif.close()
