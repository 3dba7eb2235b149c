"""``wsi-screen infer`` with the bundled default model: real slide, synthetic slides with known truth,
resume, failures, mismatched stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import read_results, run_cli
from wsi_screen.models import load_model


def test_mismatched_store_is_refused(tmp_path: Path, cmu_svs: Path) -> None:
    stores = tmp_path / "stores"
    assert run_cli("tile", cmu_svs, "-o", stores, "--mpp", "0.5", "--size", "224", "--quiet").code == 0
    res = run_cli("infer", cmu_svs, "-o", tmp_path / "run", "--stores", stores, "--workers", "0", "--quiet")
    assert res.code == 1
    row = read_results(tmp_path / "run")["CMU-1-Small-Region"]
    assert row["status"] == "error" and "--overwrite" in row["error"] and "patch_size" in row["error"]
    res = run_cli("infer", cmu_svs, "-o", tmp_path / "run", "--stores", stores, "--overwrite", "--workers", "0",
                  "--quiet")
    assert res.code == 0 and read_results(tmp_path / "run")["CMU-1-Small-Region"]["status"] == "ok"


def test_store_model_check_message() -> None:
    from wsi_screen.errors import ModelMismatchError
    from wsi_screen.screening.score import check_store_matches_model

    spec = load_model().spec
    with pytest.raises(ModelMismatchError, match=r"`mpp`=0\.972, `size_px`=96"):
        check_store_matches_model({"mpp": 0.5, "patch_size": 224, "stain": {"method": "none"}}, spec, "s.zarr")
    check_store_matches_model({"mpp": 0.972, "patch_size": 96, "stain": {"method": "none"}}, spec, "s.zarr")


def test_prefetch_keeps_order_reraises_errors_and_stops_early() -> None:
    import threading

    from wsi_screen.screening.score import prefetch

    assert list(prefetch(iter(range(50)), 3)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in prefetch(failing(), 2):
            got.append(item)
    assert got == [1]

    produced = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = prefetch(endless(), 2)
    assert next(gen) == 0
    gen.close()  # the consumer stops: the reader thread must stop too
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 5
