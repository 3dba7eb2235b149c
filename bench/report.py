"""report.html at 100 and 1,000 slides: build time and size, against the behaviour before the pictured-slides rule
and the preview cache, measured in the same run.

    PYTHONPATH=. python bench/report.py [--real RUN] [--sizes 100,1000] [--work DIR]

The run folders are synthetic but their slides are real: one `wsi-screen infer` run on examples/ (made in
``--work`` unless ``--real`` names one) has its slide's folder (heatmap.png, scores, GeoJSON, slide.json) copied under
new names, with results.csv rows (tests/runs.py): one slide in 20 called tumour, one in 20 out of domain, one in 20
failed, the rest normal and in domain with scores all different. Every build writes RUN/report.html in this process
(imports warmed first); each row is one build:

* before: every scored slide pictured, every heatmap preview encoded (the report module's preview function swapped
  back to the uncached encoder: the code path before the cache);
* first build: the rule's default (the slides that need a look and the 50 highest-scoring others), no cache;
* rebuild: the same again, the previews cached (`wsi-screen report RUN`, a rerun of infer);
* every slide, rebuild: every scored slide pictured with the previews cached (the cache alone, without the rule).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO, header, table

sys.path.insert(0, str(REPO))


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def real_run(work: Path) -> Path:
    run = work / "real"
    if not (run / "results.csv").exists():
        subprocess.run([sys.executable, "-m", "wsi_screen.cli", "infer", str(REPO / "examples"), "-o", str(run),
                        "--workers", "0", "--quiet"], check=True)
    return run


def build(run: Path, report_top: int | None, *, before: bool = False) -> tuple[float, int]:
    """Seconds to write the run's report and its size in bytes."""
    from wsi_screen.screening import preview, report

    cached = report.cached_heatmap_preview
    if before:
        report.cached_heatmap_preview = preview.heatmap_preview
    try:
        t0 = time.perf_counter()
        out = report.write_report(run, report_top)
        seconds = time.perf_counter() - t0
    finally:
        report.cached_heatmap_preview = cached
    return seconds, out.stat().st_size


def drop_caches(run: Path) -> None:
    from wsi_screen.screening import runfolder

    shutil.rmtree(run / runfolder.PREVIEW_DIR, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=None, help="a finished one-slide infer run (default: made here)")
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--work", type=Path, default=OUT / "report")
    args = parser.parse_args(argv)

    from tests.runs import cohort_changes, copied_run
    from wsi_screen.screening import runfolder
    from wsi_screen.screening.pictured import REPORT_TOP

    args.work.mkdir(parents=True, exist_ok=True)
    real = args.real or real_run(args.work)
    info = json.loads((real / runfolder.RUN_JSON).read_text())
    positive = info["model"]["positive_class"]
    negative = next(c for c in info["model"].get("classes", ["normal"]) if c != positive)
    rows = []
    build(real, None)  # imports and the first slide read, untimed
    for n in (int(v) for v in args.sizes.split(",")):
        run = args.work / f"run-{n}"
        shutil.rmtree(run, ignore_errors=True)
        copied_run(real, run, cohort_changes(n, positive=positive, negative=negative))
        scored = sum(1 for r in runfolder.read_results(run) if r["status"] != "error")
        drop_caches(run)
        before = build(run, n, before=True)
        drop_caches(run)
        first = build(run, None)
        again = build(run, None)
        every = build(run, n)
        for name, (seconds, size) in [("before: every slide, no cache", before), ("first build (no cache)", first),
                                      ("rebuild (cached)", again), ("every slide, rebuild (cached)", every)]:
            rows.append((n, scored, name, seconds, size / 2**20, seconds / before[0], size / before[1]))
        shutil.rmtree(run)
    print(header(f"report.html at scale (`python bench/report.py`), report_top {REPORT_TOP}"))
    print(f"lscpu: {lscpu_model()}\n")
    print(table(["slides", "scored", "build", "seconds", "MB", "time x before", "size x before"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
