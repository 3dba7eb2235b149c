"""Evaluating a model on a labelled split (wsi_screen.training.evaluate): the files, resizing, class checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.classifier_data import make_subset
from tests.test_metrics import binary_case
from wsi_screen.errors import ConfigError, DatasetError, ModelMismatchError
from wsi_screen.metrics import compute_metrics
from wsi_screen.models import ModelSpec, PatchClassifier, create_model
from wsi_screen.training.data import open_patch_folder
from wsi_screen.training.evaluate import evaluate_model, write_evaluation


def test_write_evaluation_files(tmp_path: Path) -> None:
    y, probs = binary_case()
    m = compute_metrics(y, probs, ["normal", "tumour"], positive_index=1, threshold=0.5)
    write_evaluation(tmp_path, m, [f"img{i}.png" for i in range(len(y))], y, probs)
    for name in ("metrics.json", "predictions.csv", "roc.png", "confusion.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "metrics.json").read_text())["auc"] == pytest.approx(m["auc"])
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,label,predicted,p_normal,p_tumour" and len(lines) == len(y) + 1


def test_evaluation_for_the_models_other_class_names_it_and_keeps_the_models_decisions(tmp_path: Path) -> None:
    from wsi_screen.commands.evaluate import format_summary

    y, probs = binary_case()
    m = compute_metrics(y, probs, ["normal", "tumour"], positive_index=1, threshold=0.454, metric_positive=0)
    write_evaluation(tmp_path, m, [f"img{i}.png" for i in range(len(y))], y, probs)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert (written["positive_class"], written["decision_class"], written["threshold"]) == ("normal", "tumour", 0.454)
    rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    predicted = [row.split(",")[2] for row in rows]
    assert predicted == ["tumour" if p >= 0.454 else "normal" for p in probs[:, 1]]  # the model's decisions
    head = format_summary(m, "eval").splitlines()[0]
    assert head == f"{len(y)} images; positive class normal; called where p(tumour) < 0.4540 (the model's operating " \
                   "point)"
    own = compute_metrics(y, probs, ["normal", "tumour"], positive_index=1, threshold=0.454)
    assert format_summary(own, "eval").splitlines()[0] == f"{len(y)} images; positive class tumour; threshold 0.4540"


def test_evaluation_prints_and_writes_the_intervals(herlev_small: Path, tmp_path: Path) -> None:
    from wsi_screen.commands.evaluate import format_summary

    folder = open_patch_folder(herlev_small, label_column="binary_label")
    m = evaluate_model(_random_model(["abnormal", "normal"], "abnormal"), folder, "test", tmp_path / "eval")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["sensitivity_ci95"] == m["sensitivity_ci95"] and len(m["sensitivity_ci95"]) == 2
    assert written["auc_ci95"] == m["auc_ci95"] and m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
    lines = format_summary(m, "eval").splitlines()
    auc = next(line for line in lines if line.split()[0] == "auc")
    assert auc == f"  auc                {m['auc']:.4f}  (95% CI {m['auc_ci95'][0]:.4f}-{m['auc_ci95'][1]:.4f})"
    low, high = m["specificity_ci95"]
    assert f"  specificity        {m['specificity']:.4f}  (95% CI {low:.4f}-{high:.4f})" in lines


@pytest.fixture(scope="module")
def herlev_small(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_eval"), {"train": 2, "test": 3})


def _random_model(classes: list[str], positive: str | None) -> PatchClassifier:
    spec = ModelSpec(arch="screen_cnn32", classes=classes, input_size=32, positive_class=positive,
                     threshold=0.5 if positive else None)
    return PatchClassifier(create_model("screen_cnn32", num_classes=len(classes)), spec)


def test_evaluate_model_resizes_and_writes(herlev_small: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    folder = open_patch_folder(herlev_small, label_column="binary_label")
    model = _random_model(["abnormal", "normal"], "abnormal")
    with caplog.at_level("WARNING", logger="wsi_screen"):
        m = evaluate_model(model, folder, "test", tmp_path / "eval", positive="normal")
    assert "resized to the model input" in caplog.text
    assert m["n"] == 21 and m["source"]["image_sizes"] == {"200x200": 21}  # 3 of each of 7 classes
    assert m["positive"]["class"] == "normal"
    assert (tmp_path / "eval" / "confusion.png").exists()


def test_evaluate_model_refuses_another_class_set(herlev_small: Path, tmp_path: Path) -> None:
    folder = open_patch_folder(herlev_small, label_column="label")
    with pytest.raises(ModelMismatchError, match="`label_column`"):
        evaluate_model(_random_model(["abnormal", "normal"], "abnormal"), folder, "test", tmp_path)
    with pytest.raises(DatasetError, match="split 'valid' is empty"):
        evaluate_model(_random_model(["abnormal", "normal"], "abnormal"), folder, "valid", tmp_path)
    binary = open_patch_folder(herlev_small, label_column="binary_label")
    with pytest.raises(ConfigError, match="`positive`"):
        evaluate_model(_random_model(["abnormal", "normal"], "abnormal"), binary, "test", tmp_path,
                       positive="tumour")


def test_evaluation_refuses_a_folder_with_files_unless_overwrite(herlev_small: Path, tmp_path: Path) -> None:
    """`evaluate -o MODEL/valid` silently replaced train's validation report and left its fold_metrics.csv."""
    folder = open_patch_folder(herlev_small, label_column="binary_label")
    out = tmp_path / "valid"
    out.mkdir()
    (out / "fold_metrics.csv").write_text("fold,n\n1,5\n")
    (out / "metrics.json").write_text("{}\n")
    (out / "notes.txt").write_text("mine\n")
    model = _random_model(["abnormal", "normal"], "abnormal")
    with pytest.raises(ConfigError, match=r"already holds files; set `overwrite` or choose another output folder"):
        evaluate_model(model, folder, "test", out)
    assert (out / "metrics.json").read_text() == "{}\n"  # untouched
    m = evaluate_model(model, folder, "test", out, overwrite=True)
    assert json.loads((out / "metrics.json").read_text())["n"] == m["n"]
    assert not (out / "fold_metrics.csv").exists() and (out / "notes.txt").read_text() == "mine\n"
    evaluate_model(model, folder, "test", tmp_path / "empty_ok")  # a new (or empty) folder needs nothing


def test_images_that_trained_the_model_are_counted_as_files_or_left_unknown(herlev_small: Path,
                                                                            tmp_path: Path) -> None:
    """`evaluate --split train` on a labels.csv over the very files an ImageFolder tree trained the model on
    recorded `images_that_trained_the_model: 0` (the check was by folder name); it now compares the files, and
    records null (not a false 0) where it cannot tell."""
    from tests.classifier_data import read_rows, write_rows
    from wsi_screen.training.evaluate import trained_on

    rows = [r for r in read_rows(herlev_small) if r["split"] == "train"]
    tree = tmp_path / "tree"  # the training dataset: an ImageFolder tree of links to the files
    for r in rows:
        (tree / "train" / r["binary_label"]).mkdir(parents=True, exist_ok=True)
        (tree / "train" / r["binary_label"] / Path(r["path"]).name).symlink_to((herlev_small / r["path"]).resolve())
    trained = open_patch_folder(tree)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with (model_dir / "split.csv").open("w") as fh:
        pairs = zip(trained.paths[:10], trained.labels[:10], strict=True)
        fh.write("path,label,split\n" + "".join(f"{p},{lab},train\n" for p, lab in pairs))
    model = _random_model(["abnormal", "normal"], "abnormal")
    model.spec.data["dataset"] = str(tree.resolve())
    model.model_dir = model_dir
    other = tmp_path / "csv"  # another folder name and layout: a labels.csv over the same files
    other.mkdir()
    (other / "images").symlink_to(herlev_small.resolve())
    write_rows(other, [{"path": f"images/{r['path']}", "label": r["binary_label"], "split": "train"} for r in rows])
    folder = open_patch_folder(other)
    assert trained_on(model, folder, folder.indices("train")) == 10
    shutil.rmtree(tree)  # the training dataset gone: another folder name cannot be compared
    assert trained_on(model, folder, folder.indices("train")) is None
    model.model_dir = None
    assert trained_on(model, folder, folder.indices("train")) is None


def test_the_models_validation_images_are_counted_as_choosing_it(herlev_small: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """`evaluate` on the images that chose a model's epoch and threshold (its validation split) said nothing, and
    its sensitivity there is the threshold rule's by construction: it now warns and records how many they are."""
    from tests.classifier_data import tiny_config
    from wsi_screen.models import load_model
    from wsi_screen.training.train import train

    train(herlev_small, tmp_path / "m", tiny_config(epochs=1, folds=1))  # valid carved from train: 3 of 14
    roles = [line.split(",")[2] for line in (tmp_path / "m" / "split.csv").read_text().splitlines()[1:]]
    assert (roles.count("train"), roles.count("valid")) == (11, 3)
    model = load_model(tmp_path / "m", precision="fp32")
    folder = open_patch_folder(herlev_small, label_column="binary_label")
    with caplog.at_level("WARNING", logger="wsi_screen"):
        m = evaluate_model(model, folder, "train", tmp_path / "train")
    assert (m["source"]["images_that_trained_the_model"], m["source"]["images_that_chose_the_model"]) == (11, 3)
    assert "3 of the 14 images evaluated are this model's validation images" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_screen"):
        m = evaluate_model(model, folder, "test", tmp_path / "test")
    assert (m["source"]["images_that_trained_the_model"], m["source"]["images_that_chose_the_model"]) == (0, 0)
    assert "validation images" not in caplog.text
