"""Damaged slides the first fuzzing found: each fails alone, on one line, and never passes as white glass."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from tests.conftest import dicom_series_copy, run_cli
from tests.corpus import can_drop_privileges, is_root, unprivileged_cli
from wsi_screen.slide.discovery import discover
from wsi_screen.tiling.store import PatchStore

ERROR = "wsi-screen: error: "


def test_dicom_series_with_a_broken_file_stays_one_slide(tmp_path: Path, slides_dir: Path) -> None:
    _, level0 = dicom_series_copy(slides_dir, tmp_path / "in" / "cut")
    level0.write_bytes(level0.read_bytes()[:8])
    _, level0 = dicom_series_copy(slides_dir, tmp_path / "in" / "half")
    level0.write_bytes(level0.read_bytes()[: level0.stat().st_size // 2])
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", tmp_path / "in" / "good.svs")
    sources, problems = discover([tmp_path / "in"])
    assert sorted(s.name for s in sources) == ["cut", "good", "half"] and not problems
    res = run_cli("infer", tmp_path / "in", "-o", tmp_path / "run", "--quiet")
    assert res.code == 1
    errors = [line for line in res.err_lines if line.startswith(ERROR)]
    assert len(errors) == 2, res.err
    assert any("/cut/" in line and "unreadable DICOM header" in line for line in errors), errors
    assert any("/half/" in line and "frame offset table points past the end" in line for line in errors), errors
    with (tmp_path / "run" / "results.csv").open() as fh:
        status = {row["slide"]: row["status"] for row in csv.DictReader(fh)}
    assert status == {"cut": "error", "good": "ok", "half": "error"}  # one row per slide, never one per file


def test_dicom_files_of_one_series_are_one_slide(tmp_path: Path, slides_dir: Path) -> None:
    """Any file of a series stands for the whole series: named files and their folder are one slide, named after
    the folder (never an instance UID); a folder holding two series gives one slide per series, not per file."""
    folder = slides_dir / "CMU-1-Small-Region dicom"
    files = sorted(folder.glob("*.dcm"))
    sources, problems = discover([files[2], files[0], folder])
    assert [(s.path, s.name) for s in sources] == [(files[2], "CMU-1-Small-Region dicom")] and not problems
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copy(slides_dir / "camelyon-lowres.dcm", mixed / "lowres.dcm")
    sources, problems = discover([mixed])
    assert len(sources) == 2 and not problems, sources
    assert {s.path.name for s in sources} == {"lowres.dcm", sorted(p.name for p in files)[0]}
    # copies of one file share its series but are no pyramid: each stays a slide (none is silently dropped)
    copies = tmp_path / "copies"
    copies.mkdir()
    level0 = max(files, key=lambda p: p.stat().st_size)
    for name in ("a.dcm", "b.dcm"):
        shutil.copy(level0, copies / name)
    sources, problems = discover([copies])
    assert [(s.path.name, s.name) for s in sources] == [("a.dcm", "a"), ("b.dcm", "b")] and not problems


def test_two_links_to_one_folder_are_not_a_loop(tmp_path: Path, slides_dir: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", real / "a.svs")
    root = tmp_path / "root"
    root.mkdir()
    (root / "one").symlink_to(real, target_is_directory=True)
    (root / "two").symlink_to(real, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    sources, problems = discover([root])
    assert [s.path for s in sources] == [root / "one" / "a.svs"]
    assert [(p.path.name, p.reason) for p in problems] == [("loop", "symbolic link loop; not followed")]


@pytest.mark.skipif(not is_root() or not can_drop_privileges(), reason="needs root able to drop capabilities")
def test_listable_but_not_searchable_folder_fails_per_file(tmp_path: Path, slides_dir: Path) -> None:
    """Used to stop everything with a PermissionError during discovery (nothing tiled)."""
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", root / "locked" / "hidden.svs")
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", root / "good.svs")
    (root / "locked").chmod(0o644)  # r--: names can be listed, files cannot be reached
    try:
        res = unprivileged_cli(["tile", str(root), "-o", str(tmp_path / "out"), "--quiet"])
    finally:
        (root / "locked").chmod(0o755)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, res
    assert lines == [f"{ERROR}{root / 'locked' / 'hidden.svs'}: cannot read: Permission denied"], lines
    assert len(PatchStore.open(tmp_path / "out" / "good.zarr")) > 30
