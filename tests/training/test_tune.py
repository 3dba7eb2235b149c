"""wsi_screen.training.tune: the search space and a search that chooses on validation only."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.classifier_data import tiny_config
from wsi_screen.errors import ConfigError
from wsi_screen.models import load_model
from wsi_screen.training.train import TrainConfig
from wsi_screen.training.tune import expand, tune


def test_expand_grid_and_random() -> None:
    space = {"lr": [1e-3, 3e-4], "batch_size": [32, 64], "optimizer": ["sgd", "adam"]}
    assert len(expand(space)) == 8
    picked = expand(space, search="random", trials=3, seed=1)
    assert len(picked) == 3 and picked == expand(space, search="random", trials=3, seed=1)
    with pytest.raises(ConfigError, match="cannot search over"):
        expand({"arch": ["a"]})


def test_tune_chooses_on_validation(herlev_small: Path, tmp_path: Path) -> None:
    base: TrainConfig = tiny_config(epochs=1)
    result = tune(herlev_small, tmp_path / "tune", base, {"lr": [1e-3, 1e-4], "optimizer": ["adam"]})
    assert len(result.trials) == 2
    assert result.best.score == max(t.score for t in result.trials)
    assert (tmp_path / "tune" / "best" / "model.safetensors").exists()
    assert load_model(tmp_path / "tune" / "best").spec.train_config["lr"] == result.best.params["lr"]
    with (tmp_path / "tune" / "trials.csv").open() as fh:
        assert [r["lr"] for r in csv.DictReader(fh)] == ["0.001", "0.0001"]
    summary = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert summary["best_trial"] == result.best.index and summary["test_split_used"] is False
    loser = next(t for t in result.trials if t is not result.best)
    assert not (loser.model_dir / "model.safetensors").exists() and (loser.model_dir / "config.json").exists()
