"""Fixtures shared by the screening tests: a small synthetic cohort with known truth, and its run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_screen.synthetic.slides import build_slide


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory, patches_dir: Path) -> Path:
    """Three tumour and three normal slides built from PCam *valid* patches, with truth and labels."""
    root = tmp_path_factory.mktemp("synthetic")
    slides = root / "slides"
    slides.mkdir()
    truth = {}
    with (root / "slides.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "label"])
        for i, positive in enumerate([True, False, True, False, True, False]):
            name = f"case{i}"
            t = build_slide(slides / f"{name}.tiff", patches_dir=patches_dir / "pcam", positive=positive,
                            grid=(12, 12), tumour_fraction=0.2, seed=100 + i, split="valid")
            truth[name] = t
            writer.writerow([f"{name}.tiff", "tumour" if positive else "normal"])
    (root / "truth.json").write_text(json.dumps({k: v.to_json() for k, v in truth.items()}))
    return root


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory, synthetic: Path) -> Path:
    run = tmp_path_factory.mktemp("run") / "cohort"
    res = run_cli("infer", synthetic / "slides", "-o", run, "--labels", synthetic / "slides.csv", "--workers", "2",
                  "--quiet")
    assert res.code == 0, res
    return run
