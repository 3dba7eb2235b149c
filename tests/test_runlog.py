"""The run log (wsi_screen/runlog.py): a log file that cannot be written never costs the run."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli
from wsi_screen.tiling.store import PatchStore


def test_an_unwritable_log_file_is_dropped_not_the_run(cmu_svs: Path, tmp_path: Path) -> None:
    """A log file that cannot be opened (here a folder of its name, which root cannot write either; a read-only
    output folder is the same error) used to escape from the first log record: `tile` wrote its store and still
    failed with `.../wsi-screen.log: Is a directory`, exit 1, and `embed` stopped before its first slide."""
    out = tmp_path / "out"
    (out / "wsi-screen.log").mkdir(parents=True)
    res = run_cli("tile", cmu_svs, "-o", out, "--mpp", "0.972", "--size", "96", "--pixels", "none", "--quiet")
    assert res.code == 0 and res.err_lines == [], res
    store = PatchStore.open(out / "CMU-1-Small-Region.zarr")
    assert len(store) == 66
