"""Shared fixtures. Tests use the real data in ../shared/data (or $WSI_SCREEN_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub, ever: a pretrained=True call must fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSI_SCREEN_DATA", REPO.parent / "shared" / "data"))
SLIDES = DATA / "slides"
PATCHES = DATA / "patches"
EXAMPLE_SLIDE = REPO / "examples" / "CMU-1-Small-Region.svs"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set WSI_SCREEN_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return _require(SLIDES)


@pytest.fixture(scope="session")
def patches_dir() -> Path:
    return _require(PATCHES)


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    return _require(SLIDES / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def example_slide() -> Path:
    return _require(EXAMPLE_SLIDE)
