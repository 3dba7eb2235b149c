"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.classifier_data import make_subset


@pytest.fixture(scope="session")
def herlev_small(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Herlev binary: 24 train + 6 test images per binary class."""
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_small"),
                       {"train": 24, "test": 6}, label_column="binary_label")
