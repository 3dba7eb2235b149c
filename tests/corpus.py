"""A bad-input corpus, generated (never committed): every way a slide folder from the wild can be wrong.

:func:`build_corpus` writes the corpus into one folder, beside a few good slides (some with awkward names),
and returns what each entry is and what must happen to it. Real slides come from ``../shared/data`` and are
truncated or corrupted here; everything else is written with tifffile or pydicom. Tests use the entries two
ways: through ``wsi-screen tile`` / ``infer`` (one error line per bad entry, every good slide finished) and one
by one through :class:`~wsi_screen.slide.slide.Slide` (the exception class).

Running as root: ``chmod 000`` does not stop root from reading. :func:`is_root` tells the tests, which then
either drop the capabilities that let root bypass permissions in a subprocess (:func:`unprivileged_cli`) or
simulate an unreadable file where the check lives (``os.access``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from tests.factory import block_image, write_ome_tiff, write_tiled_tiff
from wsi_screen.errors import MissingMppError, SlideOpenError, SlideReadError, UnsupportedFormatError

#: the seed of every random byte in the corpus
SEED = 20240611


@dataclass(frozen=True)
class Entry:
    """One corpus entry: a path relative to the corpus folder, and what must happen to it.

    ``error`` is the exception class :class:`~wsi_screen.slide.slide.Slide` raises (at open, or while reading
    the thumbnail and patches); None for a good slide, and for entries that discovery reports (symbolic
    link loops: they never become a slide). ``match`` is a fragment the message must hold.
    """

    name: str
    what: str
    error: type[Exception] | None = None
    match: str = ""
    discovery: bool = False  # reported by folder scanning, not by a slide reader
    slide_name: str | None = None  # the slide's display name (good slides)

    @property
    def bad(self) -> bool:
        return self.error is not None or self.discovery


def is_root() -> bool:
    return os.geteuid() == 0


# ----------------------------------------------------------------------------------------- TIFF writers
def _tiled(path: Path, data: np.ndarray, *, mpp: float | None = 0.5, photometric: str = "rgb",
           planarconfig: str | None = None, compression: str | None = "zlib") -> Path:
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(path, data, tile=(256, 256), photometric=photometric, planarconfig=planarconfig,
                     compression=compression, metadata=None, **res)
    return path


def _edit_dimensions(src: Path, dst: Path, width: int, height: int) -> Path:
    """Copy ``src`` and overwrite level 0's ImageWidth / ImageLength tags in place (a corrupt header)."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)
    return dst


def corrupt_tiles(src: Path, dst: Path, tiles: Sequence[int], *, page: int = 0, seed: int = SEED) -> Path:
    """Copy ``src`` and overwrite the middle third of each listed tile's payload with random bytes."""
    shutil.copy(src, dst)
    rng = np.random.default_rng(seed)
    with tifffile.TiffFile(src) as tif:
        offsets, counts = tif.pages[page].dataoffsets, tif.pages[page].databytecounts  # type: ignore[union-attr]
    with dst.open("r+b") as fh:
        for i in tiles:
            fh.seek(offsets[i] + counts[i] // 3)
            fh.write(rng.integers(0, 256, counts[i] // 3, dtype=np.uint8).tobytes())
    return dst


def truncate(src: Path, dst: Path, size: int) -> Path:
    with src.open("rb") as fh:
        dst.write_bytes(fh.read(size))
    return dst


# ---------------------------------------------------------------------------------------------- DICOM
def write_dicom_image(path: Path, *, series_uid: str | None = None, instance: int = 1, modality: str = "CT",
                      rgb: bool = False) -> Path:
    """A small, valid, non-WSI DICOM image: a CT slice or (``rgb``) a secondary-capture photograph."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    sop_class = SecondaryCaptureImageStorage if rgb else CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.InstanceNumber = modality, "Corpus^Test", "0", instance
    rng = np.random.default_rng(SEED + instance)
    if rgb:
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    else:
        pixels = rng.integers(0, 2000, (64, 64), dtype=np.uint16)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.Rows, ds.Columns, ds.PixelRepresentation = 64, 64, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------- corpus
#: file names of the good slides with awkward names (they must finish, and keep their names)
AWKWARD_NAMES = ("slide with  spaces.tif", "it's a \"quoted\" slide.tif", "Ünïcødé Präparat 切片.tif")


def build_corpus(folder: Path, slides_dir: Path) -> list[Entry]:
    """Write the corpus into ``folder`` (created) and return its entries, good slides included."""
    folder.mkdir(parents=True, exist_ok=True)
    svs = slides_dir / "CMU-1-Small-Region.svs"
    pyramid = slides_dir / "CMU-1-Small-Region.pyramid.tif"
    dcm = slides_dir / "camelyon-lowres.dcm"
    rng = np.random.default_rng(SEED)
    entries: list[Entry] = []

    def add(name: str, what: str, error: type[Exception] | None = None, match: str = "", **kw: object) -> None:
        entries.append(Entry(name, what, error, match, **kw))  # type: ignore[arg-type]

    # --- good slides: they must all finish
    shutil.copy(svs, folder / "good.svs")
    add("good.svs", "real Aperio SVS (JPEG tiles)", slide_name="good")
    shutil.copy(svs, folder / "aperio-named.ndpi")
    add("aperio-named.ndpi", "real SVS with a wrong extension (.ndpi): the content decides, it works",
        slide_name="aperio-named")
    small = block_image((1024, 768), [(64, 64, 960, 704)], seed=5)
    for name in AWKWARD_NAMES:
        write_tiled_tiff(folder / name, small, mpp=0.5)
        add(name, "tiled TIFF with spaces, quotes or non-ASCII letters in its name", slide_name=Path(name).stem)

    # --- not slides at all
    (folder / "zero-bytes.svs").write_bytes(b"")
    add("zero-bytes.svs", "empty file", SlideOpenError, "empty file")
    (folder / "random-bytes.svs").write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    add("random-bytes.svs", "200 kB of random bytes", UnsupportedFormatError, "not a slide format")
    (folder / "random-after-tiff-magic.tif").write_bytes(
        b"II*\x00" + rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    add("random-after-tiff-magic.tif", "TIFF magic number, then random bytes", SlideOpenError, "")
    (folder / "text.svs").write_text("this is not a slide\n" * 200)
    add("text.svs", "a text file named .svs", UnsupportedFormatError, "not a slide format")
    from PIL import Image

    Image.fromarray(small[:256, :256]).save(folder / "photo-named.svs", format="PNG")
    add("photo-named.svs", "a PNG photograph named .svs", UnsupportedFormatError, "not a slide format")

    # --- truncated real slides (several offsets: header, IFDs, tile data, the very end)
    size = svs.stat().st_size
    for cut in (8, 4096, size // 3, size * 2 // 3, size - 1000):
        name = f"cut-{cut}.svs"
        truncate(svs, folder / name, cut)
        add(name, f"CMU SVS truncated at byte {cut:,} of {size:,}", SlideOpenError, "")
    psize = pyramid.stat().st_size
    for cut in (psize // 2, psize - 2000):
        name = f"cut-{cut}.pyramid.tif"
        truncate(pyramid, folder / name, cut)
        add(name, f"CMU pyramid TIFF truncated at byte {cut:,} of {psize:,}", SlideOpenError, "")
    truncate(dcm, folder / "cut-half.dcm", dcm.stat().st_size // 2)
    add("cut-half.dcm", "single-file DICOM WSI truncated at half", SlideReadError, "")

    # --- corrupt tile data (random bytes written into the JPEG payloads)
    corrupt_tiles(svs, folder / "corrupt-tiles.svs", range(40, 80))
    add("corrupt-tiles.svs", "SVS with random bytes in 40 tile payloads", SlideReadError, "corrupt")
    corrupt_tiles(pyramid, folder / "corrupt-tiles.pyramid.tif", range(30, 70))
    add("corrupt-tiles.pyramid.tif", "pyramid TIFF with random bytes in 40 level-0 tile payloads",
        SlideReadError, "corrupt")

    # --- absurd declared dimensions (header edited)
    base = write_tiled_tiff(folder / ".base.tif", small, mpp=0.5, pyramid=False)
    _edit_dimensions(base, folder / "absurd-dimensions.tif", 10_000_000, 10_000_000)
    add("absurd-dimensions.tif", "tiled TIFF whose header declares 10,000,000 x 10,000,000 px", SlideOpenError, "")
    _edit_dimensions(base, folder / "zero-width.tif", 0, 768)
    add("zero-width.tif", "tiled TIFF whose header declares a width of 0", SlideOpenError, "")
    _edit_dimensions(base, folder / "too-tall.tif", 1024, 100_000)
    add("too-tall.tif", "tiled TIFF declaring 100,000 rows but holding tiles for 768", SlideOpenError,
        "needs 1564 tiles or strips but lists 12")
    base.unlink()
    ome = write_ome_tiff(folder / ".base.ome.tif", small, mpp=0.5)
    _edit_dimensions(ome, folder / "absurd-dimensions.ome.tif", 4_000_000_000, 4_000_000_000)
    add("absurd-dimensions.ome.tif", "OME-TIFF whose header declares 4e9 x 4e9 px", SlideOpenError,
        "declares 4000000000 x 4000000000 px")
    ome.unlink()

    # --- not brightfield RGB
    gray = np.asarray(Image.fromarray(small).convert("L"))
    _tiled(folder / "grayscale.tif", gray, photometric="minisblack")
    add("grayscale.tif", "8-bit grayscale tiled TIFF", UnsupportedFormatError, "grayscale")
    _tiled(folder / "rgb-16bit.tif", small.astype(np.uint16) * 257)
    add("rgb-16bit.tif", "16-bit RGB tiled TIFF", UnsupportedFormatError, "16-bit")
    planes = np.stack([gray >> k for k in range(5)])  # (5, h, w): five "fluorescence channels"
    _tiled(folder / "fluorescence-5ch.tif", planes, photometric="minisblack", planarconfig="separate")
    add("fluorescence-5ch.tif", "5-channel planar (fluorescence) tiled TIFF", UnsupportedFormatError, "5 channels")
    with tifffile.TiffWriter(folder / "fluorescence-pages.tif") as tw:
        for k in range(4):
            tw.write(gray >> k, tile=(256, 256), photometric="minisblack", metadata=None,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER", contiguous=False)
    add("fluorescence-pages.tif", "4 single-channel pages of one size (QPTIFF-like multiplex)",
        UnsupportedFormatError, "")

    # --- resolution missing or absurd
    _tiled(folder / "no-mpp.tif", small, mpp=None, compression="jpeg")
    add("no-mpp.tif", "tiled RGB TIFF without a resolution", MissingMppError, "`slide_mpp`")
    _tiled(folder / "absurd-mpp.tif", small, mpp=0.001, compression="jpeg")
    add("absurd-mpp.tif", "tiled RGB TIFF declaring 0.001 um/px", MissingMppError, "implausible")

    # --- DICOM that is not a whole-slide image
    write_dicom_image(folder / "ct-slice.dcm")
    add("ct-slice.dcm", "a CT slice (valid DICOM, not a WSI)", UnsupportedFormatError, "not a slide format")
    write_dicom_image(folder / "photo-secondary-capture.dcm", rgb=True, modality="OT")
    add("photo-secondary-capture.dcm", "an RGB secondary-capture DICOM (not a WSI)", UnsupportedFormatError,
        "not a slide format")
    series = folder / "ct-series"
    series.mkdir()
    from pydicom.uid import generate_uid

    uid = generate_uid()
    for i in (1, 2, 3):
        write_dicom_image(series / f"slice-{i}.dcm", series_uid=uid, instance=i)
    add("ct-series", "a folder holding a 3-file CT series (one series: one slide candidate)",
        UnsupportedFormatError, "not a DICOM whole-slide image series")

    # --- permissions and links
    shutil.copy(svs, folder / "unreadable.svs")
    (folder / "unreadable.svs").chmod(0)
    add("unreadable.svs", "a real slide with permissions 000", SlideOpenError, "permission denied")
    links = folder / "links"
    links.mkdir()
    (links / "loop").symlink_to("..", target_is_directory=True)
    add("links/loop", "a symbolic link to its own parent folder (a loop)", discovery=True)
    (links / "self.svs").symlink_to("self.svs")
    add("links/self.svs", "a symbolic link to itself", discovery=True)
    (links / "gone.svs").symlink_to("no-such-slide.svs")
    add("links/gone.svs", "a dangling symbolic link", discovery=True)
    return entries


def restore_permissions(folder: Path) -> None:
    """Make every file of the corpus deletable/readable again (pytest's tmp_path cleanup needs it)."""
    for p in folder.rglob("*"):
        if not p.is_symlink() and p.exists():
            p.chmod(p.stat().st_mode | stat.S_IRUSR | stat.S_IWUSR | (stat.S_IXUSR if p.is_dir() else 0))


# ------------------------------------------------------------------------------- unprivileged CLI runs
_DROP_AND_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: what lets root ignore permission bits
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; exec then recomputes root's capabilities
        sys.exit(99)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])  # python with the arguments given
"""


def can_drop_privileges() -> bool:
    """Whether a root process here may drop CAP_DAC_OVERRIDE from a child (needs CAP_SETPCAP)."""
    if not is_root():
        return True
    try:
        ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    probe = subprocess.run([sys.executable, "-c", _DROP_AND_EXEC, "-m", "wsi_screen.cli", "--version"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


def unprivileged_cli(args: Sequence[str], *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m wsi_screen.cli ARGS`` where permission bits apply (root: without CAP_DAC_*)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*_unprivileged_python(), "-m", "wsi_screen.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _unprivileged_python() -> list[str]:
    """The command line of a Python interpreter where permission bits apply (root: without CAP_DAC_*)."""
    return [sys.executable, "-c", _DROP_AND_EXEC] if is_root() else [sys.executable]


#: runs each command of argv[1] (a JSON list of argument lists) in its own forked process, after importing the
#: CLI and torch once; prints each one's exit status, stdout and stderr as a JSON list
_FORK_EACH = """
import gc, json, os, sys, tempfile
import wsi_screen.cli
for heavy in ("torch", "timm"):
    try:
        __import__(heavy)
    except ImportError:
        pass
gc.freeze()  # the imported objects stay shared with the forked commands (a collection would copy their pages)
done = []
for args in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the command, as `python -m wsi_screen.cli ARGS` runs it
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = ["wsi-screen", *args]
            wsi_screen.cli.main()
            sys.exit(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.seek(0)
        err.seek(0)
        done.append([status, out.read().decode(), err.read().decode()])
print(json.dumps(done))
"""


def unprivileged_cli_runs(runs: Sequence[Sequence[str]], *,
                          timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """:func:`unprivileged_cli` for several commands, one after the other: each is its own process (forked, so
    its exit status, stdout and stderr are its own) from one unprivileged interpreter that imported the CLI and
    torch once (~6 s of CPU a command less).

    Not :mod:`tests.warm_cli`, the other way to run warm commands: dropping root's CAP_DAC_* takes effect at an
    exec, so the commands must be forked from an interpreter exec'd after the drop, while warm_cli's fork server is
    started by the test process and its children keep its capabilities. The commands here run one after the
    other, each forked from the main thread of a plain interpreter, so each exits as ``python -m wsi_screen.cli``
    does (SystemExit, then the interpreter's own exit) with the default start method; warm_cli's run side by side
    and can be signalled, which the kill and concurrency tests need."""
    import json

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    plan = json.dumps([[str(a) for a in args] for args in runs])
    proc = subprocess.run([*_unprivileged_python(), "-c", _FORK_EACH, plan], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the unprivileged runner failed ({proc.returncode}): {proc.stderr}")
    return [subprocess.CompletedProcess(list(args), code, out, err)
            for args, (code, out, err) in zip(runs, json.loads(proc.stdout.splitlines()[-1]), strict=True)]
