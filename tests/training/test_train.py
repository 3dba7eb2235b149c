"""wsi_screen.training.train: preparing data, the training loop, the model folder it writes, transfer learning."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.classifier_data import make_subset, read_rows, tiny_config, write_rows
from wsi_screen.errors import ConfigError, DatasetError, ModelError
from wsi_screen.models import ModelSpec, load_model
from wsi_screen.training.data import (
    load_images,
    open_patch_folder,
)
from wsi_screen.training.inputs import resolve_positive
from wsi_screen.training.train import TrainConfig, prepare_data, train


# --- the positive class ------------------------------------------------------------------------------------
def test_positive_class_resolution() -> None:
    assert resolve_positive(["normal", "tumour"], None) == "tumour"
    assert resolve_positive(["abnormal", "normal"], None) == "abnormal"
    assert resolve_positive(["colon_aca", "colon_n"], None) == "colon_aca"
    assert resolve_positive(["a", "b", "c"], None) is None
    assert resolve_positive(["a", "b", "c"], "c") == "c"
    with pytest.raises(ConfigError, match="set `positive`"):
        resolve_positive(["cats", "dogs"], None)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_positive(["cats", "dogs"], "birds")


# --- training --------------------------------------------------------------------------------------------
def test_the_recorded_mpp_is_the_patches_scale_at_the_input_size(patches_dir: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """96 px PCam patches at 0.972 um/px resized to 32 px are 2.916 um/px to the model: config.json records that
    (it recorded 0.972, and infer tiled 32 px at 0.972 um/px, a third of the field the model was trained on)."""
    dataset = make_subset(patches_dir / "pcam", tmp_path / "pcam", {"train": 8, "valid": 4})
    caplog.set_level("INFO", logger="wsi_screen")
    result = train(dataset, tmp_path / "m", tiny_config(label_column="label", mpp=0.972, epochs=1))
    spec = ModelSpec.read(tmp_path / "m")
    assert (spec.input_size, result.spec.mpp) == (32, spec.mpp) and spec.mpp == pytest.approx(0.972 * 96 / 32)
    said = [r.getMessage() for r in caplog.records if "recording the model's mpp" in r.getMessage()]
    assert said == ["images of 96 px at 0.972 um/px resized to 32 px: recording the model's mpp as 2.916 um/px "
                    "(infer tiles slides at it)"]
    # at the images' own size nothing changes
    data = prepare_data(dataset, tiny_config(arch="resnet10t", label_column="label", mpp=0.972))
    assert (data.size, data.mpp) == (96, 0.972)


def test_short_training_run_writes_a_complete_model(herlev_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = train(herlev_small, out, tiny_config(mpp=0.25, stain_method="macenko", stain_target="target.png"))
    for name in ("model.safetensors", "config.json", "history.csv", "split.csv", "valid/metrics.json",
                 "valid/roc.png", "valid/confusion.png", "valid/predictions.csv"):
        assert (out / name).is_file(), name
    spec = ModelSpec.read(out)
    assert spec == result.spec
    assert spec.arch == "screen_cnn32" and spec.classes == ["abnormal", "normal"]
    # the patches' 0.25 um/px at the scale the model saw them: the most common size resized to 32 px (Herlev's
    # cells come in many sizes; it was 0.25, their scale before resizing)
    (w, _h), _n = max(((tuple(int(v) for v in k.split("x")), n) for k, n in spec.data["image_sizes"].items()),
                      key=lambda item: item[1])
    assert spec.positive_class == "abnormal" and spec.input_size == 32
    assert spec.mpp == pytest.approx(0.25 * w / 32) and w > 32
    assert spec.stain_method == "macenko" and spec.stain_target == "target.png"
    assert spec.threshold is not None and 0 <= spec.threshold <= 1
    assert spec.threshold_rule == "sensitivity:0.95" and spec.metrics["sensitivity"] >= 0.95
    assert spec.data_fingerprint and spec.data_fingerprint.startswith("sha256:")
    assert spec.train_config["seed"] == 0 and spec.train_config["lr"] == 1e-3
    assert spec.train_config["flips"] is True and spec.train_config["hed_jitter"] == 0.05
    assert spec.train_config["head"] is None and spec.train_config["embedding_cache"] is None  # no head on an encoder
    assert spec.data["label_column"] == "binary_label" and spec.data["split_source"] == "carved"
    with (out / "split.csv").open() as fh:
        split_rows = list(csv.DictReader(fh))
    assert {r["split"] for r in split_rows} == {"train", "valid"} and len(split_rows) == 48
    assert not any(r["path"].startswith("test/") for r in split_rows)
    with (out / "history.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 2
    # the saved model reproduces the validation predictions it was chosen on (validation runs in float32)
    model = load_model(out, precision="fp32")
    folder = open_patch_folder(herlev_small, label_column="binary_label")
    valid_paths = [r["path"] for r in split_rows if r["split"] == "valid"]
    rows = [folder.paths.index(p) for p in valid_paths]
    probs = model.predict(load_images(folder, rows, 32).images)
    with (out / "valid" / "predictions.csv").open() as fh:
        expected = np.array([[float(r["p_abnormal"]), float(r["p_normal"])] for r in csv.DictReader(fh)])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="already holds a model"):
        train(herlev_small, out, tiny_config())


def test_training_is_deterministic_under_the_seed(herlev_small: Path, tmp_path: Path) -> None:
    config = tiny_config(epochs=1)
    train(herlev_small, tmp_path / "a", config)
    train(herlev_small, tmp_path / "b", config)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(str(train(herlev_small, tmp_path / "c", tiny_config(epochs=1, seed=1)).model_dir
                      / "model.safetensors"))
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])


def test_training_errors(herlev_small: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="takes 32x32"):
        tiny_config(size=64)
    with pytest.raises(ConfigError, match="optimizer"):
        tiny_config(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="stain method"):
        tiny_config(stain_target="x.png")
    with pytest.raises(ModelError, match="unknown architecture"):
        prepare_data(herlev_small, tiny_config(arch="resnet_999"))
    only_test = tmp_path / "only_test"
    shutil.copytree(herlev_small, only_test)
    write_rows(only_test, [r for r in read_rows(only_test) if r["split"] == "test"])
    with pytest.raises(DatasetError, match="split 'train' is empty"):
        prepare_data(only_test, tiny_config())


def test_an_implausible_mpp_is_refused(herlev_small: Path, tmp_path: Path) -> None:
    """`mpp` takes infer's plausible range of slide resolutions (PLAUSIBLE_MPP, 0.05-100 um/px), in one line."""
    from tests.conftest import run_cli

    for mpp in (0.00001, 5000.0, 0.0, float("nan")):
        with pytest.raises(ConfigError, match=r"`mpp` .* is outside the plausible range 0.05-100 um/px"):
            tiny_config(mpp=mpp)
    assert tiny_config(mpp=0.05).mpp == 0.05 and tiny_config(mpp=100).mpp == 100
    for given in ("0.00001", "5000", "0"):
        res = run_cli("train", herlev_small, "--arch", "screen_cnn32", "--mpp", given, "-o", tmp_path / "m")
        assert res.code == 1 and len(res.err_lines) == 1, res
        assert res.err_lines[0] == (f"wsi-screen: error: --mpp {float(given):g} (the training patches' um/px) is "
                                    "outside the plausible range 0.05-100 um/px")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_transfer_learning_from_a_local_model(patches_dir: Path, herlev_small: Path, tmp_path: Path) -> None:
    """Pretrain a timm model on the 7 Herlev classes, then fine-tune it on binary labels, frozen first."""
    seven = make_subset(patches_dir / "herlev", tmp_path / "herlev7", {"train": 6})
    source = train(seven, tmp_path / "seven", tiny_config(arch="resnet10t", size=32, label_column="label", epochs=1))
    assert source.spec.positive_class is None and source.spec.threshold is None and source.spec.num_classes == 7
    result = train(herlev_small, tmp_path / "tl", tiny_config(arch="resnet10t", pretrained=str(tmp_path / "seven"),
                                                             freeze_backbone=True, frozen_epochs=1, epochs=2))
    assert result.spec.input_size == 32  # taken from the pretrained model
    assert result.pretrained is not None and sorted(result.pretrained["head_reset"]) == ["fc.bias", "fc.weight"]
    pre, post = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "seven", tmp_path / "tl"))
    assert not torch.equal(pre["conv1.0.weight"], post["conv1.0.weight"])  # fine-tuned after the frozen epoch
    assert json.loads((tmp_path / "tl" / "config.json").read_text())["train_config"]["pretrained_report"]["loaded"]




def test_transfer_learning_from_a_cross_validated_model_with_other_class_names(herlev_small: Path,
                                                                               tmp_path: Path) -> None:
    """A model folder that cross-validation made (an ensemble) starts a training from its member 0; its classes
    [normal, tumour] are not Herlev's [abnormal, normal], so the head starts fresh although two fit two."""
    from wsi_screen.models import create_model, save_model
    from wsi_screen.models.ensemble import Ensemble

    torch.manual_seed(5)
    members = [create_model("screen_cnn32", num_classes=2) for _ in range(2)]
    save_model(tmp_path / "cv", Ensemble(members), ModelSpec(
        arch="screen_cnn32", classes=["normal", "tumour"], input_size=32, positive_class="tumour", threshold=0.5,
        ensemble=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    result = train(herlev_small, tmp_path / "tl", tiny_config(pretrained=str(tmp_path / "cv"), epochs=1))
    report = json.loads((tmp_path / "tl" / "config.json").read_text())["train_config"]["pretrained_report"]
    assert report["ensemble_member"] == 0 and report["loaded"] == 10
    assert sorted(report["head_reset"]) == ["head.fc.bias", "head.fc.weight"] and report == result.pretrained
    assert result.spec.mean == (0.5, 0.5, 0.5) and result.spec.ensemble == 1


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_mixed_precision_step(dtype: torch.dtype | None) -> None:
    """The training step of a GPU (autocast; float16 with a gradient scaler), run on the CPU where torch has both:
    it learns as float32 does. On a CPU the trainer itself uses none of it (``_Amp.for_device``)."""
    from wsi_screen.models.precision import dtype_name, training_dtype
    from wsi_screen.training.loop import _Amp

    assert _Amp.for_device(torch.device("cpu")) == _Amp(torch.device("cpu"))
    assert training_dtype(torch.device("cpu")) is None and dtype_name(dtype) in ("fp32", "bf16", "fp16")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    amp = _Amp(torch.device("cpu"), dtype, torch.amp.GradScaler("cpu") if dtype == torch.float16 else None)
    x = torch.rand(16, 3, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    losses = []
    for _ in range(30):
        with amp.autocast():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        amp.step(loss, optimizer)
        losses.append(float(loss.detach()))
    assert logits.dtype == (dtype or torch.float32)
    assert losses[-1] < losses[0] - 0.01 and abs(losses[-1] - 0.66964) < 0.001  # float32 ends at 0.66964
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_a_run_diverging_after_epoch_1_keeps_its_checkpoint(herlev_small: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Divergence after a good epoch stops the run in one error that says the checkpoint stays and how to go on."""
    from wsi_screen.errors import TrainingDivergedError
    from wsi_screen.training import loop

    def diverge_at_2(epoch: int, train_loss: float, probs: np.ndarray) -> None:
        loop_check(epoch, float("nan") if epoch == 2 else train_loss, probs)

    loop_check = loop.check_finite
    monkeypatch.setattr(loop, "check_finite", diverge_at_2)
    out = tmp_path / "m"
    with pytest.raises(TrainingDivergedError, match=r"^training diverged at epoch 2 \(train loss nan\); lower `lr` "
                       r"and set `restart` \(.* keeps the checkpoint after epoch 1"):
        train(herlev_small, out, tiny_config(epochs=3, folds=1, mpp=0.5))
    assert (out / "checkpoint").is_dir() and not (out / "config.json").exists()


@pytest.mark.parametrize(("optimizer", "lr", "weight_decay"), [("sgd", 0.01, 1e-4), ("adamw", 1e-3, 0.05),
                                                                ("adam", 1e-3, 0.0)])
def test_a_given_optimizer_brings_its_own_defaults_under_the_small_recipe(optimizer: str, lr: float,
                                                                          weight_decay: float) -> None:
    """`--optimizer sgd` under the small recipe kept the recipe's Adam lr 1e-3 and weight decay 0, against --help
    ("0.01 for sgd", "1e-4 sgd"); a given lr still wins."""
    from wsi_screen.training import recipes

    config = recipes.apply(TrainConfig(arch="screen_cnn32", recipe="auto", optimizer=optimizer,
                                       overrides=("optimizer",)), 100)
    assert (config.recipe, config.optimizer, config.resolved_lr, config.resolved_weight_decay) == \
        ("small", optimizer, lr, weight_decay)
    assert config.schedule == "constant" and config.epochs == 60  # the rest of the recipe still applies
    given = recipes.apply(TrainConfig(arch="screen_cnn32", recipe="small", optimizer="sgd", lr=0.05,
                                      overrides=("optimizer", "lr")), 100)
    assert (given.resolved_lr, given.resolved_weight_decay) == (0.05, 1e-4)
    plain = recipes.apply(TrainConfig(arch="screen_cnn32", recipe="small"), 100)
    assert (plain.optimizer, plain.resolved_lr, plain.resolved_weight_decay) == ("adam", 1e-3, 0.0)


def test_a_one_class_validation_split_is_reported_truthfully(herlev_small: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """With one class in validation, train logged `best epoch 1 (auc -0.5319)` (minus the loss, labelled AUC),
    `auc ,` in the epoch line, and roc.png's empty legend leaked matplotlib's 'No artists with labels' warning."""
    import warnings

    dataset = tmp_path / "data"
    shutil.copytree(herlev_small, dataset)
    rows = read_rows(dataset)
    for row in rows:  # the test split's normal images validate; its abnormal ones stay out
        if row["split"] == "test":
            row["split"] = "valid" if row["binary_label"] == "normal" else "test"
    write_rows(dataset, rows)
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="wsi_screen"):
        warnings.simplefilter("error")
        result = train(dataset, tmp_path / "m", tiny_config(epochs=1, folds=1, mpp=0.5))
    loss = float(result.history[0]["valid_loss"])
    assert f"best epoch 1 (valid loss {loss:.4f}; auc undefined on this validation split)" in caplog.text
    assert "auc n/a," in caplog.text and "auc ," not in caplog.text
    assert "bal. acc (argmax) " in caplog.text  # the epoch line's decisions, unlike the summary's (threshold)
    valid = json.loads((tmp_path / "m" / "valid" / "metrics.json").read_text())
    assert valid["recall"] is None and valid["sensitivity"] is None and valid["auc"] is None
