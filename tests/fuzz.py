"""Seeded corrupt variants of the real slides, and a runner that tiles them and sorts out what happened.

:func:`build_variants` writes variants of the CMU slides (Aperio SVS, generic pyramid TIFF, an OME-TIFF made
from the SVS pixels, the DICOM series and its level-0 file on its own), each damaged one way: a flipped or
overwritten byte, a cut, a TIFF tag or IFD pointer set to something absurd, a DICOM attribute or offset table
entry out of range. Every edit is made in place on the copied bytes (pydicom re-saves the few DICOM attribute
edits); nothing is re-encoded. A variant depends only on ``(seed, its index in the full corpus)``, so the
subset that ``n`` selects holds byte-identical copies of full-corpus variants.

:func:`run_fuzz` tiles the variants in batches (one ``wsi-screen tile --quiet`` process per batch, beside a
good slide) and classifies each variant (see :data:`VARIANT_OUTCOMES`) and each batch (see
:data:`BATCH_FAILURES`). ``scripts/fuzz_slides.py`` is its command line; ``tests/features/test_fuzz.py`` its test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from tests.factory import write_ome_tiff

# ------------------------------------------------------------------------------------------------ the plan
FORMATS = ("svs", "pyramid-tiff", "ome-tiff", "dicom-series", "dicom-file")
TIFF_FORMATS = FORMATS[:3]
DICOM_FORMATS = FORMATS[3:]

SVS = "CMU-1-Small-Region.svs"
PYRAMID = "CMU-1-Small-Region.pyramid.tif"
DICOM_DIR = "CMU-1-Small-Region dicom"
GOOD = "good.svs"

#: the OME-TIFF source: the SVS's level 0 cropped to this square, written with this resolution and tile
OME_SIDE = 2048
OME_MPP = 0.499
OME_TILE = 256

_COMMON = {"flip": 35, "overwrite": 20, "truncate": 12}
_TIFF = {"ifd-past-eof": 6, "ifd-loop": 6, "dims-huge": 6, "dims-zero": 4, "tile-zero": 4, "tile-huge": 4,
         "bytecounts-zero": 3, "offsets-past-eof": 6}
_DICOM = {"dims-huge": 6, "dims-zero": 4, "tile-zero": 4, "tile-huge": 4, "dicom-bot-past-eof": 4,
          "dicom-frames": 6}

#: how many variants of each family each format gets in the full corpus (523 in all)
PLAN: dict[str, dict[str, int]] = {
    "svs": {**_COMMON, **_TIFF, "property-key-nonutf8": 6},
    "pyramid-tiff": {**_COMMON, **_TIFF},
    "ome-tiff": {**_COMMON, **_TIFF},
    "dicom-series": {**_COMMON, **_DICOM, "dicom-level0-broken": 9},
    "dicom-file": {**_COMMON, **_DICOM},
}

#: name prefix and suffix of each format's variants (a dicom-series variant is a folder)
_NAMING = {"svs": ("svs", ".svs"), "pyramid-tiff": ("pyrtiff", ".tif"), "ome-tiff": ("ometiff", ".ome.tif"),
           "dicom-series": ("dicomseries", ""), "dicom-file": ("dicomfile", ".dcm")}


@dataclass(frozen=True)
class Variant:
    """One corrupt slide: ``name`` is the file (or, for ``dicom-series``, the folder) written under the
    build folder; ``detail`` says in words what was damaged."""

    name: str
    fmt: str
    family: str
    detail: str

    @property
    def key(self) -> str:
        """The name without its extension: what stores and error lines are named after."""
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class _Spec:
    fmt: str
    family: str
    k: int  # number within (fmt, family)
    index: int  # position in the full corpus: with the seed, it decides every random choice

    @property
    def name(self) -> str:
        prefix, suffix = _NAMING[self.fmt]
        family = self.family.removeprefix("dicom-")
        return f"{prefix}-{family}-{self.k:03d}{suffix}"


def _all_specs() -> list[_Spec]:
    specs: list[_Spec] = []
    for fmt in FORMATS:
        for family, count in PLAN[fmt].items():
            specs.extend(_Spec(fmt, family, k, len(specs) + k) for k in range(count))
    return specs


def _select(specs: list[_Spec], n: int | None, seed: int) -> list[_Spec]:
    """All specs, or ``n`` of them covering every family and every format first, then as many
    (format, family) pairs as fit, then any; deterministic for the seed, in corpus order."""
    if n is None or n >= len(specs):
        return specs
    rng = np.random.default_rng([seed, 0x5E1EC7])
    by_pair: dict[tuple[str, str], list[_Spec]] = {}
    for s in specs:
        by_pair.setdefault((s.fmt, s.family), []).append(s)
    chosen: list[_Spec] = []
    fmt_count: Counter[str] = Counter()

    def take(pair: tuple[str, str]) -> None:
        pool = [s for s in by_pair[pair] if s not in chosen]
        if pool and len(chosen) < n:
            chosen.append(pool[int(rng.integers(len(pool)))])
            fmt_count[pair[0]] += 1

    families = list(dict.fromkeys(s.family for s in specs))
    for family in families:  # every family, on the formats least used so far
        pairs = [p for p in by_pair if p[1] == family]
        least = min(fmt_count[p[0]] for p in pairs)
        candidates = [p for p in pairs if fmt_count[p[0]] == least]
        take(candidates[int(rng.integers(len(candidates)))])
    for fmt in dict.fromkeys(s.fmt for s in specs):  # every format
        if not fmt_count[fmt]:
            pairs = [p for p in by_pair if p[0] == fmt]
            take(pairs[int(rng.integers(len(pairs)))])
    covered = {(s.fmt, s.family) for s in chosen}
    rest = [p for p in by_pair if p not in covered]
    for i in rng.permutation(len(rest)):  # then as many (format, family) pairs as fit
        take(rest[int(i)])
    remaining = [s for s in specs if s not in chosen]
    for i in rng.permutation(len(remaining))[:max(0, n - len(chosen))]:
        chosen.append(remaining[int(i)])
    return sorted(chosen, key=lambda s: s.index)


# ------------------------------------------------------------------------------------------- TIFF layout
#: struct code and size of the integer TIFF types a tag edit may meet
_INT_CODE = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8,
              18: 8}
_LONG = 4


@dataclass(frozen=True)
class _Tag:
    entry: int  # file offset of the 12- (or 20-) byte IFD entry
    dtype: int
    count: int
    valueoffset: int  # where the value is: inside the entry, or elsewhere in the file

    @property
    def nbytes(self) -> int:
        return self.count * _TYPE_SIZE.get(self.dtype, 1)


@dataclass(frozen=True)
class _Ifd:
    offset: int
    next_pos: int  # where the next-IFD pointer lives
    end: int  # just after the next-IFD pointer
    tags: dict[str, _Tag]
    data: tuple[tuple[int, int], ...]  # (offset, byte count) of each tile or strip
    level: int | None  # pyramid level in the main series, None for the other images
    top: bool  # in the main IFD chain (False: a SubIFD)


@dataclass(frozen=True)
class _TiffLayout:
    size: int
    byteorder: str
    offsetsize: int
    inline: int  # bytes of value an IFD entry holds itself
    first_ptr: int  # where the header's first-IFD offset lives
    ifds: tuple[_Ifd, ...]

    @property
    def levels(self) -> list[_Ifd]:
        return sorted((i for i in self.ifds if i.level is not None), key=lambda i: i.level or 0)

    @property
    def top(self) -> list[_Ifd]:
        return [i for i in self.ifds if i.top]

    @property
    def sub(self) -> list[_Ifd]:
        return [i for i in self.ifds if not i.top]


def _tiff_layout(path: Path) -> _TiffLayout:
    """Where every IFD, tag value and tile of a TIFF file is (tifffile reads; nothing is decoded)."""
    with tifffile.TiffFile(path) as tif:
        fmt = tif.tiff
        bo = tif.byteorder
        raw = path.read_bytes()
        found: dict[int, tuple[tifffile.TiffPage, bool]] = {}
        tif.pages.useframes = False
        for i in range(len(tif.pages)):
            page = tif.pages[i]
            if isinstance(page, tifffile.TiffPage):
                found[page.offset] = (page, True)
        levels: dict[int, int] = {}
        for li, level in enumerate(tif.series[0].levels):
            key = level.keyframe
            found.setdefault(key.offset, (key, False))
            levels[key.offset] = li
        ifds = []
        for offset, (page, top) in sorted(found.items()):
            (count,) = struct.unpack_from(fmt.tagnoformat, raw, offset)
            next_pos = offset + fmt.tagnosize + count * fmt.tagsize
            tags = {t.name: _Tag(t.offset, int(t.dtype), t.count, t.valueoffset) for t in page.tags.values()}
            data = tuple(zip((int(o) for o in page.dataoffsets), (int(c) for c in page.databytecounts),
                             strict=True))
            ifds.append(_Ifd(offset, next_pos, next_pos + fmt.offsetsize, tags, data, levels.get(offset), top))
        return _TiffLayout(len(raw), bo, fmt.offsetsize, fmt.offsetsize, 8 if tif.is_bigtiff else 4, tuple(ifds))


def _put(buf: bytearray, lay: _TiffLayout, pos: int, code: str, value: int) -> None:
    struct.pack_into(lay.byteorder + code, buf, pos, value)


def _offset_code(lay: _TiffLayout) -> str:
    return "Q" if lay.offsetsize == 8 else "I"


def _set_scalar(buf: bytearray, lay: _TiffLayout, tag: _Tag, value: int) -> int:
    """Set a one-value integer tag in place; a SHORT becomes a LONG (its entry's type field changes, the value
    still fits in the entry) when the value needs it. Returns the value written (clipped to the type)."""
    dtype = tag.dtype
    if dtype == 3 and value > 0xFFFF:
        struct.pack_into(lay.byteorder + "H", buf, tag.entry + 2, _LONG)
        dtype = _LONG
    code = _INT_CODE[dtype]
    value = min(value, (1 << (8 * struct.calcsize(code))) - 1)
    _put(buf, lay, tag.valueoffset, code, value)
    return value


# ------------------------------------------------------------------------------------------ DICOM layout
_PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"  # (7FE0,0010) OB, undefined length
_ITEM = b"\xfe\xff\x00\xe0"
_SERIES_UID = b"\x20\x00\x0e\x00UI"


@dataclass(frozen=True)
class _DicomLayout:
    size: int
    pixel_data: int  # offset of the PixelData element
    items: tuple[tuple[int, int], ...]  # (offset of the item tag, value length); item 0 is the offset table

    @property
    def frames(self) -> tuple[tuple[int, int], ...]:
        return self.items[1:]


def _dicom_layout(raw: bytes | bytearray) -> _DicomLayout:
    """Where the encapsulated PixelData, its offset table and its frames are (explicit VR little endian)."""
    start = bytes(raw).rfind(_PIXEL_DATA)
    if start < 0:
        raise ValueError("no encapsulated PixelData")
    items = []
    pos = start + len(_PIXEL_DATA)
    while pos + 8 <= len(raw) and raw[pos:pos + 4] == _ITEM:
        (length,) = struct.unpack_from("<I", raw, pos + 4)
        items.append((pos, length))
        pos += 8 + length
    return _DicomLayout(len(raw), start, tuple(items))


def _unique_series_uid(raw: bytearray, index: int) -> None:
    """Give a copied DICOM file a SeriesInstanceUID of its own, same length, in place (the copies of one
    file would otherwise form one series, and their folder one slide)."""
    pos = bytes(raw).find(_SERIES_UID)
    (length,) = struct.unpack_from("<H", raw, pos + 6)
    value = raw[pos + 8:pos + 8 + length].rstrip(b"\x00")
    tail = f"9{index:07d}".encode()
    raw[pos + 8 + len(value) - len(tail):pos + 8 + len(value)] = tail


def _dicom_edit(path: Path, values: dict[str, int]) -> None:
    """Set DICOM attributes with pydicom and save (the only edits that re-write the file)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


# ------------------------------------------------------------------------------------------------ damage
def _hex(pos: int) -> str:
    return f"0x{pos:x}"


def _flip(buf: bytearray, pos: int, region: str) -> str:
    old = buf[pos]
    buf[pos] ^= 0xFF
    return f"byte {_hex(pos)} ({region}) flipped 0x{old:02x}->0x{buf[pos]:02x}"


def _overwrite(rng: np.random.Generator, buf: bytearray, pos: int, region: str) -> str:
    length = int(rng.integers(4, 17))
    pos = max(0, min(pos, len(buf) - length))
    buf[pos:pos + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    return f"{length} bytes at {_hex(pos)} ({region}) overwritten"


def _cut(rng: np.random.Generator, k: int, size: int) -> tuple[int, str]:
    if k % 3 == 2:
        short = int(rng.integers(1, 65))
        return size - short, f"cut {short} bytes short of the end ({size - short:,} of {size:,})"
    frac = float(rng.uniform(0.01, 0.99))
    cut = max(1, int(size * frac))
    return cut, f"cut at {frac:.1%} ({cut:,} of {size:,} bytes)"


def _tiff_position(rng: np.random.Generator, lay: _TiffLayout) -> tuple[int, str]:
    """A byte in the header, an IFD, an IFD's out-of-line values, or tile data."""
    region = str(rng.choice(["header", "ifd", "ifd-values", "pixels"], p=[0.25, 0.25, 0.15, 0.35]))
    if region == "ifd-values":
        values = [(name, t) for i in lay.ifds for name, t in i.tags.items() if t.nbytes > lay.inline]
        name, tag = values[int(rng.integers(len(values)))]
        return tag.valueoffset + int(rng.integers(tag.nbytes)), f"{name} values"
    if region == "ifd":
        i = int(rng.integers(len(lay.ifds)))
        ifd = lay.ifds[i]
        return int(rng.integers(ifd.offset, ifd.end)), f"IFD at {_hex(ifd.offset)}"
    if region == "pixels":
        with_data = [i for i in lay.ifds if i.data]
        ifd = with_data[int(rng.integers(len(with_data)))]
        offset, count = ifd.data[int(rng.integers(len(ifd.data)))]
        return offset + int(rng.integers(max(count, 1))), "tile data"
    return int(rng.integers(min(4096, lay.size))), "first 4 KB"


def _level(rng: np.random.Generator, lay: _TiffLayout, *, tiled: bool = False) -> _Ifd:
    """Level 0 half the time, else any level (only tiled ones when asked)."""
    levels = [i for i in lay.levels if not tiled or "TileWidth" in i.tags]
    return levels[0] if rng.random() < 0.5 else levels[int(rng.integers(len(levels)))]


def _tags_of(rng: np.random.Generator, pair: tuple[str, str]) -> list[str]:
    return [[pair[0]], [pair[1]], list(pair)][int(rng.integers(3))]


def _tiff_damage(buf: bytearray, lay: _TiffLayout, spec: _Spec, rng: np.random.Generator) -> tuple[bytes, str]:
    """Damage a TIFF's bytes as the spec's family says; the new bytes and what was done."""
    family, size = spec.family, lay.size
    if family == "flip":
        pos, region = _tiff_position(rng, lay)
        return bytes(buf), _flip(buf, pos, region)
    if family == "overwrite":
        pos, region = _tiff_position(rng, lay)
        return bytes(buf), _overwrite(rng, buf, pos, region)
    if family == "truncate":
        cut, detail = _cut(rng, spec.k, size)
        return bytes(buf[:cut]), detail
    if family == "ifd-past-eof":
        targets = [("header's first-IFD offset", lay.first_ptr)]
        targets += [(f"next pointer of IFD {n}", i.next_pos) for n, i in enumerate(lay.top)]
        top0 = lay.top[0]
        if "SubIFDs" in top0.tags:
            subifds = top0.tags["SubIFDs"]
            targets += [(f"SubIFDs[{j}] of IFD 0", subifds.valueoffset + j * lay.offsetsize)
                        for j in range(subifds.count)]
        what, pos = targets[int(rng.integers(len(targets)))]
        limit = (1 << (8 * lay.offsetsize)) - 1
        value = [size + int(rng.integers(0, 1 << 20)), limit - int(rng.integers(0, 4096)),
                 size - int(rng.integers(1, 4))][int(rng.integers(3))]
        _put(buf, lay, pos, _offset_code(lay), value)
        return bytes(buf), f"{what} set to {value:,} (file size {size:,})"
    if family == "ifd-loop":
        top, sub = lay.top, lay.sub
        options: list[tuple[str, int, int]] = [
            (f"last IFD ({len(top) - 1}) points back to IFD 0", top[-1].next_pos, top[0].offset)]
        n = int(rng.integers(len(top)))
        options.append((f"IFD {n} points to itself", top[n].next_pos, top[n].offset))
        if sub:
            j = int(rng.integers(len(sub)))
            options.append((f"SubIFD {j} points to itself", sub[j].next_pos, sub[j].offset))
            options.append((f"SubIFD {j} points to IFD 0", sub[j].next_pos, top[0].offset))
        what, pos, value = options[int(rng.integers(len(options)))]
        _put(buf, lay, pos, _offset_code(lay), value)
        return bytes(buf), what
    if family in ("dims-huge", "dims-zero", "tile-zero", "tile-huge"):
        dims = family.startswith("dims")
        ifd = _level(rng, lay, tiled=not dims)
        names = _tags_of(rng, ("ImageWidth", "ImageLength") if dims else ("TileWidth", "TileLength"))
        if family.endswith("zero"):
            value = 0
        elif dims:
            value = [1_000_000, 4_000_000_000, 100_000, 65535][int(rng.integers(4))]
        else:
            value = [65536, 65535, 65520, 131072][int(rng.integers(4))]
        written = [_set_scalar(buf, lay, ifd.tags[name], value) for name in names]
        return bytes(buf), f"{' and '.join(names)} of level {ifd.level} set to {written[0]:,}"
    if family == "bytecounts-zero":
        variant = spec.k % 3
        ifd = lay.levels[0]
        if variant == 2 and len(lay.levels) > 1:
            ifd = lay.levels[1 + int(rng.integers(len(lay.levels) - 1))]
        tag = ifd.tags["TileByteCounts"]
        width = _TYPE_SIZE[tag.dtype]
        tiles = range(tag.count) if variant != 1 else sorted(
            int(t) for t in rng.choice(tag.count, tag.count // 2, replace=False))
        for t in tiles:
            buf[tag.valueoffset + t * width:tag.valueoffset + (t + 1) * width] = bytes(width)
        which = "all" if len(tiles) == tag.count else f"{len(tiles)} of {tag.count}"
        return bytes(buf), f"{which} TileByteCounts of level {ifd.level} set to 0"
    if family == "offsets-past-eof":
        tag = lay.levels[0].tags["TileOffsets"]
        m = tag.count if spec.k == 0 else int(rng.integers(1, tag.count + 1))
        tiles = sorted(int(t) for t in rng.choice(tag.count, m, replace=False))
        code = _INT_CODE[tag.dtype]
        huge = rng.random() < 0.3
        for t in tiles:
            value = 0xFFFFFFFF - t if huge else size + int(rng.integers(0, 1 << 20))
            _put(buf, lay, tag.valueoffset + t * _TYPE_SIZE[tag.dtype], code, value)
        return bytes(buf), f"{m} of {tag.count} level-0 TileOffsets set past EOF ({'~4 GB' if huge else '< +1 MB'})"
    if family == "property-key-nonutf8":
        tag = lay.levels[0].tags["ImageDescription"]
        text = bytes(buf[tag.valueoffset:tag.valueoffset + tag.count])
        keys = [(m.start(1), m.group(1).decode()) for m in re.finditer(rb"\|([A-Za-z][^=|]*?) = ", text)]
        at, key = next(kv for kv in keys if kv[1] == "AppMag") if spec.k == 0 else keys[int(rng.integers(len(keys)))]
        byte = [0xFF, 0x80, 0xC3][spec.k % 3]
        buf[tag.valueoffset + at] = byte
        return bytes(buf), f"ImageDescription key {key!r}: first letter replaced by byte 0x{byte:02x}"
    raise ValueError(f"no TIFF damage {family!r}")


def _dicom_position(rng: np.random.Generator, lay: _DicomLayout) -> tuple[int, str]:
    """A byte in the attributes, an item header, the offset table or a frame's JPEG data."""
    region = str(rng.choice(["attributes", "item header", "offset table", "frame data"], p=[0.35, 0.1, 0.1, 0.45]))
    if region == "item header":
        pos, _length = lay.items[int(rng.integers(len(lay.items)))]
        return pos + int(rng.integers(8)), region
    if region == "offset table":
        pos, length = lay.items[0]
        return pos + 8 + int(rng.integers(max(length, 1))), region
    if region == "frame data":
        pos, length = lay.frames[int(rng.integers(len(lay.frames)))]
        return pos + 8 + int(rng.integers(max(length, 1))), region
    return int(rng.integers(lay.pixel_data + len(_PIXEL_DATA))), "attributes"


def _dicom_damage(path: Path, spec: _Spec, rng: np.random.Generator) -> str:
    """Damage one DICOM file in place as the spec's family says; what was done."""
    family = spec.family
    raw = bytearray(path.read_bytes())
    lay = _dicom_layout(raw)
    if family in ("flip", "overwrite"):
        pos, region = _dicom_position(rng, lay)
        detail = _flip(raw, pos, region) if family == "flip" else _overwrite(rng, raw, pos, region)
        path.write_bytes(raw)
        return detail
    if family == "truncate":
        cut, detail = _cut(rng, spec.k, lay.size)
        path.write_bytes(raw[:cut])
        return detail
    if family == "dicom-bot-past-eof":
        pos, length = lay.items[0]
        huge = spec.k % 2 == 1
        for j in range(length // 4):
            value = 0xFFFFFFF0 - j if huge else lay.size + 4 * j + int(rng.integers(0, 1 << 16))
            struct.pack_into("<I", raw, pos + 8 + 4 * j, value)
        path.write_bytes(raw)
        return f"all {length // 4} offset-table entries set past EOF ({'~4 GB' if huge else '< +64 kB'})"
    if family == "dicom-level0-broken":
        if spec.k % 3 == 0:
            path.write_bytes(raw[:8])
            return "cut to 8 bytes"
        if spec.k % 3 == 1:
            path.write_bytes(raw[:lay.size // 2])
            return f"cut at half ({lay.size // 2:,} bytes)"
        m = int(rng.integers(5, min(40, len(lay.frames)) + 1))
        for f in sorted(int(f) for f in rng.choice(len(lay.frames), m, replace=False)):
            pos, length = lay.frames[f]
            start = pos + 8 + length // 3
            raw[start:start + length // 3] = rng.integers(0, 256, length // 3, dtype=np.uint8).tobytes()
        path.write_bytes(raw)
        return f"random bytes over the middle third of {m} frames"
    if family in ("dims-huge", "dims-zero", "tile-zero", "tile-huge"):
        dims = family.startswith("dims")
        names = _tags_of(rng, ("TotalPixelMatrixColumns", "TotalPixelMatrixRows") if dims else ("Columns", "Rows"))
        if family.endswith("zero"):
            value = 0
        else:
            value = [1_000_000, 4_000_000_000, 100_000][int(rng.integers(3))] if dims else 65535
        _dicom_edit(path, dict.fromkeys(names, value))
        return f"{' and '.join(names)} set to {value:,}"
    if family == "dicom-frames":
        value = (0, 1_000_000)[spec.k % 2]
        _dicom_edit(path, {"NumberOfFrames": value})
        return f"NumberOfFrames set to {value:,}"
    raise ValueError(f"no DICOM damage {family!r}")


# ------------------------------------------------------------------------------------------------- build
@dataclass
class _Sources:
    svs: Path
    pyramid: Path
    ome: Path | None
    series: list[Path]  # the DICOM series' files
    level0: Path  # the largest of them
    layouts: dict[str, _TiffLayout] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)

    def tiff(self, fmt: str) -> tuple[bytes, _TiffLayout]:
        if fmt not in self.raw:
            path = {"svs": self.svs, "pyramid-tiff": self.pyramid, "ome-tiff": self.ome}[fmt]
            assert path is not None
            self.raw[fmt], self.layouts[fmt] = path.read_bytes(), _tiff_layout(path)
        return self.raw[fmt], self.layouts[fmt]


def _write_ome_source(path: Path, svs: Path) -> Path:
    """The OME-TIFF source: the SVS's level 0, cropped, as a SubIFD pyramid; its random UUID made fixed."""
    with tifffile.TiffFile(svs) as tif:
        pixels = tif.pages[0].asarray()[:OME_SIDE, :OME_SIDE]
    write_ome_tiff(path, np.ascontiguousarray(pixels), mpp=OME_MPP, tile=OME_TILE)
    raw = bytearray(path.read_bytes())
    at = raw.find(b'UUID="urn:uuid:') + len(b'UUID="urn:uuid:')
    raw[at:at + 36] = b"00000000-0000-4000-8000-000000000000"
    path.write_bytes(raw)
    return path


def good_copy(folder: Path, slides_dir: Path) -> Path:
    """Copy the CMU SVS into ``folder`` as ``good.svs`` (the slide every batch must tile unchanged)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(slides_dir / SVS, folder / GOOD))


def build_variants(folder: Path, slides_dir: Path, *, seed: int = 0, n: int | None = None,
                   formats: Sequence[str] | None = None) -> list[Variant]:
    """Write corrupt variants of the real slides into ``folder`` (created) and return them.

    ``n=None`` writes the full corpus (:data:`PLAN`, 523 variants); ``n`` writes a deterministic subset that
    covers every family and every format first. ``formats`` keeps only those formats (of :data:`FORMATS`).
    """
    unknown = set(formats or ()) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; formats are {', '.join(FORMATS)}")
    specs = [s for s in _all_specs() if formats is None or s.fmt in formats]
    specs = _select(specs, n, seed)
    folder.mkdir(parents=True, exist_ok=True)
    series = sorted((slides_dir / DICOM_DIR).glob("*.dcm"))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fuzz-source-") as tmp:
        ome = _write_ome_source(Path(tmp) / "source.ome.tif", slides_dir / SVS) \
            if any(s.fmt == "ome-tiff" for s in specs) else None
        sources = _Sources(slides_dir / SVS, slides_dir / PYRAMID, ome, series,
                           max(series, key=lambda p: p.stat().st_size))
        return [_build_one(folder, spec, sources, seed) for spec in specs]


def _build_one(folder: Path, spec: _Spec, sources: _Sources, seed: int) -> Variant:
    rng = np.random.default_rng([seed, spec.index])
    dst = folder / spec.name
    if spec.fmt in TIFF_FORMATS:
        raw, lay = sources.tiff(spec.fmt)
        data, detail = _tiff_damage(bytearray(raw), lay, spec, rng)
        dst.write_bytes(data)
    elif spec.fmt == "dicom-file":
        copy = bytearray(sources.level0.read_bytes())
        # by name: ``spec.index`` is not unique across families (files sharing a series UID in one folder are
        # one multi-file series, so one of them used to stand for the others and they went unreported)
        _unique_series_uid(copy, int(hashlib.sha256(spec.name.encode()).hexdigest(), 16) % 10**7)
        dst.write_bytes(copy)
        detail = _dicom_damage(dst, spec, rng)
    else:
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir()
        for f in sources.series:
            shutil.copyfile(f, dst / f.name)
        if spec.family in ("dicom-bot-past-eof", "dicom-level0-broken") or (
                spec.family in ("dims-huge", "dims-zero", "tile-zero", "tile-huge", "dicom-frames")
                and spec.k % 2 == 0):
            target = sources.level0
        else:
            target = sources.series[int(rng.integers(len(sources.series)))]
        level = sorted(sources.series, key=lambda p: -p.stat().st_size).index(target)
        detail = f"level-{level} file: " + _dicom_damage(dst / target.name, spec, rng)
    return Variant(spec.name, spec.fmt, spec.family, detail)


# --------------------------------------------------------------------------------------------------- run
#: what can happen to one variant; only the first two are right
VARIANT_OUTCOMES = ("refused", "tiled", "blank", "silent-missing", "noisy", "unexpected", "aborted", "hang")
OK_OUTCOMES = frozenset({"refused", "tiled"})
#: what can go wrong with a whole batch
BATCH_FAILURES = ("aborted", "hang", "good-changed", "unattributed")

_PREFIX = "wsi-screen:"
_INTERNAL = "wsi-screen: internal error:"
#: the per-slide boundary's line for an exception nobody raised on purpose (tiling.pipeline.failure_message)
_UNEXPECTED = re.compile(r": unexpected \w+ while reading it: ")


@dataclass(frozen=True)
class Result:
    """What tiling did with one variant: the outcome, the stderr lines that name it, and a note."""

    variant: Variant
    outcome: str
    lines: tuple[str, ...] = ()
    note: str = ""
    batch: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES


@dataclass
class BatchReport:
    """One ``wsi-screen tile`` process: its exit code (None: killed at the timeout), time, failures."""

    index: int
    names: list[str]
    returncode: int | None
    seconds: float
    failures: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # stderr lines behind the failures
    notes: list[str] = field(default_factory=list)


@dataclass
class FuzzReport:
    """Every variant's result and every batch's report, with the time building and running took."""

    results: list[Result]
    batches: list[BatchReport]
    build_seconds: float = 0.0
    run_seconds: float = 0.0

    @property
    def bad_results(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    @property
    def bad_batches(self) -> list[BatchReport]:
        return [b for b in self.batches if b.failures]

    @property
    def ok(self) -> bool:
        return not self.bad_results and not self.bad_batches

    def to_json(self) -> dict[str, Any]:
        """Everything in the report as plain data (for ``json.dump``)."""
        return {"build_seconds": self.build_seconds, "run_seconds": self.run_seconds,
                "results": [{**asdict(r.variant), "outcome": r.outcome, "lines": list(r.lines), "note": r.note,
                             "batch": r.batch} for r in self.results],
                "batches": [asdict(b) for b in self.batches]}

    def table(self, by: str) -> str:
        """A markdown table of outcome counts by ``family`` or by ``fmt``."""
        rows: dict[str, Counter[str]] = {}
        for r in self.results:
            rows.setdefault(getattr(r.variant, by), Counter())[r.outcome] += 1
        seen = {o for c in rows.values() for o in c}
        cols = [o for o in VARIANT_OUTCOMES if o in OK_OUTCOMES or o in seen]
        title = "format" if by == "fmt" else by
        lines = [f"| {title} | " + " | ".join(cols) + " | total |", "|---" * (len(cols) + 2) + "|"]
        total: Counter[str] = Counter()
        for name, counts in rows.items():
            total.update(counts)
            lines.append(f"| {name} | " + " | ".join(str(counts[c] or "") for c in cols)
                         + f" | {sum(counts.values())} |")
        lines.append("| **all** | " + " | ".join(f"**{total[c]}**" for c in cols) + f" | **{total.total()}** |")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The outcome tables and the list of everything that went wrong."""
        out = [f"{len(self.results)} variants in {len(self.batches)} batch(es); built in {self.build_seconds:.1f} s, "
               f"tiled in {self.run_seconds:.1f} s", "", "### By family", "", self.table("family"), "",
               "### By format", "", self.table("fmt"), ""]
        if self.bad_batches:
            out += ["### Batch failures", ""]
            for b in self.bad_batches:
                out.append(f"- batch {b.index} (exit {b.returncode}, {b.seconds:.0f} s): {', '.join(b.failures)}")
                out += [f"  - `{line}`" for line in b.lines]
                out += [f"  - {note}" for note in b.notes]
            out.append("")
        if self.bad_results:
            out += ["### Bad variants", ""]
            for r in self.bad_results:
                note = f"; {r.note}" if r.note else ""
                out.append(f"- **{r.outcome}** `{r.variant.name}` ({r.variant.fmt}, {r.variant.family}: "
                           f"{r.variant.detail}){note}")
                out += [f"  - `{line}`" for line in r.lines]
            out.append("")
        return "\n".join(out)


@dataclass(frozen=True)
class _Run:
    returncode: int | None
    stderr: str
    seconds: float


def _cli() -> list[str]:
    """The ``wsi-screen`` console script of this interpreter's environment (or ``python -m``)."""
    script = Path(sys.executable).parent / "wsi-screen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "wsi_screen.cli"]


def tile(folder: Path, out: Path, *, timeout: float) -> _Run:
    """``wsi-screen tile --quiet FOLDER -o OUT --mpp 0.5`` in its own process group, killed at the timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSI_SCREEN_") or k == "WSI_SCREEN_DATA"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [*_cli(), "tile", "--quiet", str(folder), "-o", str(out), "--mpp", "0.5", "--slide-timeout", "60"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _out, err = proc.communicate(timeout=timeout)
        return _Run(proc.returncode, err, time.perf_counter() - start)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _out, err = proc.communicate()
        return _Run(None, err, time.perf_counter() - start)


def _digest(store: Path) -> dict[str, str]:
    """SHA-256 of the ``patches`` and ``coords`` arrays' bytes (with dtype and shape)."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    out = {}
    for key in ("patches", "coords"):
        arr = np.ascontiguousarray(group[key][...])  # type: ignore[index]
        out[key] = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()).hexdigest()
    return out


def _uniform(store: Path) -> tuple[int, int, list[str]]:
    """(patches, how many are one constant colour, those colours)."""
    import zarr

    patches = np.asarray(zarr.open_group(str(store), mode="r")["patches"][...])  # type: ignore[index]
    flat = patches.reshape(len(patches), -1, patches.shape[-1]) if patches.size else patches.reshape(0, 1, 3)
    same = (flat == flat[:, :1]).all(axis=(1, 2))
    colours = sorted({str(tuple(int(v) for v in flat[i, 0])) for i in np.flatnonzero(same)})
    return len(patches), int(same.sum()), colours


def _complete(store: Path) -> bool:
    from wsi_screen.tiling.store import is_complete, read_attrs

    return is_complete(read_attrs(store))


def reference(work: Path, slides_dir: Path, *, timeout: float) -> dict[str, str]:
    """Tile ``good.svs`` alone; the digests its arrays must keep in every batch."""
    folder = work / "reference"
    shutil.rmtree(folder, ignore_errors=True)
    good_copy(folder / "slides", slides_dir)
    run = tile(folder / "slides", folder / "out", timeout=timeout)
    store = folder / "out" / "good.zarr"
    if run.returncode != 0 or not _complete(store):
        raise RuntimeError(f"the good slide alone did not tile (exit {run.returncode}): {run.stderr.strip()}")
    n, uniform, _ = _uniform(store)
    if n == 0 or uniform:
        raise RuntimeError(f"the good slide's reference store has {n} patches, {uniform} of one colour")
    digest = _digest(store)
    shutil.rmtree(folder / "out")
    return digest


def _link(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a file or a folder of files."""
    if src.is_dir():
        dst.mkdir()
        for f in src.iterdir():
            _link(f, dst / f.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _names(key: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w.-]){re.escape(key)}(?![\w-])")


def run_batch(index: int, variants: Sequence[Variant], variants_dir: Path, work: Path, slides_dir: Path,
              ref: dict[str, str], *, timeout: float, keep: bool = False) -> tuple[list[Result], BatchReport]:
    """Tile ``variants`` (found in ``variants_dir``) beside ``good.svs`` in one process and classify them."""
    folder = work / f"batch-{index:03d}"
    shutil.rmtree(folder, ignore_errors=True)
    slides, out = folder / "slides", folder / "out"
    good_copy(slides, slides_dir)
    for v in variants:
        _link(variants_dir / v.name, slides / v.name)
    run = tile(slides, out, timeout=timeout)
    report = BatchReport(index, [v.name for v in variants], run.returncode, run.seconds)

    lines = [line.rstrip() for line in run.stderr.splitlines() if line.strip()]
    patterns = {v.name: _names(v.key) for v in variants}
    good = re.compile(r"(?<![\w.-])good(\.svs|\.zarr|:)")
    named: dict[str, list[str]] = {v.name: [] for v in variants}
    crash: list[str] = []
    for line in lines:
        if not line.startswith(_PREFIX) or line.startswith(_INTERNAL):
            crash.append(line)
            continue
        hits = [name for name, pattern in patterns.items() if pattern.search(line)]
        for name in hits:
            named[name].append(line)
        if good.search(line):
            report.failures.append("good-changed")
            report.lines.append(line)
        elif not hits:
            report.failures.append("unattributed")
            report.lines.append(line)
    failed = ""
    if run.returncode is None:
        failed = "hang"
        report.notes.append(f"killed after {timeout:.0f} s")
    elif run.returncode not in (0, 1) or crash:
        failed = "aborted"
        report.lines[:0] = crash
    if failed:
        report.failures.insert(0, failed)

    stores = {p.name.removesuffix(".zarr"): p for p in out.glob("*.zarr")} if out.exists() else {}
    results, unresolved = [], []
    for v in variants:
        mine = [s for name, s in stores.items() if name == v.key or name.startswith(v.key + ".")]
        for s in mine:
            stores.pop(s.name.removesuffix(".zarr"))
        own = tuple(named[v.name])
        store = next((s for s in mine if _complete(s)), None)
        if store is not None:
            n, uniform, colours = _uniform(store)
            said = "; its stderr: " + " / ".join(own) if own else ""
            if n == 0:
                results.append(Result(v, "blank", own, f"store with 0 patches{said}", index))
            elif uniform:
                results.append(Result(v, "blank", own, f"{uniform} of {n} patches one colour {', '.join(colours)}",
                                      index))
            else:
                results.append(Result(v, "tiled", own, f"{n} patches" + (f"; warned: {' / '.join(own)}"
                                                                          if own else ""), index))
        elif len(own) == 1 and _UNEXPECTED.search(own[0]):  # one line, but no reason: a reader's bug
            results.append(Result(v, "unexpected", own, "an internal error, not a reasoned refusal", index))
        elif len(own) == 1:
            results.append(Result(v, "refused", own, "", index))
        elif own:
            results.append(Result(v, "noisy", own, f"{len(own)} lines name it", index))
        elif failed:
            unresolved.append(v)
            results.append(Result(v, failed, (), "not reached, or the batch died on it", index))
        else:
            results.append(Result(v, "silent-missing", (), "no store and no error line", index))
    if unresolved:
        first = sorted(unresolved, key=lambda v: v.name)[0]
        report.notes.append(f"first variant without a result (processing order): {first.name}")

    good_store = stores.pop("good", None)
    if good_store is not None and _complete(good_store):
        if _digest(good_store) != ref:
            report.failures.append("good-changed")
            report.notes.append("good.svs: patches or coords differ from the reference")
    elif not failed:
        report.failures.append("good-changed")
        report.notes.append("good.svs: no complete store")
    else:
        report.notes.append("good.svs: not reached")
    if stores:
        report.notes.append(f"stores named after no variant: {', '.join(sorted(stores))}")
    report.failures = list(dict.fromkeys(report.failures))
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return results, report


def run_fuzz(work: Path, slides_dir: Path, *, seed: int = 0, n: int | None = None,
             formats: Sequence[str] | None = None, batch_size: int = 60, timeout: float = 300,
             keep: bool = False, log: Callable[[str], None] | None = None) -> FuzzReport:
    """Build the variants under ``work/variants`` and tile them in batches of ``batch_size``; the report."""
    say = log or (lambda _msg: None)
    work.mkdir(parents=True, exist_ok=True)
    variants_dir = work / "variants"
    shutil.rmtree(variants_dir, ignore_errors=True)
    start = time.perf_counter()
    variants = build_variants(variants_dir, slides_dir, seed=seed, n=n, formats=formats)
    built = time.perf_counter() - start
    say(f"built {len(variants)} variants in {built:.1f} s under {variants_dir}")
    start = time.perf_counter()
    ref = reference(work, slides_dir, timeout=timeout)
    results: list[Result] = []
    batches: list[BatchReport] = []
    for b, first in enumerate(range(0, len(variants), batch_size)):
        chunk = variants[first:first + batch_size]
        res, rep = run_batch(b, chunk, variants_dir, work, slides_dir, ref, timeout=timeout, keep=keep)
        results += res
        batches.append(rep)
        bad = sum(not r.ok for r in res)
        say(f"batch {b}: {len(chunk)} variants, exit {rep.returncode}, {rep.seconds:.0f} s, {bad} bad"
            + (f", batch: {', '.join(rep.failures)}" if rep.failures else ""))
    return FuzzReport(results, batches, built, time.perf_counter() - start)
