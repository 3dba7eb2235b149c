"""Metrics (checked against scikit-learn), operating points, evaluation files and their failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from tests.classifier_data import make_subset
from wsi_screen.errors import ConfigError, DatasetError, ModelMismatchError
from wsi_screen.metrics import ThresholdRule, choose_threshold, compute_metrics
from wsi_screen.models import ModelSpec, PatchClassifier, create_model
from wsi_screen.training.data import open_patch_folder
from wsi_screen.training.evaluate import evaluate_model, write_evaluation


def _binary_case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.35 * y + rng.random(200) * 0.65, 0, 1)
    return y, np.stack([1 - p1, p1], axis=1)


def test_binary_metrics_equal_scikit_learn() -> None:
    y, probs = _binary_case()
    t = 0.42
    m = compute_metrics(y, probs, ["normal", "tumour"], positive_index=1, threshold=t)
    pred = (probs[:, 1] >= t).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert (m["positive"]["tp"], m["positive"]["fn"]) == (tp, fn)
    report = skm.classification_report(y, pred, output_dict=True)
    assert m["per_class"]["normal"]["precision"] == pytest.approx(report["0"]["precision"])
    assert m["macro"]["f1"] == pytest.approx(report["macro avg"]["f1-score"])
    # with the positive class in column 0, the same numbers follow that column
    flipped = compute_metrics(1 - y, probs[:, ::-1], ["tumour", "normal"], positive_index=0, threshold=t)
    assert flipped["auc"] == pytest.approx(m["auc"]) and flipped["f1"] == pytest.approx(m["f1"])


def test_multiclass_metrics_equal_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    classes = ["ADI", "LYM", "STR", "TUM"]
    m = compute_metrics(y, probs, classes, positive_index=3, threshold=0.3)
    pred = probs.argmax(1)
    assert m["decision"] == "argmax"
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, pred).tolist()
    for k, name in enumerate(classes):
        assert m["per_class"][name]["recall"] == pytest.approx(skm.recall_score(y == k, pred == k))
    # the screening view of a multi-class model: its positive class at its threshold
    called = probs[:, 3] >= 0.3
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y == 3, called))
    assert m["positive"]["auc"] == pytest.approx(skm.roc_auc_score(y == 3, probs[:, 3]))


def test_metrics_with_a_missing_class_do_not_crash() -> None:
    y = np.zeros(5, dtype=int)
    probs = np.tile([0.9, 0.1], (5, 1))
    m = compute_metrics(y, probs, ["normal", "tumour"], positive_index=1, threshold=0.5)
    assert m["auc"] is None and m["sensitivity"] is None and m["specificity"] == 1.0
    json.dumps(m, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=4, max_size=60),
       st.sampled_from([0.5, 0.8, 0.95, 1.0]))
def test_sensitivity_rule_is_the_best_specificity_meeting_the_target(
        pairs: list[tuple[bool, int]], target: float) -> None:
    y = np.array([p for p, _ in pairs])
    score = np.array([s / 20 for _, s in pairs])
    if y.all() or not y.any():
        return
    t = choose_threshold(y, score, f"sensitivity:{target}")
    called = score >= t
    sens = called[y].mean()
    spec = (~called[~y]).mean()
    assert sens >= target - 1e-9
    # no other cut on these scores meets the target with a higher specificity, or ties it with a higher
    # sensitivity
    for cut in np.unique(np.concatenate([score, [2.0]])):
        c = score >= cut
        if c[y].mean() >= target - 1e-9:
            assert (~c[~y]).mean() <= spec + 1e-9
            if (~c[~y]).mean() >= spec - 1e-9:
                assert c[y].mean() <= sens + 1e-9


def test_separable_validation_keeps_all_positives() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1], dtype=bool)
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    t = choose_threshold(y, score, "sensitivity:0.5")
    assert t == pytest.approx(0.45)  # midway between the top negative and the lowest positive


def test_other_threshold_rules() -> None:
    y = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    score = np.array([0.1, 0.2, 0.6, 0.5, 0.8, 0.9])
    t = choose_threshold(y, score, "specificity:1.0")
    assert 0.6 < t <= 0.8  # all negatives below it, as many positives as possible
    t = choose_threshold(y, score, "youden")
    called = score >= t
    assert called[y].mean() - called[~y].mean() == pytest.approx(2 / 3)
    assert choose_threshold(y, score, "fixed:0.25") == 0.25
    assert choose_threshold(np.ones(3, bool), np.ones(3), "sensitivity:0.95") == 0.5
    for bad in ("sensitivity", "sens:0.9", "fixed:2", "youden:1"):
        with pytest.raises(ConfigError, match="threshold rule"):
            ThresholdRule.parse(bad)
    assert str(ThresholdRule.parse("Sensitivity:0.950")) == "sensitivity:0.95"


def test_write_evaluation_files(tmp_path: Path) -> None:
    y, probs = _binary_case()
    m = compute_metrics(y, probs, ["normal", "tumour"], positive_index=1, threshold=0.5)
    write_evaluation(tmp_path, m, [f"img{i}.png" for i in range(len(y))], y, probs)
    for name in ("metrics.json", "predictions.csv", "roc.png", "confusion.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "metrics.json").read_text())["auc"] == pytest.approx(m["auc"])
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,label,predicted,p_normal,p_tumour" and len(lines) == len(y) + 1


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
    with pytest.raises(ModelMismatchError, match="--label-column"):
        evaluate_model(_random_model(["abnormal", "normal"], "abnormal"), folder, "test", tmp_path)
    with pytest.raises(DatasetError, match="split 'valid' is empty"):
        evaluate_model(_random_model(["abnormal", "normal"], "abnormal"), folder, "valid", tmp_path)
    binary = open_patch_folder(herlev_small, label_column="binary_label")
    with pytest.raises(ConfigError, match="--positive"):
        evaluate_model(_random_model(["abnormal", "normal"], "abnormal"), binary, "test", tmp_path,
                       positive="tumour")
