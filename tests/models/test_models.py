"""Models: screen_cnn32's layer table, the timm registry hook, ModelSpec, safe checkpoints, PatchClassifier."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import wsi_screen
import wsi_screen.models as models_module
from wsi_screen.errors import ModelError, UnknownModelError, UnsafeFileError
from wsi_screen.metrics import decide
from wsi_screen.models import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelSpec,
    PatchClassifier,
    create_model,
    list_models,
    load_model,
    load_pretrained,
    save_model,
)
from wsi_screen.models.checkpoint import read_weights, sniff


def _spec(**changes: object) -> ModelSpec:
    base: dict[str, object] = {"arch": "screen_cnn32", "classes": ["normal", "tumour"], "input_size": 32,
                               "positive_class": "tumour", "threshold": 0.3, "mean": (0.0, 0.0, 0.0),
                               "std": (1.0, 1.0, 1.0), "mpp": 0.5}
    base.update(changes)
    return ModelSpec(**base)  # type: ignore[arg-type]


def _saved(tmp_path: Path, seed: int = 0, **changes: object) -> tuple[Path, ModelSpec]:
    torch.manual_seed(seed)
    spec = _spec(**changes)
    module = create_model(spec.arch, num_classes=spec.num_classes, **spec.model_kwargs)
    save_model(tmp_path / "model", module, spec)
    return tmp_path / "model", spec


# --- screen_cnn32 ----------------------------------------------------------------------------------------
def test_screen_cnn32_layer_table() -> None:
    model = timm.create_model("screen_cnn32", num_classes=2)
    layers = [(name, sum(p.numel() for p in m.parameters())) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert [n for _, n in layers] == [1_792, 73_856, 295_168, 2_097_664, 65_664, 258]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (64, (3, 3), (1, 1)), (128, (3, 3), (1, 1)), (256, (3, 3), (1, 1))]
    assert sum(p.numel() for p in model.parameters()) == 2_534_402
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 3
    features = model.forward_features(torch.zeros(1, 3, 32, 32))
    assert features.flatten(1).shape[1] == 4_096
    assert model(torch.zeros(5, 3, 32, 32)).shape == (5, 2)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_screen_cnn32_options_and_errors() -> None:
    assert create_model("screen_cnn32", num_classes=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ModelError, match="no downloadable weights"):
        timm.create_model("screen_cnn32", pretrained=True)
    with pytest.raises(ModelError, match="does not take"):
        timm.create_model("screen_cnn32", img_size=64)
    assert "screen_cnn32" in list_models("screen*")


def test_import_wsi_screen_registers_in_timm_lazily() -> None:
    code = ("import sys, wsi_screen\n"
            "assert 'timm' not in sys.modules and 'torch' not in sys.modules\n"
            "import timm\n"
            "m = timm.create_model('screen_cnn32', num_classes=2)\n"
            "print(sum(p.numel() for p in m.parameters()))\n")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "2534402"


def test_unknown_architecture_names_close_matches() -> None:
    with pytest.raises(UnknownModelError, match=r"did you mean.*resnet50"):
        create_model("resnet5o", num_classes=2)
    with pytest.raises(UnknownModelError, match=r"did you mean.*screen_cnn32"):
        wsi_screen.create_model("screen_cnn23", 2)
    with pytest.raises(ModelError, match="never downloaded"):
        create_model("resnet18", num_classes=2, pretrained=True)


# --- ModelSpec -------------------------------------------------------------------------------------------
def test_spec_json_round_trip() -> None:
    spec = _spec(metrics={"auc": 0.9}, train_config={"seed": 3}, model_kwargs={"drop_rate": 0.1})
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.positive_index == 1 and again.num_classes == 2
    data = json.loads(spec.to_json())
    for key in ("arch", "classes", "positive_class", "input_size", "mpp", "mean", "std", "stain_method",
                "stain_target", "threshold", "threshold_rule", "metrics", "data_fingerprint",
                "package_version", "train_config", "created"):
        assert key in data


@pytest.mark.parametrize(("changes", "message"), [
    ({"classes": ["a"]}, "at least two"),
    ({"positive_class": "x"}, "not one of"),
    ({"threshold": 1.5}, "outside"),
    ({"threshold": None}, "needs a threshold"),
    ({"stain_method": "magic"}, "stain_method"),
    ({"mpp": -1.0}, "mpp"),
])
def test_spec_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        _spec(**changes)


def test_spec_from_newer_format_or_broken_json(tmp_path: Path) -> None:
    data = json.loads(_spec().to_json())
    data["format_version"] = 99
    with pytest.raises(ModelError, match="newer"):
        ModelSpec.from_dict(data, source="x")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelSpec.from_json("{", source="x")
    with pytest.raises(ModelError, match="lacks arch"):
        ModelSpec.from_dict({"classes": ["a", "b"], "input_size": 3})
    with pytest.raises(ModelError, match=r"no config\.json"):
        ModelSpec.read(tmp_path)


# --- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    folder, spec = _saved(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    first = load_model(folder, precision="fp32")  # compared bit for bit with a float32 module below
    second = load_model(folder / WEIGHTS_NAME, precision="fp32")
    third = load_model(folder / CONFIG_NAME, precision="fp32")
    assert first.spec == spec
    p = first.predict(images)
    assert p.shape == (6, 2) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(p, second.predict(images))
    np.testing.assert_array_equal(p, third.predict(images))
    # the weights on disk are exactly the module's
    torch.manual_seed(0)
    reference = create_model("screen_cnn32", num_classes=2).eval()
    x = first.preprocess(images)
    np.testing.assert_array_equal(first.predict_tensor(x).numpy(), torch.softmax(reference(x), 1).detach().numpy())
    assert (folder / WEIGHTS_NAME).stat().st_mode & 0o044  # readable by others, like any file


def test_timm_model_round_trip_multiclass(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path, arch="resnet10t", classes=["a", "b", "c"], positive_class=None, threshold=None,
                       input_size=48)
    model = load_model(folder)
    images = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    probs = model.predict(images)
    assert probs.shape == (3, 3)
    np.testing.assert_array_equal(probs, load_model(folder).predict(images))
    np.testing.assert_array_equal(model.decide(probs), probs.argmax(1))


def test_pickles_are_refused(tmp_path: Path) -> None:
    state = create_model("screen_cnn32", num_classes=2).state_dict()
    # a torch.save file under its usual name, alone in a folder
    pt_dir = tmp_path / "pt"
    pt_dir.mkdir()
    torch.save(state, pt_dir / "model.pt")
    with pytest.raises(UnsafeFileError, match=r"model\.pt"):
        load_model(pt_dir)
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_model(pt_dir / "model.pt")
    # a pickle disguised as safetensors is caught by its magic bytes
    disguised, _ = _saved(tmp_path)
    torch.save(state, disguised / WEIGHTS_NAME)
    assert sniff(disguised / WEIGHTS_NAME) == "zip"
    with pytest.raises(UnsafeFileError, match="arbitrary code"):
        load_model(disguised)
    raw = tmp_path / "weights.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert sniff(raw) == "pickle"
    with pytest.raises(UnsafeFileError):
        read_weights(raw)
    with pytest.raises(UnsafeFileError):
        load_pretrained(create_model("screen_cnn32", num_classes=2), raw)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights at all")
    with pytest.raises(ModelError, match="not a safetensors file"):
        read_weights(junk)


def test_bundled_model_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models_module.default_model_dir().parts[-3:] == ("resources", "models", "default")
    monkeypatch.setattr(models_module, "default_model_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(ModelError, match="bundled default model is missing"):
        load_model(None)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    folder, spec = _saved(tmp_path)
    (folder / CONFIG_NAME).write_text(spec.replace(classes=["a", "b", "c"], positive_class=None,
                                                   threshold=None).to_json())
    with pytest.raises(ModelError, match="do not fit"):
        load_model(folder)


# --- transfer learning from local weights ----------------------------------------------------------------
def test_load_pretrained_resets_head_for_a_new_class_set(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    target = create_model("screen_cnn32", num_classes=5)
    report = load_pretrained(target, folder)
    assert report.head_reset == ["head.fc.bias", "head.fc.weight"] or sorted(report.head_reset) == [
        "head.fc.bias", "head.fc.weight"]
    assert report.loaded == 10 and report.spec is not None
    source = read_weights(folder / WEIGHTS_NAME)
    torch.testing.assert_close(target.state_dict()["features.0.weight"], source["features.0.weight"])


def test_load_pretrained_resets_the_head_when_the_classes_are_other_names(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Two classes again, but not the source's [normal, tumour]: output 0 would change meaning, so the head is
    fresh; the same list keeps it; without ``classes`` only the shapes decide (a file without config.json)."""
    folder, _ = _saved(tmp_path)
    source = read_weights(folder / WEIGHTS_NAME)
    for classes in (["abnormal", "normal"], ["tumour", "normal"]):
        torch.manual_seed(1)
        target = create_model("screen_cnn32", num_classes=2)
        with caplog.at_level(logging.INFO, logger="wsi_screen"):
            report = load_pretrained(target, folder, classes=classes)
        assert sorted(report.head_reset) == ["head.fc.bias", "head.fc.weight"] and report.loaded == 10
        assert not torch.equal(target.state_dict()["head.fc.weight"], source["head.fc.weight"])
        torch.testing.assert_close(target.state_dict()["features.0.weight"], source["features.0.weight"])
    assert "the classes [tumour, normal] are not the source's [normal, tumour]" in caplog.text
    for classes in (["normal", "tumour"], None):
        target = create_model("screen_cnn32", num_classes=2)
        report = load_pretrained(target, folder, classes=classes)
        assert report.head_reset == [] and report.loaded == 12
        torch.testing.assert_close(target.state_dict()["head.fc.weight"], source["head.fc.weight"])


def test_load_pretrained_from_a_cross_validated_ensemble_takes_member_0(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from wsi_screen.models.ensemble import Ensemble

    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(create_model("screen_cnn32", num_classes=2))
    save_model(tmp_path / "cv", Ensemble(members), _spec(ensemble=3))
    target = create_model("screen_cnn32", num_classes=2)
    with caplog.at_level(logging.INFO, logger="wsi_screen"):
        report = load_pretrained(target, tmp_path / "cv", classes=["normal", "tumour"])
    assert report.loaded == 12 and report.head_reset == [] and report.ensemble_member == 0
    assert report.as_dict()["ensemble_member"] == 0 and report.spec is not None and report.spec.ensemble == 3
    for key, value in members[0].state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    assert "ensemble of 3 fold models; starting from member 0" in caplog.text
    # the bare weights file of an ensemble, without its config: the same member, the head kept by shape
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "w.safetensors").write_bytes((tmp_path / "cv" / WEIGHTS_NAME).read_bytes())
    bare = load_pretrained(create_model("screen_cnn32", num_classes=2), tmp_path / "bare" / "w.safetensors")
    assert bare.loaded == 12 and bare.ensemble_member == 0 and bare.spec is None
    plain, _ = _saved(tmp_path / "plain")
    assert load_pretrained(create_model("screen_cnn32", num_classes=2), plain).ensemble_member is None


def test_load_pretrained_timm_names_and_prefixes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    source = create_model("resnet10t", num_classes=1000)
    state = {f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}
    state["module.extra.weight"] = torch.zeros(2)
    del state["module.layer1.0.conv1.weight"]
    path = tmp_path / "timm.safetensors"
    save_file(state, str(path))
    target = create_model("resnet10t", num_classes=2)
    with caplog.at_level(logging.INFO, logger="wsi_screen"):
        report = load_pretrained(target, path)
    assert report.unexpected == ["extra.weight"]
    assert report.missing == ["layer1.0.conv1.weight"]
    assert sorted(report.head_reset) == ["fc.bias", "fc.weight"]
    assert "not in the file" in caplog.text and "not used" in caplog.text
    with pytest.raises(ModelError, match="none of its"):
        load_pretrained(create_model("screen_cnn32", num_classes=2), path)
    vgg_like = {"features.0.weight": torch.zeros(8, 3, 3, 3)}
    save_file(vgg_like, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="do not fit"):
        load_pretrained(create_model("screen_cnn32", num_classes=2), tmp_path / "other.safetensors")


# --- PatchClassifier -------------------------------------------------------------------------------------
def test_predict_inputs_and_resize_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = _saved(tmp_path)
    model = load_model(folder)
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="wsi_screen"):
        from_list = model.predict([Image.fromarray(big), big, Image.fromarray(big).convert("L")])
    assert "resized to the model input" in caplog.text
    assert from_list.shape == (3, 2)
    np.testing.assert_allclose(from_list[0], from_list[1], atol=1e-6)
    assert model.predict(big[:32, :32]).shape == (1, 2)
    x = model.preprocess(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert model.predict(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 2)
    with pytest.raises(ModelError, match="uint8"):
        model.predict(big.astype(np.float32))
    # the message names the shape given: a grey batch (2, 32, 32) was "an array of shape (1, 2, 32, 32)"
    for shape in [(2, 32, 32), (2, 3, 32, 32), (1, 2, 32, 32, 3)]:
        with pytest.raises(ModelError) as bad:
            model.predict(np.zeros(shape, np.uint8))
        assert str(bad.value) == ("expected RGB images shaped (N, H, W, 3) or one (H, W, 3), got an array of shape "
                                  f"{shape}")
    assert isinstance(model, PatchClassifier) and not model.module.training


def test_decide_uses_the_threshold_for_binary_models() -> None:
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    np.testing.assert_array_equal(decide(probs, 1, 0.3), [0, 1, 1])
    np.testing.assert_array_equal(decide(probs, 0, 0.7), [0, 1, 1])
    np.testing.assert_array_equal(decide(probs, None, None), [0, 0, 1])
    three = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    np.testing.assert_array_equal(decide(three, 2, 0.1), [0, 2])
