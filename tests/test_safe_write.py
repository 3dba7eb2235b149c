"""wsi_screen._safe_write: atomic files, folder swaps, locks and the failed-write line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from wsi_screen import _safe_write as sw
from wsi_screen.errors import OutputWriteError


def test_atomic_write_replaces_with_default_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    sw.atomic_write_text(target, "one\n")
    sw.atomic_write_text(target, "two\n")
    assert target.read_bytes() == b"two\n"
    assert target.stat().st_mode & 0o777 == 0o666 & ~sw.umask()
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]  # no temporary file left


def test_surrogate_escaped_names_are_written_not_refused(tmp_path: Path) -> None:
    name = b"slide-\xff".decode("utf-8", "surrogateescape")
    sw.atomic_write_text(tmp_path / "r.csv", f"{name},1\n")
    assert (tmp_path / "r.csv").read_bytes() == b"slide-\\xff,1\n"


def test_disk_full_keeps_the_old_file_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.csv"
    sw.atomic_write_text(target, "old\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputWriteError) as info:
        sw.atomic_write_text(target, "new\n", " the results")
    assert str(info.value) == f"{target}: disk full while writing the results; nothing was marked complete"
    monkeypatch.undo()
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_failing_writer_leaves_nothing(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise ValueError("the figure could not be drawn")

    with pytest.raises(ValueError, match="could not be drawn"):
        sw.atomic_write_with(tmp_path / "roc.png", write)
    assert list(tmp_path.iterdir()) == []


def test_failure_text_for_other_errors() -> None:
    exc = OSError(errno.EACCES, "Permission denied")
    assert sw.failure_text("out/x", exc, " the store") == "out/x: cannot write the store: Permission denied"
    assert not sw.disk_full(exc) and sw.disk_full(OSError(errno.EDQUOT, "quota"))


def test_swap_in_replaces_a_folder_whole(tmp_path: Path) -> None:
    final, work = tmp_path / "s", tmp_path / "s.partial"
    final.mkdir()
    (final / "old.txt").write_text("old")
    work.mkdir()
    (work / "new.txt").write_text("new")
    sw.fsync_tree(work)
    sw.swap_in(work, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # neither the partial nor the old one left


def test_swap_in_leaves_a_folder_named_like_its_old_copy(tmp_path: Path) -> None:
    """Replacing 's' deleted a folder 's.old' beside it (another slide's folder, a user's copy)."""
    final, work, other = tmp_path / "s", tmp_path / ".s.partial", tmp_path / "s.old"
    for folder in (final, work, other):
        folder.mkdir()
        (folder / "f.txt").write_text(folder.name)
    sw.swap_in(work, final)
    assert (final / "f.txt").read_text() == ".s.partial" and (other / "f.txt").read_text() == "s.old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "s.old"]


def test_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    target = tmp_path / "a.zarr"
    held = sw.acquire(target)
    assert sw.lock_path(target) == tmp_path / sw.LOCK_DIR / "a.zarr.lock" and sw.lock_path(target).exists()
    with pytest.raises(sw.LockTaken):
        sw.acquire(target)
    held.release()
    sw.acquire(target).release()
