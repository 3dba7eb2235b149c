"""tifffile-backed reader that decodes the file's own tiles or strips directly (pread + imagecodecs).

Used for files OpenSlide does not read as a pyramid: OME-TIFF exports (QuPath, bfconvert), whose
sub-resolutions OpenSlide cannot see, and plain RGB TIFFs (accepted only when the user states the mpp).
Tile decoding releases the GIL and each read uses ``os.pread`` on its own descriptor, so several threads
can read from one reader at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsi_screen.errors import SlideOpenError, SlideReadError, UnsupportedFormatError

# OME length units -> microns
_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6,
              "Å": 1e-4, "pm": 1e-6}


def inspect_tiff(path: Path) -> tifffile.TiffFile | None:
    """Open ``path`` with tifffile, or return None when it is not a TIFF at all."""
    try:
        return tifffile.TiffFile(str(path))
    except (tifffile.TiffFileError, ValueError, IndexError, struct_error()):
        return None
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot read: {exc.strerror or exc}") from exc


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


class TiffReader:
    """Direct tile/strip decoder for series 0 of a TIFF and its pyramid levels."""

    name = "tifffile"

    def __init__(self, path: Path, tif: tifffile.TiffFile | None = None) -> None:
        self.path = path
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
        self.vendor = "ome-tiff" if tif.is_ome else ("aperio" if tif.is_svs else "tiff")
        dims = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        self.level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        self._fd = os.open(str(path), os.O_RDONLY)
        self._file_size = os.fstat(self._fd).st_size
        self._whole: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ metadata
    def mpp(self) -> tuple[float, float] | None:
        return ome_mpp(self._tif) if self._tif.is_ome else None

    def properties(self) -> dict[str, str]:
        page = self._pages[0]
        return {
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
    def read_region(self, level: int, xy_l0: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        page = self._pages[level]
        ds = self.level_downsamples[level]
        x0 = math.floor(xy_l0[0] / ds + 1e-9)
        y0 = math.floor(xy_l0[1] / ds + 1e-9)
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        W, H = self.level_dimensions[level]
        # intersection of the request with the image
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, W), min(y0 + h, H)
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
                index = ty * ncols + tx
                tile = self._decode(page, index, level)
                # paste the overlap of tile (ty*ch.., tx*cw..) with the request
                tx0, ty0 = tx * cw, ty * ch
                sx0, sy0 = max(ix0, tx0), max(iy0, ty0)
                sx1 = min(ix1, tx0 + tile.shape[1])
                sy1 = min(iy1, ty0 + tile.shape[0])
                if sx0 >= sx1 or sy0 >= sy1:
                    continue
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0]
        return out

    def _decode(self, page: Any, index: int, level: int) -> np.ndarray:
        try:
            offset = int(page.dataoffsets[index])
            count = int(page.databytecounts[index])
        except IndexError as exc:
            raise SlideReadError(f"{self.path}: level {level} has no chunk {index} (truncated file?)") from exc
        if count == 0:  # sparse tile: nothing scanned there
            return np.full((int(page.chunks[0]), int(page.chunks[1]), 3), 255, dtype=np.uint8)
        if offset + count > self._file_size:
            raise SlideReadError(f"{self.path}: tile data lies beyond the end of the file (truncated)")
        data = os.pread(self._fd, count, offset)
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
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._tif.close()
