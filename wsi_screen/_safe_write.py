"""Safe file writing, written once: atomic files, folder swaps, inter-process locks and the one message for a
write that failed. Every writer in the package goes through here.

* A **file** is written under a temporary name in its own folder (``.<name>.<random>.tmp``: same filesystem,
  so the rename is atomic), fsynced, given the user's default permissions (``mkstemp`` alone would make it
  private), renamed over the target, and the folder is fsynced so the rename survives a power cut. A reader
  sees the old file or the new one, never half of one; a failure leaves no temporary file behind.
* A **folder** (a patch store, a run's slide folder, a model copy) is assembled under a temporary name, every
  file in it fsynced, then swapped in: an existing one is moved aside first and removed after.
* A **lock** is an exclusive ``flock`` (via ``filelock``) on ``<folder>/.wsi-screen-locks/<name>.lock``:
  two processes writing the same output would otherwise share its temporary name.
* A write that fails says so in one line, "disk full" when it is.
* Work folders that a run's own writers left behind when they were killed (a Dask worker ended by a Ctrl-C) are
  removed when the run ends so (:func:`abandoned_work_removed`); nothing that was there before it began is.

Nothing here knows what it writes; callers say what the output is in their own error types.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from filelock import FileLock, Timeout

from wsi_screen.errors import OutputWriteError

LOCK_DIR = ".wsi-screen-locks"


class LockTaken(Exception):  # noqa: N818 - a state, not a failure of ours: callers turn it into their error
    """The lock is held by another process (or another writer in this one)."""


def disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def failure_text(path: str | os.PathLike[str], exc: OSError, what: str = "") -> str:
    """The one line for a failed write of ``path`` (``what`` names the output, e.g. " the store")."""
    if disk_full(exc):
        return f"{path}: disk full while writing{what}; nothing was marked complete"
    return f"{path}: cannot write{what}: {exc.strerror or exc}"


def write_failed(path: str | os.PathLike[str], exc: OSError, what: str = "") -> OutputWriteError:
    return OutputWriteError(failure_text(path, exc, what))


def usable_folder(path: str | os.PathLike[str], what: str = "output folder", *, create: bool = True) -> None:
    """Create the folder ``path`` a run writes into (and its parents), and check that a file can be made in it:
    a run then refuses an unusable output on one line before its first slide, rather than failing every slide
    on it (a read-only folder) or saying "File exists" of a file in its place. Raises :class:`OutputWriteError`
    naming ``what`` the folder is and why. ``create=False`` creates nothing: the check is made in the folder, or
    where it does not exist yet in the nearest folder above it, where its creation would start (a command checks
    so before its slow start-up, and a refused run leaves nothing behind)."""
    folder = Path(path)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file of that name is in the way", str(folder))
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            probed = folder
        else:
            probed = folder.absolute()
            while not probed.exists() and probed != probed.parent:
                probed = probed.parent
            if not probed.is_dir():  # a file above it: what creating the folder would say
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probed))
        # a nameless file where the system has them (Linux: O_TMPFILE), else a new random name removed at once:
        # nothing is left behind by a run killed here, and no file of another run or user is in the way
        with tempfile.TemporaryFile(dir=probed):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        if disk_full(exc):
            why += " (disk full or over quota)"
        raise OutputWriteError(f"{folder}: cannot write in the {what}: {why}") from exc


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable (some filesystems refuse fsync on folders: then best effort)."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def fsync_tree(root: str | os.PathLike[str], skip: set[str] | frozenset[str] = frozenset()) -> None:
    """fsync every file under ``root`` (except the paths in ``skip``, already synced) and every folder."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if str(Path(dirpath) / f) not in skip:
                fsync_file(Path(dirpath) / f)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on leaving the block it is fsynced and renamed over
    ``path``. Any failure removes it; an OSError becomes one :class:`OutputWriteError` line."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise write_failed(out, exc, what) from exc
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        tmp.chmod(0o666 & ~umask())
        tmp.replace(out)
        fsync_dir(out.parent)
    except OSError as exc:
        raise write_failed(out, exc, what) from exc
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, what: str = "") -> None:
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, what: str = "") -> None:
    """``text`` as UTF-8 (see :func:`utf8`), line ends as given."""
    atomic_write_bytes(path, utf8(text), what)


def utf8(text: str) -> bytes:
    """``text`` as UTF-8; the undecodable bytes of a file name (surrogate escapes) are written as ``\\xNN``."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode("utf-8")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace")


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[Path], object], what: str = "") -> None:
    """Atomically write ``path`` with a writer that takes a path (an image's save, a figure's savefig)."""
    with atomic_path(path, what) as tmp:
        write(tmp)


def swap_in(work: Path, final: Path) -> None:
    """Rename the finished folder ``work`` to ``final`` (an existing ``final`` is moved aside first, to the hidden
    ``.<name>.old``, then removed), and make the rename durable. Raises OSError; the caller words it. The name
    moved aside to is hidden so that it is no one's output: ``<name>.old`` was, and a folder of that name beside
    ``final`` (a slide called ``a.old``, a user's ``lab.old``) was deleted."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        work.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        work.rename(final)
    fsync_dir(final.parent)


def lock_path(target: Path) -> Path:
    """Where the lock of an output ``target`` lives: ``<its folder>/.wsi-screen-locks/<its name>.lock``."""
    return target.parent / LOCK_DIR / f"{target.name}.lock"


def acquire(target: Path, *, wait: bool = False) -> FileLock:
    """Take the exclusive lock of ``target`` (held until ``.release()``); :class:`LockTaken` if another writer
    holds it and ``wait`` is false. An OSError (the lock folder cannot be made) propagates."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=-1 if wait else 0, mode=0o666 & ~umask(), thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise LockTaken(str(target)) from None
    return lock


def folder_stamp(path: Path) -> tuple[int, int] | None:
    """(inode, modification time in ns) of ``path``, None where there is nothing: a folder made, replaced or
    written into since has another."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def abandoned_work_removed(works: Mapping[Path, Path], stop: Callable[[], object]) -> Iterator[None]:
    """Run the body; where it ends by an exception (a Ctrl-C), call ``stop`` (which ends the processes that write,
    such as a LocalCluster's workers) and remove each of the work folders ``works`` (work folder -> the output its
    writer locks) that they left: one that is not as it was when the body began (made or replaced since: this
    run's; an older one is left alone) and whose output's lock is free (one that another process holds is its work
    in progress, and stays with it). Then the exception goes on."""
    before = {work: folder_stamp(work) for work in works}
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a cluster that fails to close still leaves its work to be removed,
            stop()  # and the interrupt (not that failure) is what the run ends with
        for work, target in works.items():
            now = folder_stamp(work)
            if now is None or now == before[work]:
                continue
            try:
                lock = acquire(target)
            except (LockTaken, OSError):
                continue
            try:
                shutil.rmtree(work, ignore_errors=True)
            finally:
                lock.release()
        raise
