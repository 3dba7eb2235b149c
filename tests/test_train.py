"""Datasets, honest splits, augmentation, training, transfer learning and search, on small real subsets."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tests.classifier_data import make_subset, read_rows, tiny_config, write_rows
from wsi_screen.errors import ConfigError, DatasetError, ModelError
from wsi_screen.models import ModelSpec, load_model
from wsi_screen.training.data import (
    PatchFolder,
    carve_validation,
    group_leaks,
    load_images,
    make_split,
    open_patch_folder,
)
from wsi_screen.training.train import BatchAugment, TrainConfig, prepare_data, resolve_positive, train
from wsi_screen.training.tune import expand, tune


@pytest.fixture(scope="module")
def herlev_small(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Herlev binary: 24 train + 6 test images per binary class."""
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_small"),
                       {"train": 24, "test": 6}, label_column="binary_label")


# --- reading datasets ------------------------------------------------------------------------------------
def test_real_datasets_open(patches_dir: Path) -> None:
    herlev = open_patch_folder(patches_dir / "herlev", label_column="binary_label")
    assert len(herlev) == 917 and herlev.classes == ["abnormal", "normal"]
    assert Counter(herlev.splits or ()) == {"train": 716, "test": 201}
    crc = open_patch_folder(patches_dir / "crc-7class-sample")
    assert crc.splits is None and len(crc.classes) == 7  # an all-empty split column means unsplit
    nct = open_patch_folder(patches_dir / "nct-crc-9class-sample")
    assert len(nct) == 9 and len(nct.indices("test")) == 9


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rows: [{k: v for k, v in r.items() if k != "binary_label"} for r in rows], "no column 'binary_label'"),
    (lambda rows: [{**r, "binary_label": ""} for r in rows], "empty 'binary_label'"),
    (lambda rows: [{**r, "split": "holdout"} for r in rows], "unknown 'split' values 'holdout'"),
    (lambda rows: [{**r, "path": "missing/" + r["path"]} for r in rows], "do not exist"),
    (lambda rows: [{**r, "split": ""} if i == 0 else r for i, r in enumerate(rows)], "no 'split' value"),
])
def test_malformed_labels_csv(herlev_small: Path, tmp_path: Path, edit: object, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(herlev_small, broken)
    rows = edit(read_rows(broken))  # type: ignore[operator]
    write_rows(broken, rows)
    with pytest.raises(DatasetError, match=message):
        open_patch_folder(broken, label_column="binary_label")


def test_missing_group_and_split_columns(herlev_small: Path) -> None:
    with pytest.raises(DatasetError, match="no column 'patient' for --group-column"):
        open_patch_folder(herlev_small, group_column="patient")
    with pytest.raises(DatasetError, match="for --split-column"):
        open_patch_folder(herlev_small, split_column="fold", require_split_column=True)
    assert open_patch_folder(herlev_small, split_column="fold").splits is None


def test_unreadable_image(herlev_small: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(herlev_small, broken)
    victim = broken / read_rows(broken)[0]["path"]
    victim.write_bytes(b"\xff\xd8\xff truncated")
    folder = open_patch_folder(broken, label_column="binary_label")
    with pytest.raises(DatasetError, match=f"{victim.name}: unreadable image"):
        load_images(folder, range(len(folder)), 32)


def test_image_folder_layouts(herlev_small: Path, tmp_path: Path) -> None:
    rows = read_rows(herlev_small)
    for row in rows:  # <split>/<class>/<image>, as herlev is laid out
        target = tmp_path / "by_split" / row["split"] / row["binary_label"] / Path(row["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(herlev_small / row["path"], target)
    folder = open_patch_folder(tmp_path / "by_split")
    assert folder.layout == "split/class folders" and folder.classes == ["abnormal", "normal"]
    assert Counter(folder.splits or ()) == {"train": 48, "test": 12}
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "by_split" / "train", flat)
    folder = open_patch_folder(flat)
    assert folder.layout == "class folders" and folder.splits is None and len(folder) == 48
    with pytest.raises(DatasetError, match="need one"):
        open_patch_folder(flat, label_column="binary_label")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"neither labels\.csv nor class folders"):
        open_patch_folder(tmp_path / "empty")


# --- honest splits ---------------------------------------------------------------------------------------
def test_lc25000_group_split_never_leaks(patches_dir: Path) -> None:
    folder = open_patch_folder(patches_dir / "lc25000-colon", group_column="group_id", check_files=False)
    assert not group_leaks(folder)  # the dataset's own train/test split is grouped
    split = make_split(folder, seed=0)
    assert split.source == "carved"
    groups = np.asarray(folder.groups)
    assert not set(groups[split.train]) & set(groups[split.valid])
    assert not set(split.valid) & set(folder.indices("test"))  # test is never touched
    assert 0.1 < len(split.valid) / (len(split.train) + len(split.valid)) < 0.2
    assert set(np.asarray(folder.labels)[split.valid]) == {"colon_aca", "colon_n"}
    again = make_split(folder, seed=0)
    np.testing.assert_array_equal(split.valid, again.valid)
    assert not np.array_equal(split.valid, make_split(folder, seed=1).valid)
    # without the group column the same rows would leak copies of one photo into validation
    ungrouped = make_split(open_patch_folder(patches_dir / "lc25000-colon", check_files=False), seed=0)
    assert set(groups[ungrouped.train]) & set(groups[ungrouped.valid])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30)), min_size=30, max_size=120), st.integers(0, 99))
def test_grouped_carving_never_leaks(rows: list[tuple[int, int]], seed: int) -> None:
    labels = [f"c{label}" for label, _ in rows]
    groups = [f"g{group}" for _, group in rows]
    folder = PatchFolder(root=Path(), paths=tuple(f"{i}.png" for i in range(len(rows))), labels=tuple(labels),
                         groups=tuple(groups), group_column="g")
    if len(set(labels)) < 2 or len(set(groups)) < 7:
        return
    train, valid = carve_validation(folder, np.arange(len(rows)), valid_fraction=0.15, seed=seed)
    assert not {groups[i] for i in train} & {groups[i] for i in valid}
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(len(rows)))


def test_stratified_carving_and_dataset_valid(patches_dir: Path) -> None:
    herlev = open_patch_folder(patches_dir / "herlev", label_column="binary_label", check_files=False)
    split = make_split(herlev, seed=0)
    labels = np.asarray(herlev.labels)
    share = lambda rows: (labels[rows] == "abnormal").mean()  # noqa: E731
    assert abs(share(split.train) - share(split.valid)) < 0.02
    assert not set(split.train) & set(herlev.indices("test"))
    pcam = open_patch_folder(patches_dir / "pcam", check_files=False)
    own = make_split(pcam)
    assert own.source == "dataset" and len(own.valid) == 3000  # PCam valid: 1,500 + 1,500
    carved = make_split(pcam, carve_valid=True)
    assert carved.source == "carved" and not set(carved.valid) & set(pcam.indices("valid"))


def test_positive_class_resolution() -> None:
    assert resolve_positive(["normal", "tumour"], None) == "tumour"
    assert resolve_positive(["abnormal", "normal"], None) == "abnormal"
    assert resolve_positive(["colon_aca", "colon_n"], None) == "colon_aca"
    assert resolve_positive(["a", "b", "c"], None) is None
    assert resolve_positive(["a", "b", "c"], "c") == "c"
    with pytest.raises(ConfigError, match="pass --positive"):
        resolve_positive(["cats", "dogs"], None)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_positive(["cats", "dogs"], "birds")


# --- augmentation ----------------------------------------------------------------------------------------
def test_augmentation_is_seeded_and_keeps_geometry() -> None:
    batch = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    first = BatchAugment(generator=torch.Generator().manual_seed(3))(batch)
    second = BatchAugment(generator=torch.Generator().manual_seed(3))(batch)
    assert first.shape == (8, 3, 16, 16) and torch.equal(first, second)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    geometric = BatchAugment(hed=0, color=0, generator=torch.Generator().manual_seed(0))(batch)
    for img, out in zip(batch, geometric, strict=True):  # a rotation/flip keeps every pixel
        source = img.permute(2, 0, 1).float() / 255
        assert torch.equal(source.flatten(1).sort(1).values, out.flatten(1).sort(1).values)
    white = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    assert torch.equal(BatchAugment(color=0, generator=torch.Generator().manual_seed(0))(white),
                       torch.ones(2, 3, 8, 8))  # HED jitter leaves background alone


# --- training --------------------------------------------------------------------------------------------
def test_short_training_run_writes_a_complete_model(herlev_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = train(herlev_small, out, tiny_config(mpp=0.25, stain_method="macenko", stain_target="target.png"))
    for name in ("model.safetensors", "config.json", "history.csv", "split.csv", "valid/metrics.json",
                 "valid/roc.png", "valid/confusion.png", "valid/predictions.csv"):
        assert (out / name).is_file(), name
    spec = ModelSpec.read(out)
    assert spec == result.spec
    assert spec.arch == "screen_cnn32" and spec.classes == ["abnormal", "normal"]
    assert spec.positive_class == "abnormal" and spec.input_size == 32 and spec.mpp == 0.25
    assert spec.stain_method == "macenko" and spec.stain_target == "target.png"
    assert spec.threshold is not None and 0 <= spec.threshold <= 1
    assert spec.threshold_rule == "sensitivity:0.95" and spec.metrics["sensitivity"] >= 0.95
    assert spec.data_fingerprint and spec.data_fingerprint.startswith("sha256:")
    assert spec.train_config["seed"] == 0 and spec.train_config["lr"] == 1e-3
    assert spec.data["label_column"] == "binary_label" and spec.data["split_source"] == "carved"
    with (out / "split.csv").open() as fh:
        split_rows = list(csv.DictReader(fh))
    assert {r["split"] for r in split_rows} == {"train", "valid"} and len(split_rows) == 48
    assert not any(r["path"].startswith("test/") for r in split_rows)
    with (out / "history.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 2
    # the saved model reproduces the validation predictions it was chosen on
    model = load_model(out)
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


def test_streaming_from_disk_matches_in_memory(herlev_small: Path, tmp_path: Path) -> None:
    memory = train(herlev_small, tmp_path / "memory", tiny_config(epochs=1, workers=0))
    stream = train(herlev_small, tmp_path / "stream", tiny_config(epochs=1, workers=0, cache_limit_mb=0.01))
    a = load_file(str(memory.model_dir / "model.safetensors"))
    b = load_file(str(stream.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- search ----------------------------------------------------------------------------------------------
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
