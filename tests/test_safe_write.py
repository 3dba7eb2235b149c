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


def test_an_interrupted_runs_abandoned_work_folders_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A Ctrl-C during `tile --dask` or `infer --dask local:2` kills workers mid-slide: the work folders they made
    (a store's `<slide>.zarr.partial`, which only `RUN/<slide>.partial` was cleaned beside, and that one) go;
    a `.partial` there before the run began (not this run's), one whose lock another writer holds, another slide's
    and finished outputs stay."""
    from wsi_screen.screening import runfolder
    from wsi_screen.tiling.store import StoreWriter, partials, store_location

    run = tmp_path / "run"
    stores = run / "stores"
    stores.mkdir(parents=True)
    names = ["new", "old", "busy", "done"]
    old = Path(store_location(stores, "old") + ".partial")  # an earlier killed run's
    old.mkdir()
    (old / "zarr.json").write_text("{}")
    Path(store_location(stores, "done")).mkdir()  # a finished store
    (run / "done").mkdir()  # a finished slide folder
    works = {**runfolder.partials(run, names), **partials(str(stores), names)}
    assert set(works) >= {run / "new.partial", stores / "new.zarr.partial"}

    stopped: list[bool] = []
    with sw.abandoned_work_removed(works, lambda: stopped.append(True)):  # a run that ends well removes nothing
        (run / "new.partial").mkdir()
    assert stopped == [] and (run / "new.partial").is_dir()
    (run / "new.partial").rmdir()

    holder = None
    with pytest.raises(KeyboardInterrupt), sw.abandoned_work_removed(works, lambda: stopped.append(True)):
        # the workers' work: a store killed before its commit, its slide folder, and a store another process writes
        StoreWriter(store_location(stores, "new"), n_patches=4, patch_size=8, thumbnail_shape=(4, 4), attrs={})
        (run / "new.partial").mkdir()
        (stores / "busy.zarr.partial").mkdir()
        holder = sw.acquire(Path(store_location(stores, "busy")))
        (stores / "other.zarr.partial").mkdir()  # a slide this run was not given
        raise KeyboardInterrupt
    assert stopped == [True]  # the workers are stopped before their folders are looked at
    assert holder is not None
    holder.release()
    assert sorted(p.name for p in stores.iterdir() if p.name != sw.LOCK_DIR) == [
        "busy.zarr.partial", "done.zarr", "old.zarr.partial", "other.zarr.partial"]
    assert (old / "zarr.json").read_text() == "{}"
    assert sorted(p.name for p in run.iterdir() if p.name != sw.LOCK_DIR) == ["done", "stores"]


def test_a_cluster_that_fails_to_close_still_has_its_work_removed_and_the_interrupt_goes_on(tmp_path: Path) -> None:
    """`stop` (closing a LocalCluster) raising on a Ctrl-C skipped the removal and replaced the interrupt (exit 1,
    not 130, and the killed workers' .partial left)."""
    work = tmp_path / "s.zarr.partial"
    works = {work: tmp_path / "s.zarr"}

    def stop() -> None:
        raise TimeoutError("the cluster did not close in time")

    with pytest.raises(KeyboardInterrupt), sw.abandoned_work_removed(works, stop):
        work.mkdir()
        raise KeyboardInterrupt
    assert not work.exists()
