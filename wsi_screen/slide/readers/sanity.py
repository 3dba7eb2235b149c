"""Header sanity checks, run before any reader parses a file or allocates for it.

A corrupt header can make a reader loop forever (a TIFF directory chain that points back into itself),
allocate gigabytes (a DICOM declaring a million columns), divide by zero (a tile width of 0), segfault
(a DICOM offset table pointing past the end of the file) or quietly show missing tiles as white glass.
These checks read only the headers (a few kB) and refuse such a file in milliseconds with a line that
says what is wrong:

* TIFF (SVS, generic and OME-TIFF, ...): the directory chain is followed with a visited set (a loop or a
  pointer past the end of the file is an error), every image's dimensions and tile size must be plausible,
  the reduced levels an OME-TIFF lists in SubIFDs too,
  it must have as many tile offsets and byte counts as its size needs, and the pixel data of its largest
  image (level 0, where patches are read) must lie inside the file with no tile of zero bytes;
* DICOM (a series folder or one file): every file of the series must be readable and of the same series;
  image and tile dimensions plausible; a tiled image's frame count must match its size; the offset table
  of its frames must point inside the file; a whole-slide image's Image Type must say what the image is
  (VOLUME, LABEL, ...: OpenSlide's "Couldn't get image flavor" otherwise).

NDPI (64-bit offsets hidden in a classic TIFF) and Philips TIFF (sparse tiles by design) are left to
OpenSlide's own checks.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

from wsi_screen.errors import SlideOpenError

#: largest side an image may declare (as wsi_screen.slide.slide.MAX_SIDE_PX)
MAX_SIDE_PX = 2_000_000
#: largest tile edge a TIFF may declare (scanners write 240-4096; JPEG itself stops at 65,500)
MAX_TILE_PX = 16_384
#: largest DICOM frame edge (Rows and Columns are 16-bit)
MAX_FRAME_PX = 65_535
#: MediaStorageSOPClassUID of a VL Whole Slide Microscopy Image (what OpenSlide reads)
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: most directories a TIFF may chain (slides have a handful; z-stacks a few hundred)
MAX_IFDS = 100_000

_TIFF_TYPES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_WIDTH, _LENGTH, _STRIP_OFFSETS, _ROWS_PER_STRIP, _STRIP_COUNTS = 256, 257, 273, 278, 279
_TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS, _DESCRIPTION = 322, 323, 324, 325, 270
_SAMPLES, _PLANAR, _SUBIFDS = 277, 284, 330
#: struct formats of the TIFF types a size or offset tag may have (13, 18: IFD and IFD8, SubIFDs' offsets)
_INTEGER_FORMATS = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}
#: most reduced levels one directory may list in SubIFDs (OME-TIFF pyramids have a handful)
MAX_SUBIFDS = 64


def _corrupt(path: Path, what: str) -> SlideOpenError:
    return SlideOpenError(f"{path}: truncated or corrupt TIFF ({what})")


class _Tiff:
    """Raw directory access to a TIFF (classic or BigTIFF, either byte order)."""

    def __init__(self, fh: Any, path: Path, size: int) -> None:
        self.fh, self.path, self.size = fh, path, size
        head = fh.read(16)
        self.endian = "<" if head[:2] == b"II" else ">"
        self.big = struct.unpack(self.endian + "H", head[2:4])[0] == 43
        if self.big:
            self.count_fmt, self.entry_size, self.off_fmt = "Q", 20, "Q"
            self.first = struct.unpack(self.endian + "Q", head[8:16])[0]
        else:
            self.count_fmt, self.entry_size, self.off_fmt = "H", 12, "I"
            self.first = struct.unpack(self.endian + "I", head[4:8])[0]
        self.off_size = struct.calcsize(self.off_fmt)

    def _read(self, offset: int, n: int) -> bytes:
        self.fh.seek(offset)
        data: bytes = self.fh.read(n)
        if len(data) != n:
            raise _corrupt(self.path, f"a directory at byte {offset} runs past the end of the file")
        return data

    def directory(self, offset: int) -> tuple[dict[int, tuple[int, int, int]], int]:
        """``{tag: (type, count, value field offset)}`` of the IFD at ``offset``, and the next IFD's offset."""
        count_size = struct.calcsize(self.count_fmt)
        n = struct.unpack(self.endian + self.count_fmt, self._read(offset, count_size))[0]
        if n == 0 or n > 4096:
            raise _corrupt(self.path, f"the directory at byte {offset} declares {n} entries")
        raw = self._read(offset + count_size, n * self.entry_size + self.off_size)
        tags: dict[int, tuple[int, int, int]] = {}
        for i in range(n):
            e = raw[i * self.entry_size:(i + 1) * self.entry_size]
            tag, typ = struct.unpack(self.endian + "HH", e[:4])
            count = struct.unpack(self.endian + self.count_fmt.replace("H", "I"), e[4:4 + self.off_size])[0]
            tags[tag] = (typ, count, offset + count_size + i * self.entry_size + 4 + self.off_size)
        nxt = struct.unpack(self.endian + self.off_fmt, raw[n * self.entry_size:])[0]
        return tags, nxt

    def values(self, entry: tuple[int, int, int], limit: int | None = None) -> list[int]:
        """The integer values of a tag (its first ``limit`` values)."""
        typ, count, field_at = entry
        width = _TIFF_TYPES.get(typ)
        if width is None or typ not in _INTEGER_FORMATS:
            raise _corrupt(self.path, f"a size or offset tag has data type {typ}")
        n = count if limit is None else min(count, limit)
        nbytes = width * count
        if nbytes <= self.off_size:
            at = field_at
        else:
            at = struct.unpack(self.endian + self.off_fmt, self._read(field_at, self.off_size))[0]
            if at + nbytes > self.size:
                raise _corrupt(self.path, f"a tag's {count} values lie past the end of the file")
        fmt = _INTEGER_FORMATS[typ]
        return list(struct.unpack(f"{self.endian}{n}{fmt}", self._read(at, width * n)))

    def text(self, entry: tuple[int, int, int], limit: int = 512) -> bytes:
        _typ, count, field_at = entry
        n = min(count, limit)
        if count <= self.off_size:
            return self._read(field_at, n)
        at = struct.unpack(self.endian + self.off_fmt, self._read(field_at, self.off_size))[0]
        return self._read(at, n) if at + n <= self.size else b""


def check_tiff(path: Path) -> None:
    """Refuse a TIFF whose directories loop, point outside the file or declare impossible images (see the
    module docstring). Files that are not TIFF, NDPI and Philips TIFF pass untouched."""
    from wsi_screen.slide.readers.tiff_reader import is_ndpi

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            magic = fh.read(4)
            if magic[:2] not in (b"II", b"MM") or magic[2:4] not in (b"*\x00", b"\x00*", b"+\x00", b"\x00+"):
                return
            if is_ndpi(path):
                return
            fh.seek(0)
            tif = _Tiff(fh, path, size)
            _check_chain(tif)
    except SlideOpenError:
        raise
    except (OSError, struct.error, ValueError) as exc:
        raise _corrupt(path, f"unreadable directory: {exc}") from exc


def _check_chain(tif: _Tiff) -> None:
    seen: set[int] = set()
    offset = tif.first
    largest: tuple[int, dict[int, tuple[int, int, int]]] | None = None
    index = 0
    while offset:
        if offset in seen:
            raise _corrupt(tif.path, f"its directory chain loops back to byte {offset}")
        if offset >= tif.size:
            raise _corrupt(tif.path, "its directory chain points past the end of the file")
        if len(seen) >= MAX_IFDS:
            raise _corrupt(tif.path, f"more than {MAX_IFDS} directories")
        seen.add(offset)
        tags, nxt = tif.directory(offset)
        if index == 0 and _DESCRIPTION in tags and b"DPUfsImport" in tif.text(tags[_DESCRIPTION]):
            return  # Philips TIFF: sparse tiles by design; OpenSlide checks it
        area = _check_image(tif, tags, index)
        if area and (largest is None or area > largest[0]):
            largest = (area, tags)
        if _SUBIFDS in tags:
            _check_subifds(tif, tif.values(tags[_SUBIFDS], MAX_SUBIFDS), index, seen)
        offset, index = nxt, index + 1
    if largest is not None:
        _check_level0_data(tif, largest[1])


def _check_subifds(tif: _Tiff, offsets: list[int], index: int, seen: set[int]) -> None:
    """The reduced levels image ``index`` lists in SubIFDs, checked as the main chain's images are (readers open
    them as pyramid levels). Offsets outside the file or already visited are left to the reader, which reads
    around them (tifffile skips such a level)."""
    for j, sub in enumerate(offsets):
        if 0 < sub < tif.size and sub not in seen:
            seen.add(sub)
            tags, _next = tif.directory(sub)
            _check_image(tif, tags, f"{index} (reduced level {j + 1})")


def _check_image(tif: _Tiff, tags: dict[int, tuple[int, int, int]], index: int | str) -> int:
    """Plausible dimensions, tile size and chunk counts of one directory; its pixel area (0: no image)."""
    if _WIDTH not in tags or _LENGTH not in tags:
        return 0
    w, h = tif.values(tags[_WIDTH], 1)[0], tif.values(tags[_LENGTH], 1)[0]
    where = f"image {index}"
    if not (0 < w <= MAX_SIDE_PX and 0 < h <= MAX_SIDE_PX):
        raise _corrupt(tif.path, f"{where} declares {w} x {h} px")
    planes = 1
    if _PLANAR in tags and tif.values(tags[_PLANAR], 1)[0] == 2 and _SAMPLES in tags:
        planes = max(1, tif.values(tags[_SAMPLES], 1)[0])
    if _TILE_WIDTH in tags or _TILE_LENGTH in tags:
        if _TILE_WIDTH not in tags or _TILE_LENGTH not in tags:
            raise _corrupt(tif.path, f"{where} declares only one of its tile width and length")
        tw, th = tif.values(tags[_TILE_WIDTH], 1)[0], tif.values(tags[_TILE_LENGTH], 1)[0]
        if not (0 < tw <= MAX_TILE_PX and 0 < th <= MAX_TILE_PX):
            raise _corrupt(tif.path, f"{where} declares tiles of {tw} x {th} px")
        needed = math.ceil(w / tw) * math.ceil(h / th) * planes
        offsets, counts = tags.get(_TILE_OFFSETS), tags.get(_TILE_COUNTS)
    else:
        rows = tif.values(tags[_ROWS_PER_STRIP], 1)[0] if _ROWS_PER_STRIP in tags else h
        rows = min(max(rows, 1), h)
        needed = math.ceil(h / rows) * planes
        offsets, counts = tags.get(_STRIP_OFFSETS), tags.get(_STRIP_COUNTS)
    if offsets is None or counts is None:
        raise _corrupt(tif.path, f"{where} has no tile or strip offsets")
    if offsets[1] != needed or counts[1] != needed:  # a damaged size or tile size shows as a wrong count
        raise _corrupt(tif.path, f"{where} ({w} x {h} px) needs {needed} tiles or strips but lists "
                                 f"{offsets[1] if offsets[1] != needed else counts[1]}")
    return w * h


def _check_level0_data(tif: _Tiff, tags: dict[int, tuple[int, int, int]]) -> None:
    """Every chunk of the largest image holds data inside the file."""
    tiled = _TILE_OFFSETS in tags
    offsets = tif.values(tags[_TILE_OFFSETS if tiled else _STRIP_OFFSETS])
    counts = tif.values(tags[_TILE_COUNTS if tiled else _STRIP_COUNTS])
    w, h = tif.values(tags[_WIDTH], 1)[0], tif.values(tags[_LENGTH], 1)[0]
    n = min(len(offsets), len(counts))
    empty = sum(1 for c in counts[:n] if c == 0)
    what = "tiles" if tiled else "strips"
    if empty:
        raise SlideOpenError(f"{tif.path}: {empty} of the {n} {what} of its {w} x {h} px level 0 hold no pixel "
                             "data (byte count 0); the slide is damaged")
    beyond = sum(1 for o, c in zip(offsets[:n], counts[:n], strict=True) if o + c > tif.size)
    if beyond:
        raise SlideOpenError(f"{tif.path}: {beyond} of the {n} {what} of its {w} x {h} px level 0 lie past the end "
                             "of the file (truncated or damaged)")


# ------------------------------------------------------------------------------------------------ DICOM
def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def check_dicom(files: list[Path], *, series: bool) -> tuple[int, int]:
    """Refuse DICOM files whose headers are unreadable, of different series, or declare impossible images
    (see the module docstring); ``series``: the files are one folder's series. Returns the largest image's
    (columns, rows): the level 0 a reader must offer."""
    import pydicom

    uids: set[str] = set()
    largest = (0, 0)
    for f in files:
        try:
            with f.open("rb") as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
                pixels_at = fh.tell()
        except Exception as exc:  # pydicom raises many types for a damaged header
            what = " ".join(str(exc).split()) or type(exc).__name__
            raise SlideOpenError(f"{f}: unreadable DICOM header ({what})"
                                 + ("; the series cannot be read without it" if series else "")) from exc
        uid = str(ds.get("SeriesInstanceUID", ""))
        uids.add(uid)
        if series and len(uids) > 1:
            raise SlideOpenError(f"{f.parent}: its .dcm files belong to {len(uids)} different series")
        dims = _check_dicom_image(f, ds, pixels_at)
        if dims[0] * dims[1] > largest[0] * largest[1]:
            largest = dims
    return largest


def _check_dicom_image(f: Path, ds: Any, pixels_at: int) -> tuple[int, int]:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if "Rows" not in ds and "Columns" not in ds:
        return 0, 0  # not an image (the reader says so)
    if not (0 < rows <= MAX_FRAME_PX and 0 < cols <= MAX_FRAME_PX):
        raise SlideOpenError(f"{f}: corrupt DICOM header (frames of {cols} x {rows} px)")
    total_c = int(ds.get("TotalPixelMatrixColumns", cols) or 0)
    total_r = int(ds.get("TotalPixelMatrixRows", rows) or 0)
    if not (0 < total_c <= MAX_SIDE_PX and 0 < total_r <= MAX_SIDE_PX):
        raise SlideOpenError(f"{f}: corrupt DICOM header (image of {total_c} x {total_r} px)")
    frames = int(ds.get("NumberOfFrames", 1) or 0)
    size = f.stat().st_size
    if frames < 1 or frames > max(1, size - pixels_at) // 8:
        raise SlideOpenError(f"{f}: corrupt DICOM header ({frames} frames in a {size:,}-byte file)")
    if str(ds.get("DimensionOrganizationType", "")) == "TILED_FULL":
        planes = int(ds.get("NumberOfOpticalPaths", 1) or 1) * int(ds.get("TotalPixelMatrixFocalPlanes", 1) or 1)
        needed = math.ceil(total_c / cols) * math.ceil(total_r / rows) * planes
        if frames != needed:
            raise SlideOpenError(f"{f}: corrupt DICOM header ({total_c} x {total_r} px in {cols} x {rows} px "
                                 f"tiles needs {needed} frames; it declares {frames})")
    if ds.file_meta.get("TransferSyntaxUID") is not None and ds.file_meta.TransferSyntaxUID.is_encapsulated:
        _check_offset_table(f, pixels_at, size, ds.file_meta.TransferSyntaxUID.is_little_endian)
    image_type = [str(v).upper() for v in _values(ds.get("ImageType"))]
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == WSI_SOP_CLASS and len(image_type) < 3:
        raise SlideOpenError(f"{f}: {image_type_problem(image_type)}")
    return (total_c, total_r) if "VOLUME" in image_type or not image_type else (0, 0)


def _values(value: Any) -> list[Any]:
    """A DICOM element's values as a list (one value comes back bare from pydicom)."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def image_type_problem(image_type: list[str] | None = None) -> str:
    """What is wrong with a whole-slide DICOM image whose Image Type lacks the value naming the image's kind
    (OpenSlide's "Couldn't get image flavor"), and what to do about it."""
    shown = "Image Type " + "\\".join(image_type) if image_type else "its Image Type"
    return (f"not a conformant DICOM whole-slide image: {shown} lacks the third value that says what the image "
            "is (VOLUME for a pyramid level, LABEL, OVERVIEW or THUMBNAIL), so its pyramid cannot be read; export "
            "the slide again with a DICOM-conformant converter, or convert it to OME-TIFF (QuPath, bfconvert)")


def _check_offset_table(f: Path, pixels_at: int, size: int, little: bool) -> None:
    """The encapsulated pixel data's Basic Offset Table entries must point inside the file."""
    e = "<" if little else ">"
    with f.open("rb") as fh:
        fh.seek(pixels_at)
        head = fh.read(20)
        if len(head) < 12:
            raise SlideOpenError(f"{f}: DICOM pixel data missing (truncated file)")
        group, element = struct.unpack(e + "HH", head[:4])
        if (group, element) != (0x7FE0, 0x0010):
            return
        at = pixels_at + 12 if head[4:6] in (b"OB", b"OW") else pixels_at + 8
        fh.seek(at)
        item = fh.read(8)
        if len(item) < 8:
            raise SlideOpenError(f"{f}: DICOM pixel data cut short (truncated file)")
        tag_g, tag_e, length = struct.unpack(e + "HHI", item)
        if (tag_g, tag_e) != (0xFFFE, 0xE000) or length % 4 or at + 8 + length > size:
            raise SlideOpenError(f"{f}: corrupt DICOM pixel data (no valid offset table item)")
        first_item = at + 8 + length
        table = struct.unpack(f"{e}{length // 4}I", fh.read(length)) if length else ()
    if any(first_item + off >= size for off in table):
        raise SlideOpenError(f"{f}: corrupt DICOM pixel data (its frame offset table points past the end of the "
                             "file)")
    if list(table) != sorted(table):
        raise SlideOpenError(f"{f}: corrupt DICOM pixel data (its frame offset table is out of order)")
