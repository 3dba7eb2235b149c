"""Streaming ``infer`` reads a slide's patches in the slide reader's child process: a native crash or hang while a
slide is being scored fails that slide alone, and the next slide is scored as usual."""

from __future__ import annotations

import csv
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.factory import block_image, write_tiled_tiff
from wsi_screen.models import default_model_dir, load_model
from wsi_screen.screening.run import InferConfig, SlideJob, run_infer, screen_slide, tile_config_for
from wsi_screen.slide import isolation
from wsi_screen.slide.discovery import SlideSource
from wsi_screen.tiling import ondemand
from wsi_screen.tiling.pipeline import tile_isolated
from wsi_screen.tiling.store import read_rows


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two slides of tissue at the bundled model's resolution: 8 x 8 patches each (4 batches of 16)."""
    folder = tmp_path_factory.mktemp("streamed")
    for name, seed in (("a-first", 5), ("b-second", 6)):
        write_tiled_tiff(folder / f"{name}.tif", block_image((768, 768), [(0, 0, 768, 768)], seed=seed), mpp=0.972)
    return folder


def _job(run: Path, stores: Path, classifier: Any, timeout: float = isolation.DEFAULT_TIMEOUT) -> SlideJob:
    tile = replace(tile_config_for(classifier, InferConfig()), slide_timeout=timeout)
    return SlideJob(run=run, stores=str(stores), tile=tile, model_id={"sha256": "0" * 64}, batch_size=16,
                    on_error="record")


class _Breaks:
    """A caller that runs calls in ``worker`` and, just before the second batch read of the first slide it
    scores, sends ``sig`` to the worker's child: the failure happens in the child, in the middle of scoring."""

    def __init__(self, worker: isolation.SlideWorker, sig: int) -> None:
        self.worker, self.sig = worker, sig
        self.reads: list[tuple[str, int]] = []
        self.fired = False

    def __call__(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if fn is read_rows:
            self.reads.append((Path(args[0]).name, args[1]))
            if not self.fired and len(self.reads) == 2:
                self.fired = True
                assert self.worker._proc is not None
                os.kill(self.worker._proc.pid, self.sig)
        return self.worker.call(fn, *args, **kwargs)


@pytest.mark.parametrize(("sig", "message"), [
    (signal.SIGSEGV, "the slide reader crashed (signal 11, SIGSEGV)"),
    (signal.SIGSTOP, "no progress for 3 s (a hung slide reader?)"),
])
def test_a_crash_or_hang_while_scoring_fails_that_slide_alone(slides: Path, tmp_path: Path, sig: int,
                                                              message: str) -> None:
    classifier = load_model()
    job = _job(tmp_path / "run", tmp_path / "stores", classifier, timeout=3)
    rows = []
    with isolation.SlideWorker(timeout=3, preload=(tile_isolated.__module__,)) as worker:
        caller = _Breaks(worker, sig)
        for name in ("a-first", "b-second"):
            rows.append(screen_slide(SlideSource(slides / f"{name}.tif", name), job, classifier, call=caller))
    assert [r.status for r in rows] == ["error", "ok"], rows
    assert message in rows[0].error and str(slides / "a-first.tif") in rows[0].error
    assert caller.reads[:2] == [("a-first.zarr", 0), ("a-first.zarr", 16)]  # it broke mid-slide, while scoring
    assert [r for r in caller.reads if r[0] == "b-second.zarr"] == [("b-second.zarr", s) for s in (0, 16, 32, 48)]
    assert not (job.run / "a-first" / "slide.json").exists()
    assert len((job.run / "b-second" / "scores.csv").read_text().splitlines()) == 1 + 64


def test_infer_scores_from_pixels_read_in_the_child(slides: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's policy (``record``) scores coordinates-only stores from pixels read in the child: the only
    slide reads left in this process are the report's top patches (already read once, in the child, to score
    them), and the scores are those of the same stores read here."""
    from wsi_screen.screening.report import N_TOP
    from wsi_screen.screening.score import score_stores

    monkeypatch.delenv("WSI_SCREEN_IN_PROCESS", raising=False)
    # float32: in bfloat16 (`auto` on a CPU with AVX512-BF16 or AMX) infer rescores patches near the slide rule's
    # thresholds in float32 and score_stores alone does not, so the two would differ there by design
    model = load_model(precision="fp32")
    here: list[int] = []
    read = ondemand.SlidePatches.read

    def counted(self: ondemand.SlidePatches, xy: np.ndarray) -> np.ndarray:
        here.append(len(xy))
        return read(self, xy)

    monkeypatch.setattr(ondemand.SlidePatches, "read", counted)
    run = tmp_path / "run"
    summary = run_infer([str(slides)], run, model, default_model_dir(), InferConfig(workers=1), on_error="record")
    assert [r.status for r in summary.rows] == ["ok", "ok"], [r.error for r in summary.rows]
    assert 0 < sum(here) <= 2 * N_TOP and max(here) <= N_TOP, here  # 128 patches were scored
    monkeypatch.undo()
    for name in ("a-first", "b-second"):
        with (run / name / "scores.csv").open() as fh:
            scored = np.array([float(r["p_tumour"]) for r in csv.DictReader(fh)])
        ((_, probs, _),) = score_stores([str(run / "stores" / f"{name}.zarr")], model)  # read in this process
        assert len(scored) == 64
        np.testing.assert_allclose(scored, probs[:, model.spec.positive_index], atol=1e-6)
