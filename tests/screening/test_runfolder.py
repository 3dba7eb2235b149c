"""wsi_screen.screening.runfolder: the run folder's files, read back as written, and whole slide folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_screen.errors import RunError
from wsi_screen.screening import runfolder
from wsi_screen.screening.runfolder import SlideFolder, SlideScores


def _scores(domain: bool) -> SlideScores:
    return SlideScores(coords=np.array([[0, 0], [96, 0], [0, 192]], np.int64),
                       tissue=np.array([1.0, 0.5, 0.25], np.float32),
                       probs=np.array([[0.9, 0.1], [0.25, 0.75], [0.5, 0.5]], np.float32),
                       classes=["normal", "tumour"],
                       domain_distance=np.array([0.5, 1.25, 7.0], np.float32) if domain else None)


@pytest.mark.parametrize("domain", [False, True])
def test_scores_csv_round_trips(tmp_path: Path, domain: bool) -> None:
    path = tmp_path / runfolder.SCORES_CSV
    path.write_text(runfolder.scores_csv(_scores(domain)))
    back = runfolder.read_scores(path)
    header = "index,x,y,tissue,p_normal,p_tumour" + (",domain_distance" if domain else "")
    assert path.read_text().splitlines()[0] == header
    assert back.classes == ["normal", "tumour"]
    assert np.array_equal(back.coords, _scores(domain).coords)
    assert np.allclose(back.probs, _scores(domain).probs) and np.allclose(back.tissue, _scores(domain).tissue)
    assert (back.domain_distance is None) == (not domain)


def test_a_foreign_csv_is_not_read_as_scores(tmp_path: Path) -> None:
    path = tmp_path / "scores.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(RunError, match=r"not a wsi-screen scores\.csv"):
        runfolder.read_scores(path)


def test_slide_folder_commits_whole_or_not_at_all(tmp_path: Path) -> None:
    first = SlideFolder(tmp_path, "s")
    first.path("a.txt").write_text("1")
    with pytest.raises(RunError, match="another wsi-screen process is writing"):
        SlideFolder(tmp_path, "s")  # the slide is locked while it is assembled
    assert not (tmp_path / "s").exists()  # nothing visible before the commit
    first.commit()
    second = SlideFolder(tmp_path, "s")
    second.path("b.txt").write_text("2")
    second.abort()
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["a.txt"]  # the aborted one changed nothing
    third = SlideFolder(tmp_path, "s")
    third.path("c.txt").write_text("3")
    third.commit()
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["c.txt"]  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["s"]


def test_paths_inside_the_run_are_recorded_relative(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "stores" / "a.zarr").mkdir(parents=True)
    assert runfolder.portable_path(str(run / "stores" / "a.zarr"), run) == "stores/a.zarr"
    assert runfolder.portable_path(str(tmp_path / "b.zarr"), run) == str((tmp_path / "b.zarr").resolve())
    assert runfolder.resolve_path("stores/a.zarr", run) == str(run / "stores" / "a.zarr")
