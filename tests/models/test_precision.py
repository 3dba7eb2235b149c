"""The forward pass's arithmetic (wsi_screen.models.precision): fp32, bf16 and auto, on the bundled model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from wsi_screen.errors import ModelError
from wsi_screen.models import load_model
from wsi_screen.models.precision import DOMAIN_REFINE_BAND, PRECISIONS, REFINE_BAND, native_bf16, resolve


@pytest.fixture(scope="module")
def pcam_valid(patches_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """200 PCam valid patches (100 per class, every 14th of the split in file order) and their labels.

    Enough for the proof below (it was 400; bf16 is emulated on CPUs without native bfloat16, the slowest pass):
    14 of these patches score within the refine band of the threshold and 1 near the domain threshold, so the
    float32 rescoring is exercised on both, and the AUC (0.93) is the 400 patches' to within 0.003."""
    root = patches_dir / "pcam"
    with (root / "labels.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "valid"]
    picked = {c: [r for r in rows if r["label"] == c][::14][:100] for c in ("normal", "tumour")}
    chosen = picked["normal"] + picked["tumour"]
    images = np.stack([np.asarray(Image.open(root / r["path"]).convert("RGB")) for r in chosen])
    return images, np.array([r["label"] == "tumour" for r in chosen])


def test_resolve_auto_follows_the_hardware_and_explicit_choices_stay() -> None:
    cpu = torch.device("cpu")
    assert resolve("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve("fp32", cpu) == "fp32" and resolve("bf16", cpu) == "bf16"
    assert PRECISIONS == ("auto", "fp32", "bf16")
    import click

    from wsi_screen.cli import cli  # the CLI spells the choices out (so that --help needs no torch): the same ones
    for name in ("infer", "predict", "evaluate"):
        command = cli.get_command(click.Context(cli), name)
        assert command is not None
        option = next(o for o in command.params if o.name == "precision")
        assert isinstance(option.type, click.Choice)
        assert tuple(option.type.choices) == PRECISIONS, name
    with pytest.raises(ModelError, match="precision must be one of auto, fp32, bf16"):
        resolve("fp16", cpu)
    assert load_model(None, precision="fp32").precision == "fp32"
    assert load_model(None).precision == resolve("auto", cpu)


def test_bf16_scores_the_bundled_model_as_fp32_does(pcam_valid: tuple[np.ndarray, np.ndarray]) -> None:
    images, truth = pcam_valid
    fp32 = load_model(None, precision="fp32")
    bf16 = load_model(None, precision="bf16")
    p32, d32 = fp32.predict_with_domain(images)
    p16, d16 = bf16.predict_with_domain(images)
    assert p16.dtype == np.float32 and p16.shape == p32.shape == (200, 2)
    np.testing.assert_allclose(p16.sum(1), 1.0, atol=1e-6)  # the softmax stays float32
    pos, threshold = fp32.spec.positive_index, fp32.spec.threshold
    raw = bf16.predict_tensor(bf16.preprocess(images)).numpy()  # one bfloat16 pass, nothing refined
    assert 0 < np.abs(raw - p32).max() < REFINE_BAND  # bf16 really ran, and moved no score by the band
    diff = np.abs(p16 - p32)
    assert diff.max() < REFINE_BAND and diff.mean() < 0.005
    auc32, auc16 = roc_auc_score(truth, p32[:, pos]), roc_auc_score(truth, p16[:, pos])
    assert auc32 > 0.9 and abs(auc16 - auc32) < 0.002
    # scores near the threshold were rescored in float32: every patch call is float32's
    near = np.abs(raw[:, pos] - threshold) < REFINE_BAND
    assert 0 < near.sum() < len(near) / 2
    np.testing.assert_allclose(p16[near], p32[near], atol=1e-5)
    assert np.array_equal(p16[:, pos] >= threshold, p32[:, pos] >= threshold)
    domain = fp32.domain
    assert domain is not None and d32 is not None and d16 is not None
    near_d = np.abs(d32 - domain.threshold) < DOMAIN_REFINE_BAND * domain.threshold / 2
    assert near_d.any()  # the sample holds a patch to rescore (else the next line would check nothing)
    np.testing.assert_allclose(d16[near_d], d32[near_d], rtol=1e-4)  # rescored in float32
    assert np.array_equal(domain.in_domain(d16), domain.in_domain(d32))  # and so are the domain calls


def test_slide_rule_thresholds_are_refined_too() -> None:
    from wsi_screen.screening.aggregate import AggregateConfig
    from wsi_screen.screening.run import decision_thresholds

    model = load_model(None, precision="bf16")
    t = model.spec.threshold
    rule = AggregateConfig(rule="region", patch_threshold=t, region_threshold=0.8, slide_threshold=0.05)
    assert decision_thresholds(model, rule) == (t, 0.8)
    assert decision_thresholds(model, AggregateConfig(rule="max", patch_threshold=t, slide_threshold=0.9)) == \
        (t, 0.5, 0.9)  # 0.5: the default region threshold (foci)
    assert model.decision_thresholds == (t,)  # the model's own threshold until a rule adds its own


def test_precision_option_reaches_the_model_and_run_json(tmp_path: Path, example_slide: Path) -> None:
    from tests.conftest import run_cli

    result = run_cli("infer", str(example_slide), "-o", str(tmp_path / "run"), "--precision", "fp32", "-q")
    assert result.code == 0, result.err
    import json

    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["model"]["numeric_precision"] == "fp32"
    # the same run at another precision does not reuse the float32 scores
    again = run_cli("infer", str(example_slide), "-o", str(tmp_path / "run"), "--precision", "bf16", "-q")
    assert again.code == 0, again.err
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["model"]["numeric_precision"] == "bf16" and doc["slides"][0]["reused"] is False
    bad = run_cli("infer", str(example_slide), "-o", str(tmp_path / "run2"), "--precision", "fp16")
    assert bad.code == 2 and "fp16" in bad.err and "Traceback" not in bad.err
