"""Run folders of many slides made from a real one-slide run, for the report's tests and bench/report.py: the slide's
folder (heatmap, scores, GeoJSON, slide.json) copied under new names, results.csv holding the real row with each
slide's changes (its call, score, flags)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from wsi_screen.screening import runfolder


def copied_run(real: Path, out: Path, changes: Sequence[Mapping[str, str]]) -> Path:
    """A run folder at ``out`` with one slide per item of ``changes`` (each names its ``slide``), made from the
    finished one-slide run ``real``: its run.json and stores as they are, its slide's folder copied under each name
    (none for a change with ``status`` error), and results.csv the real row updated with each change."""
    rows = runfolder.read_results(real)
    if len(rows) != 1:
        raise ValueError(f"{real}: expected a run of one slide, not {len(rows)}")
    base = rows[0]
    shutil.copytree(real, out, ignore=shutil.ignore_patterns(base["slide"], runfolder.REPORT_HTML))
    new = []
    for change in changes:
        row = {**base, **change}
        if row["status"] != "error":
            shutil.copytree(real / base["slide"], out / row["slide"])
        new.append(row)
    (out / runfolder.RESULTS_CSV).write_text(runfolder.csv_text(new, runfolder.RESULT_COLUMNS), encoding="utf-8")
    return out


def cohort_changes(n: int, *, positive: str, negative: str, every: int = 20) -> list[dict[str, str]]:
    """``n`` slides' changes: one in ``every`` called ``positive``, one in ``every`` out of domain and one in
    ``every`` failed (each at its own offset); the rest ``negative`` and in domain, with scores all different."""
    out = []
    for i in range(n):
        row = {"slide": f"slide-{i:04d}", "diagnosis": negative, "out_of_domain": "false",
               "score": f"{0.04 * (i + 1) / (n + 1):.6f}"}
        if i % every == 1:
            row |= {"diagnosis": positive, "score": "0.5"}
        elif i % every == 2:
            row["out_of_domain"] = "true"
        elif i % every == 3:
            row |= {"status": "error", "error": "not a slide format", "score": "", "diagnosis": ""}
        out.append(row)
    return out
