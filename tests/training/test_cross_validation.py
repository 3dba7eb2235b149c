"""Small-data training: recipes chosen from the data, K-fold cross-validation and the fold ensemble."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.classifier_data import make_subset
from wsi_screen.errors import DatasetError
from wsi_screen.models import create_model, load_model
from wsi_screen.models.ensemble import Ensemble
from wsi_screen.training import recipes
from wsi_screen.training.cross_validation import assign_folds, auto_folds
from wsi_screen.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def herlev_cv(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Herlev binary: 15 train images per class (and 5 test)."""
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_cv"), {"train": 15, "test": 5},
                       label_column="binary_label")


def test_recipe_is_chosen_from_the_data_and_given_options_win() -> None:
    assert recipes.choose("auto", 716) == "small" and recipes.choose("auto", 20000) == "default"
    config = TrainConfig(arch="screen_cnn32", recipe="auto", overrides=("lr",), lr=3e-4)
    small = recipes.apply(config, 716)
    assert small.recipe == "small" and small.optimizer == "adam" and small.schedule == "constant"
    assert small.label_smoothing == 0.0 and not small.class_weights and small.hed_jitter == 0.0
    assert small.lr == 3e-4  # given on the command line: kept
    big = recipes.apply(config, 20000)
    assert big.recipe == "default" and big.optimizer == "adamw" and big.label_smoothing == 0.1


def test_folds_are_stratified_and_grouped() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    groups = rng.integers(0, 60, 300)
    fold = assign_folds(labels, groups, 5, seed=0)
    assert set(fold.tolist()) == {0, 1, 2, 3, 4}
    for g in np.unique(groups):
        assert len(set(fold[groups == g].tolist())) == 1  # a group never spans two folds
    plain = assign_folds(labels, None, 5, seed=0)
    share = [labels[plain == f].mean() for f in range(5)]
    assert max(share) - min(share) < 0.05  # stratified
    assert auto_folds(716, labels) == 5 and auto_folds(20000, labels) == 1 and auto_folds(40, labels[:40]) == 1
    with pytest.raises(DatasetError, match="at least 5 images of every class"):
        assign_folds(np.array([0] * 10 + [1] * 3), None, 5, seed=0)


def test_ensemble_averages_member_probabilities() -> None:
    torch.manual_seed(0)
    members = [create_model("screen_cnn32", num_classes=2).eval() for _ in range(3)]
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        torch.testing.assert_close(Ensemble(members)(x).softmax(1), expected)


def test_cross_validated_training_delivers_an_ensemble(herlev_cv: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    config = TrainConfig(arch="screen_cnn32", label_column="binary_label", epochs=2, batch_size=8, folds=3,
                         recipe="auto", overrides=("epochs",), mpp=0.5)  # as the CLI passes a given --epochs
    result = train(herlev_cv, out, config)
    spec = json.loads((out / "config.json").read_text())
    assert spec["ensemble"] == 3 and spec["train_config"]["recipe"] == "small"
    assert spec["train_config"]["optimizer"] == "adam" and spec["train_config"]["threads"] >= 1
    cv = spec["metrics"]["cross_validation"]
    assert cv["folds"] == 3 and [r["fold"] for r in cv["per_fold"]] == [1, 2, 3]
    assert sum(r["n"] for r in cv["per_fold"]) == 30 and spec["data"]["n_train"] == 30
    with (out / "split.csv").open() as fh:
        folds = [row["fold"] for row in csv.DictReader(fh)]
    assert sorted(set(folds)) == ["1", "2", "3"] and len(folds) == 30
    with (out / "history.csv").open() as fh:
        history = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in history] == [1, 2] and result.best_epoch in (1, 2)
    assert (out / "valid" / "fold_metrics.csv").exists() and (out / "domain.json").exists()
    model = load_model(out)  # one folder, loaded like any other
    assert isinstance(model.module, Ensemble) and len(model.module.members) == 3
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    probs, distance = model.predict_with_domain(images)
    assert probs.shape == (5, 2) and np.allclose(probs.sum(1), 1, atol=1e-5) and distance is not None


def test_cross_validation_reports_early_stopping_and_the_pretrained_weights(herlev_cv: Path, tmp_path: Path) -> None:
    """Patience ends a cross-validated run early and says so; weights from ``pretrained`` are reported."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(create_model("screen_cnn32", num_classes=2).state_dict(), str(tmp_path / "start.safetensors"))
    # a learning rate too small to change a probability: the score never improves after epoch 1
    config = TrainConfig(arch="screen_cnn32", label_column="binary_label", epochs=4, batch_size=8, folds=3,
                         lr=1e-12, patience=1, pretrained=str(tmp_path / "start.safetensors"), mpp=0.5)
    result = train(herlev_cv, tmp_path / "model", config)
    assert result.stopped_early and [int(r["epoch"]) for r in result.history] == [1, 2] and result.best_epoch == 1
    assert result.pretrained is not None and result.pretrained["loaded"] > 0
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["train_config"]
    assert saved["stopped_early"] is True and saved["pretrained_report"] == result.pretrained


def test_multi_class_cross_validation_names_its_fold_figures(patches_dir: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The log printed `out-of-fold balanced_accuracy 0.14; folds 0.52 +- 0.02` where the folds figure was the fold
    AUC mean (empty in history.csv without a positive class): now the fold figure is the monitored one, named."""
    import logging
    import re

    data = make_subset(patches_dir / "herlev", tmp_path / "herlev7", {"train": 4}, label_column="label")
    config = TrainConfig(arch="screen_cnn32", label_column="label", epochs=1, batch_size=8, folds=2, mpp=0.5,
                         recipe="small", overrides=("epochs",), workers=1)
    with caplog.at_level(logging.INFO, logger="wsi_screen"):
        train(data, tmp_path / "model", config)
    epoch_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1"))
    assert re.match(r"epoch 1/1: out-of-fold balanced_accuracy \d\.\d{4}, fold balanced_accuracy \d\.\d{4} \+- "
                    r"\d\.\d{4} \(", epoch_line), epoch_line
    best_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("best epoch"))
    assert re.match(r"best epoch 1 \(out-of-fold balanced_accuracy \d\.\d{4}, fold balanced_accuracy \d\.\d{4} \+- "
                    r"\d\.\d{4}\)", best_line), best_line
    with (tmp_path / "model" / "history.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert row["fold_auc_mean"] == "" and 0.0 <= float(row["fold_monitor_mean"]) <= 1.0
    assert f"{float(row['fold_monitor_mean']):.4f}" in epoch_line


def test_cross_validation_words(herlev_cv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Under cross-validation the progress bars said `epoch 1/1` once per fold without naming it, the domain threshold
    'flags 0.8 % of valid' (domain.json: calibrated on 'valid') when it was set on the training images, and the card
    gave n_train 30 and n_valid 30 without a word on why both count the whole pool."""
    import logging

    from wsi_screen import progress

    descs: list[str] = []
    real_bar = progress.bar

    def bar(*args: object, **kwargs: object) -> object:
        descs.append(str(kwargs.get("desc", "")))
        return real_bar(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(progress, "bar", bar)
    config = TrainConfig(arch="screen_cnn32", label_column="binary_label", epochs=1, batch_size=8, folds=3, mpp=0.5,
                         recipe="small", overrides=("epochs",), workers=1)
    with caplog.at_level(logging.INFO, logger="wsi_screen"):
        train(herlev_cv, tmp_path / "model", config)
    assert [d for d in descs if "epoch" in d] == ["fold 1/3 epoch 1/1", "fold 2/3 epoch 1/1", "fold 3/3 epoch 1/1"]
    # the log said "up to 1 epochs", and "(in place of the split above)" after the carved split's line
    lines = [r.getMessage() for r in caplog.records]
    carved = next(i for i, line in enumerate(lines) if "valid carved from train" in line)
    folds = lines.index("recipe small; 3-fold cross-validation: the valid split carved above is not used; the folds "
                        "are cut from all 30 train images, and each image is validated once, by the model of the "
                        "fold that leaves it out")
    assert carved < folds, lines
    assert any(line.endswith("cross-validation on 30 images of 32 px; up to 1 epoch") for line in lines), lines
    domain_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("domain distance"))
    assert domain_line.endswith("of the train images, set on them (no unseen split)"), domain_line
    domain = json.loads((tmp_path / "model" / "domain.json").read_text())
    assert domain["calibrated_on"]["split"] == "train" and domain["threshold_rule"] == "flags 1% of the train split"
    card = json.loads((tmp_path / "model" / "card.json").read_text())["training_data"]
    assert card["n_train"] == card["n_valid"] == 30
    assert card["cross_validation"] == ("3-fold: n_train and n_valid both count the 30 pooled images; each trained 2 "
                                        "of the 3 fold models and was validated, out of fold, by the other")


def test_cross_validation_says_what_it_does_with_the_datasets_own_split() -> None:
    """A dataset's own valid images join the folds (the next log line says they train the model too)."""
    from types import SimpleNamespace

    from wsi_screen.training.loop import n_epochs
    from wsi_screen.training.train import _folds_line

    data = SimpleNamespace(split=SimpleNamespace(source="dataset"), train=range(85), valid=range(15))
    assert _folds_line(5, data) == (  # type: ignore[arg-type]
        "5-fold cross-validation: the dataset's train/valid split above is not used; the folds are cut from its 85 "
        "train and 15 valid images together, and each image is validated once, by the model of the fold that leaves "
        "it out")
    assert (n_epochs(1), n_epochs(0), n_epochs(20)) == ("1 epoch", "0 epochs", "20 epochs")
