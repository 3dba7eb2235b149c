"""The run folder written by ``wsi-screen infer``: the one module that knows its layout.

::

    RUN/
      results.csv            one row per slide (see RESULT_COLUMNS): its call (diagnosis, score, rule, threshold, foci)
      run.json               provenance: model, settings, the slide rule (aggregate), versions, command, timings,
                             per-slide status, and each slide's focus size and tumour area unrounded (results.csv
                             rounds them; the report rounds these once, as the heatmap does)
      report.html            self-contained report (wsi-screen report RUN rewrites it)
      slide_metrics.json     with slide labels: slide AUC (bootstrap 95 % interval), sensitivity, specificity (Wilson)
      slide_roc.png          with slide labels
      stores/                patch stores tiled for this run (unless the run's stores are elsewhere)
      .wsi-screen-locks/     one lock file per slide, held while its folder is written
      <slide>/
        slide.json           how the slide was scored: store location and pixels, patch grid, slide info, model
                             (not its call: that is results.csv's row, with run.json's aggregate)
        scores.csv           one row per patch: index, x, y (level 0), tissue, p_<class> for every class
        heatmap.png          positive-class probability over the thumbnail, the call in its title, its foci outlined
        patches.geojson      QuPath FeatureCollection: the call's foci (annotations), then one polygon per patch
        .heatmap-preview     the report's preview of heatmap.png, cached with what it was made of (see
                             wsi_screen.screening.preview); not a result: any report rebuilds it
        stale/               only for a slide the latest run failed on: the files above as an earlier run
                             left them, moved aside so that they do not look current (see set_aside)

Every file is written atomically (temporary name, fsync, rename); a slide's folder is assembled under
``<slide>.partial`` and renamed into place when complete, so nothing in RUN is ever half-written.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen._safe_write import (
    LockTaken,
    acquire,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    lock_path,
    swap_in,
    write_failed,
)
from wsi_screen.errors import RunError, SlideBusyError

RESULTS_CSV = "results.csv"
RUN_JSON = "run.json"
REPORT_HTML = "report.html"
SLIDE_METRICS_JSON = "slide_metrics.json"
SLIDE_ROC_PNG = "slide_roc.png"
STORES_DIR = "stores"
SLIDE_JSON = "slide.json"
SCORES_CSV = "scores.csv"
HEATMAP_PNG = "heatmap.png"
GEOJSON = "patches.geojson"
PARTIAL = ".partial"
STALE_DIR = "stale"
#: a slide folder's result files (what :func:`set_aside` moves, slide.json last: it marks the folder finished)
SLIDE_FILES = (SCORES_CSV, HEATMAP_PNG, GEOJSON, SLIDE_JSON)
#: the run folder's cache of the report's heatmap previews (wsi_screen.screening.preview), not results
PREVIEW_DIR = ".previews"
#: run.json's ``aggregate.source`` when the slide rule rests on no calibration (the model folder has none)
FALLBACK_SOURCE = "fallback"

RESULT_COLUMNS = ("slide", "status", "n_patches", "score", "diagnosis", "rule", "threshold", "metastasis",
                  "largest_focus_mm", "tumour_area_mm2", "n_foci", "slide_mpp", "mpp_source", "in_domain_fraction",
                  "out_of_domain", "top_x", "top_y",
                  "top_score", "model", "label", "error", "source", "store",
                  # added later, so at the end: whether the call matches the label (see outputs.label_agrees)
                  "label_agrees")


def lossy_pixels(pixels: Mapping[str, Any] | None) -> bool:
    """Whether a slide's ``store_pixels`` (slide.json, run.json) name a lossy codec (JPEG, JPEG XL): the patches
    its scores came from are not the slide's pixels."""
    from wsi_screen.tiling.codecs import PatchCodec

    return bool(pixels and pixels.get("pixels") == "store" and PatchCodec.from_json(pixels.get("codec")).lossy)


def portable_path(path: str, run: Path) -> str:
    """How a run folder records a path it depends on (a store): relative to the run folder when inside it,
    so the folder can be moved, copied or opened from any working folder; else absolute (URLs unchanged)."""
    if "://" in path:
        return path
    target, base = Path(path).resolve(), Path(run).resolve()
    try:
        return target.relative_to(base).as_posix()
    except ValueError:
        return str(target)


def resolve_path(recorded: str, run: Path) -> str:
    """The path a run folder recorded (see :func:`portable_path`), as usable from here. Folders written
    before paths were portable recorded them relative to the working folder of the run: tried last."""
    if "://" in recorded or Path(recorded).is_absolute():
        return recorded
    inside = Path(run) / recorded
    if inside.exists() or not Path(recorded).exists():
        return str(inside)
    return recorded


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object")
    return data


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ per-slide files
@dataclass(frozen=True)
class SlideScores:
    """A slide's patch scores as written to ``scores.csv``."""

    coords: np.ndarray  # int64 (N, 2) level-0 x, y
    tissue: np.ndarray  # float32 (N,)
    probs: np.ndarray  # float32 (N, C)
    classes: list[str]
    #: float32 (N,): each patch's distance from the model's training data (None: no domain model)
    domain_distance: np.ndarray | None = None


DOMAIN_COLUMN = "domain_distance"


def scores_csv(scores: SlideScores) -> str:
    dist = scores.domain_distance
    buf = io.StringIO()
    buf.write(",".join(["index", "x", "y", "tissue", *[f"p_{c}" for c in scores.classes],
                        *([DOMAIN_COLUMN] if dist is not None else [])]) + "\n")
    for i in range(len(scores.coords)):
        x, y = scores.coords[i]
        probs = ",".join(f"{p:.6f}" for p in scores.probs[i])
        extra = f",{float(dist[i]):.4f}" if dist is not None else ""
        buf.write(f"{i},{int(x)},{int(y)},{float(scores.tissue[i]):.4f},{probs}{extra}\n")
    return buf.getvalue()


def read_scores(path: Path) -> SlideScores:
    """Parse a ``scores.csv``."""
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            return _parse_scores(fh, path)
    except OSError as exc:
        raise RunError(f"{path}: cannot read scores: {exc}") from exc


def as_written(scores: SlideScores) -> SlideScores:
    """``scores`` as ``scores.csv`` keeps them (probabilities to 6 decimals, distances to 4): what ``infer``
    calls a slide from, so a call made in Python is the run's to the last digit."""
    return _parse_scores(io.StringIO(scores_csv(scores), newline=""), Path("scores.csv"))


def _parse_scores(fh: Iterable[str], path: Path) -> SlideScores:
    try:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    except StopIteration as exc:
        raise RunError(f"{path}: cannot read scores: {exc}") from exc
    has_domain = header[-1:] == [DOMAIN_COLUMN]
    prob_cols = header[4:len(header) - has_domain]
    if header[:4] != ["index", "x", "y", "tissue"] or not prob_cols or not all(h.startswith("p_") for h in prob_cols):
        raise RunError(f"{path}: not a wsi-screen scores.csv")
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    end = 4 + len(prob_cols)
    return SlideScores(coords=table[:, 1:3].astype(np.int64), tissue=table[:, 3].astype(np.float32),
                       probs=table[:, 4:end].astype(np.float32), classes=[h[2:] for h in prob_cols],
                       domain_distance=table[:, end].astype(np.float32) if has_domain else None)


class SlideFolder:
    """Assemble ``RUN/<slide>/`` under a temporary name, then :meth:`commit` it in one rename.

    From creation to commit or abort it holds an inter-process lock on the slide (``flock`` on
    ``RUN/.wsi-screen-locks/<slide>.lock``): two runs writing the same run folder would otherwise share
    ``<slide>.partial`` and could commit a folder with files missing. A slide another process is writing
    raises :class:`~wsi_screen.errors.SlideBusyError` (a :class:`RunError`).
    """

    def __init__(self, run: Path, name: str) -> None:
        self.final = run / name
        self.work = run / (name + PARTIAL)
        try:
            self._lock = acquire(self.final)
        except LockTaken:
            raise SlideBusyError(f"{self.final}: another wsi-screen process is writing this slide's results; skipped "
                           "(rerun afterwards to pick it up)") from None
        except OSError as exc:
            raise write_failed(lock_path(self.final), exc) from exc
        try:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
        except OSError as exc:
            self._lock.release()
            raise write_failed(self.work, exc) from exc

    def path(self, filename: str) -> Path:
        return self.work / filename

    def commit(self) -> Path:
        try:
            fsync_tree(self.work)
            swap_in(self.work, self.final)
        except OSError as exc:
            raise write_failed(self.final, exc) from exc
        finally:
            self._lock.release()
        return self.final

    def abort(self) -> None:
        try:
            shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self._lock.release()


def partials(run: Path, names: Iterable[str]) -> dict[Path, Path]:
    """The ``RUN/<slide>.partial`` work folders of ``names``, each with the slide folder its writer locks (for
    :func:`~wsi_screen._safe_write.abandoned_work_removed`)."""
    return {Path(run) / (name + PARTIAL): Path(run) / name for name in names}


# ------------------------------------------------------------------------------------------------ reading
def read_results(run: Path) -> list[dict[str, str]]:
    """Rows of ``results.csv`` (strings, as written)."""
    path = Path(run) / RESULTS_CSV
    if not path.exists():
        raise RunError(f"{run}: not a wsi-screen run folder (no {RESULTS_CSV}); run `wsi-screen infer` first")
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def slide_dir(run: Path, name: str) -> Path:
    return Path(run) / name


def slide_folders(run: Path) -> list[str]:
    """Names of the finished slide folders in ``run`` (those holding a ``slide.json``)."""
    try:
        return sorted(p.parent.name for p in Path(run).glob(f"*/{SLIDE_JSON}") if not p.parent.name.startswith("."))
    except OSError:
        return []


def set_aside(run: Path, name: str) -> Path | None:
    """Move the result files (:data:`SLIDE_FILES`) an earlier run left in ``RUN/<name>/`` into ``RUN/<name>/stale/``
    (replacing files of the same names there), under the slide's lock: for a slide the latest run failed on, whose
    old heatmap and GeoJSON would otherwise look current. Nothing is deleted; the next successful run of the slide
    replaces the whole folder. Returns the ``stale`` folder, or None when ``RUN/<name>`` holds no finished result or
    another process is writing it (its results will be current)."""
    if name not in slide_folders(run):
        return None
    folder = slide_dir(run, name)
    try:
        lock = acquire(folder)
    except LockTaken:
        return None
    except OSError as exc:
        raise write_failed(lock_path(folder), exc) from exc
    stale = folder / STALE_DIR
    try:
        stale.mkdir(exist_ok=True)
        for filename in SLIDE_FILES:
            if (folder / filename).exists():
                (folder / filename).replace(stale / filename)
        fsync_dir(stale)
        fsync_dir(folder)
    except OSError as exc:
        raise write_failed(stale, exc) from exc
    finally:
        lock.release()
    return stale


def read_slide(run: Path, name: str) -> dict[str, Any]:
    """A finished slide's ``slide.json``."""
    return read_json(slide_dir(run, name) / SLIDE_JSON)
