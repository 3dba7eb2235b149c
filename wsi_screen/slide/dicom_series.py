"""DICOM WSI series on disk: which ``.dcm`` files of a folder make up one slide, and what to call it.

A DICOM whole-slide image is a series: one file per pyramid level (plus label and overview images), tied
together by their SeriesInstanceUID. Any one file stands for the whole series (OpenSlide reads the sibling
files of the same series in its folder itself), so a slide opened through one file is the same slide as its
series folder: the same files checked and fingerprinted, the same name.

* A folder whose readable ``.dcm`` files all belong to one series *is* that series: all its ``.dcm`` files
  are the slide's files, a damaged one included (it fails the slide naming that file, as the folder does);
* in a folder holding several series, a file stands for the readable files of its own series;
* files of one SeriesInstanceUID that repeat one image (copies of a file, not the levels of a pyramid) are no
  series: each is a slide of its own.

Headers are read once per folder and process (the UID, image size and kind), and again when the folder
changes. pydicom's warnings about a non-conformant file are not silenced here: they are library warnings,
which the CLI sends to the run log.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from pathlib import Path

#: file stems that are DICOM UIDs (``1.2.826.0.1...``): no name for a person
_UID_STEM = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def _header(path: Path) -> tuple[str, tuple[object, ...] | None] | None:
    """SeriesInstanceUID of a DICOM file and what its image is (size and kind), or None when it cannot be read
    (opening the slide reports why)."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=[
            "SeriesInstanceUID", "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Columns", "Rows", "ImageType"])
        uid = ds.get("SeriesInstanceUID")
        kind = tuple(str(v) for v in (ds.get("ImageType") or [])[2:3])
        # a whole-slide image declares its total pixel matrix; other DICOM (a CT series: slices of one size) has
        # none, and its files stay one series (which fails as one: not a whole-slide image)
        wsi = "TotalPixelMatrixColumns" in ds
        image = (ds.get("TotalPixelMatrixColumns"), ds.get("TotalPixelMatrixRows"), kind) if wsi else None
        return (str(uid), image) if uid else None
    except Exception:  # unreadable or not DICOM: the slide opener will report it
        return None


def folder_series(folder: Path) -> dict[str | None, list[Path]]:
    """The ``.dcm`` files of ``folder`` (not its subfolders) by series (None: unreadable). Files of one
    SeriesInstanceUID that repeat an image (copies of one file, not the levels of a pyramid) are no series:
    each is keyed on its own (``UID#file name``), so that none stands in for another."""
    try:
        stamp = folder.stat().st_mtime_ns
    except OSError:
        return {}
    return _folder_series(folder.absolute(), stamp)


@functools.lru_cache(maxsize=32)
def _folder_series(folder: Path, _stamp: int) -> dict[str | None, list[Path]]:
    by_uid: dict[str | None, list[tuple[Path, tuple[object, ...] | None]]] = defaultdict(list)
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    except OSError:
        return {}
    for f in files:
        header = _header(f)
        by_uid[header[0] if header else None].append((f, header[1] if header else None))
    groups: dict[str | None, list[Path]] = {}
    for uid, members in by_uid.items():
        images = [image for _, image in members if image is not None]
        if uid is None or len(set(images)) == len(images):
            groups[uid] = [f for f, _ in members]
        else:
            groups.update({f"{uid}#{f.name}": [f] for f, _ in members})
    return groups


def is_series_folder(groups: dict[str | None, list[Path]]) -> bool:
    """Whether a folder's ``groups`` (see :func:`folder_series`) are one multi-file series, possibly with
    damaged files beside it: the folder is then one slide."""
    readable = [uid for uid in groups if uid is not None]
    return len(readable) == 1 and sum(len(g) for g in groups.values()) > 1


def series_files(path: Path) -> list[Path]:
    """The files of the slide that the DICOM file ``path`` stands for (see the module docstring), sorted;
    ``[path]`` for a single-file series or an unreadable file."""
    groups = folder_series(path.parent)
    absolute = path.absolute()
    uid = next((u for u, g in groups.items() if absolute in g), None)
    if uid is None:
        return [path]
    if is_series_folder(groups):
        return sorted(p for g in groups.values() for p in g)
    return list(groups[uid])


def series_name(path: Path) -> str | None:
    """A readable name for the slide a DICOM file stands for, or None to keep the file's own stem.

    A file of a multi-file series that fills its folder is named after the folder (as the folder itself
    is); a file named by its UID takes the series' SeriesDescription, where it has one.
    """
    groups = folder_series(path.parent)
    if path.absolute() in (p for g in groups.values() for p in g) and is_series_folder(groups) \
            and path.absolute().parent.name:
        return path.absolute().parent.name
    if not _UID_STEM.match(path.stem):
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SeriesDescription"])
        text = " ".join(str(ds.get("SeriesDescription") or "").split())
    except Exception:  # unreadable: keep the file's name; opening the slide reports the damage
        return None
    text = re.sub(r'[/\\:*?"<>|\x00-\x1f]', "_", text).strip(". ")
    return text or None
