"""Find slides in the paths given on the command line.

* A file named explicitly is always a slide candidate, whatever its extension (it fails clearly if it is
  not a slide).
* A folder is scanned recursively (symbolic links to folders are followed once; loops are reported). Files
  with a slide extension are candidates; other files are ignored.
* ``.dcm`` files are grouped by DICOM series: a folder whose ``.dcm`` files belong to one multi-file
  series is one slide named after the folder; in a folder of several series, each series is one slide (one
  of its files stands for it). A DICOM file named explicitly stands for its whole series, so two files of
  one series, or a file and its folder, are one slide.
* Names must be unique within a run (they name the stores): files of one folder that share a name
  (``a.svs`` beside ``a.tif``) keep their extension, and names that still clash are prefixed with their
  parent folders until unique. Only clashing names change.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi_screen.slide.dicom_series import folder_series, is_series_folder, series_files
from wsi_screen.slide.slide import slide_name, text_name

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".qptiff", ".btf", ".isyntax", ".czi",
})


@dataclass(frozen=True)
class SlideSource:
    """A slide to process: its path (file or DICOM series folder) and unique display name."""

    path: Path
    name: str


@dataclass(frozen=True)
class DiscoveryProblem:
    """A path that could not be turned into a slide, and why (reported like a failed slide)."""

    path: Path
    reason: str


def _walk(root: Path, problems: list[DiscoveryProblem]) -> Iterable[Path]:
    """Files under ``root`` (sorted, deterministic), following directory symlinks without looping.

    A link back into its own ancestors is a loop (reported, not followed); a folder reached a second time by
    another link is skipped quietly (its slides are already found). Entries that cannot be examined (a folder
    that can be listed but not searched) are reported one by one; the scan goes on.
    """
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path, ancestors: frozenset[tuple[int, int]]) -> Iterable[Path]:
        try:
            st = folder.stat()
        except OSError as exc:
            problems.append(DiscoveryProblem(folder, f"cannot read folder: {exc.strerror or exc}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            problems.append(DiscoveryProblem(folder, "symbolic link loop; not followed"))
            return
        if key in seen:
            log.debug("%s: already scanned through another link; skipped", folder)
            return
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append(DiscoveryProblem(folder, f"cannot list folder: {exc.strerror or exc}"))
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=True):
                    if entry.name.startswith(".") or entry.name.endswith((".zarr", ".partial")):
                        continue
                    yield from visit(path, ancestors | {key})
                elif entry.is_file(follow_symlinks=True):
                    entry.stat(follow_symlinks=True)  # a folder listed but not searchable fails here, per file
                    yield path
                elif entry.is_symlink() and path.suffix.lower() in SLIDE_EXTENSIONS:
                    problems.append(DiscoveryProblem(path, "broken or looping symbolic link"))
            except OSError as exc:
                if path.suffix.lower() in SLIDE_EXTENSIONS or entry.is_dir(follow_symlinks=False):
                    problems.append(DiscoveryProblem(path, f"cannot read: {exc.strerror or exc}"))

    yield from visit(root, frozenset())


def _group_dicom(files: Sequence[Path]) -> list[Path]:
    """Turn .dcm files into slide paths: a series folder, or one file per series (any one file stands for
    its series, see :mod:`wsi_screen.slide.dicom_series`); an unreadable file is a slide of its own, which
    fails naming it."""
    slides: list[Path] = []
    for folder in sorted({f.parent for f in files}):
        groups = folder_series(folder)
        if is_series_folder(groups):
            # one series, possibly with damaged files beside it: still one slide, which fails as one (naming
            # the damaged file) rather than splitting into per-file slides
            slides.append(folder)
            continue
        for uid, group in groups.items():
            members = [folder / p.name for p in group]
            slides.extend(members if uid is None else members[:1])
    return slides


def _identity(path: Path) -> Path:
    """The slide a candidate path stands for: a DICOM file stands for its series (its folder, or the first
    file of its series), so naming two files of one series, or a file and its folder, gives one slide."""
    if path.suffix.lower() != ".dcm" or not path.is_file():
        return path.absolute()
    if is_series_folder(folder_series(path.parent)):
        return path.parent.absolute()
    return series_files(path)[0].absolute()


def discover(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[SlideSource], list[DiscoveryProblem]]:
    """Slides found under ``paths`` (in a stable order) and the paths that could not be used."""
    problems: list[DiscoveryProblem] = []
    candidates: list[tuple[Path, Path]] = []  # (slide path, root it was found under)
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = [f for f in _walk(p, problems) if f.suffix.lower() in SLIDE_EXTENSIONS]
            dicoms = [f for f in found if f.suffix.lower() == ".dcm"]
            others = [f for f in found if f.suffix.lower() != ".dcm"]
            for f in sorted([*others, *_group_dicom(dicoms)]):
                candidates.append((f, p))
            if not found:
                problems.append(DiscoveryProblem(p, "folder holds no slide files"))
        elif p.exists():
            candidates.append((p, p.parent))
        elif p.is_symlink():
            problems.append(DiscoveryProblem(p, "broken symbolic link"))
        else:
            problems.append(DiscoveryProblem(p, "no such file or folder"))

    unique: dict[Path, tuple[Path, Path]] = {}
    for path, root in candidates:
        unique.setdefault(_identity(path), (path.absolute(), root))
    return _name(list(unique.values())), problems


def nothing_found(verb: str, problems: Sequence[DiscoveryProblem]) -> str:
    """What a command says when its inputs held no slide at all: ``no slides to <verb>``, and why each gave none."""
    return f"no slides to {verb}" + (": " + "; ".join(f"{p.path}: {p.reason}" for p in problems) if problems else "")


def _name(items: list[tuple[Path, Path]]) -> list[SlideSource]:
    """Unique names: the slide's own name; where names clash, the file name with its extension (``a.svs``
    beside ``a.tif``), then parent folders as a prefix. A name depends only on the slides it clashes with, so
    adding a file to a folder never renames the others (their stores and run folders stay valid)."""
    paths = [path for path, _root in items]
    same_folder: dict[tuple[Path, str], list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        same_folder[(path.parent, slide_name(path))].append(i)
    full = {i for group in same_folder.values() if len(group) > 1 for i in group}
    depth = dict.fromkeys(range(len(paths)), 0)
    while True:
        names = [_qualified(path, depth[i], i in full) for i, path in enumerate(paths)]
        dupes = _duplicates(names)
        if not dupes:
            return [SlideSource(path, names[i]) for i, path in enumerate(paths)]
        progressed = False
        for i in dupes:
            if depth[i] < len(paths[i].parts) - 1:
                depth[i] += 1
                progressed = True
        if not progressed:  # e.g. "x/a__b.svs" and "x/a/b.svs": number the clashing ones only
            return [SlideSource(path, f"{names[i]}-{i}" if i in dupes else names[i]) for i, path in enumerate(paths)]


def _duplicates(names: list[str]) -> set[int]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(names):
        groups[n].append(i)
    return {i for group in groups.values() if len(group) > 1 for i in group}


def _qualified(path: Path, depth: int, full: bool = False) -> str:
    own = text_name(path.name) if full else slide_name(path)
    parents = [text_name(p.name) for p in list(path.parents)[:depth]][::-1]
    return "__".join([*parents, own]) if parents else own
