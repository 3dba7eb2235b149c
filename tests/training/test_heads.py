"""Heads on a frozen encoder's embeddings (wsi_screen.training.heads, .embeddings; wsi_screen.models.head): trained
on real PCam patches, cached embeddings reused on a rerun, and a normal model folder that load_model, evaluate and
infer use."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.classifier_data import make_subset, tiny_config
from tests.conftest import run_cli
from tests.hub import write_hub_model
from wsi_screen.errors import EncoderNotFoundError
from wsi_screen.models import load_model
from wsi_screen.models.checkpoint import read_weights
from wsi_screen.training import embeddings
from wsi_screen.training.data import read_image
from wsi_screen.training.train import train


@pytest.fixture(scope="module")
def pcam_small(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PCam: 60 train + 30 valid images per class."""
    return make_subset(patches_dir / "pcam", tmp_path_factory.mktemp("pcam_small"),
                       {"train": 60, "valid": 30})


def head_config(cache: Path, **changes: object):  # type: ignore[no-untyped-def]
    base: dict[str, object] = {"arch": "", "encoder": "default", "head": "linear", "label_column": "label",
                               "epochs": 15, "batch_size": 32, "mpp": 0.972, "embedding_cache": str(cache)}
    base.update(changes)
    return tiny_config(**base)


@pytest.fixture(scope="module")
def head_model(pcam_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A linear head on the bundled model, trained once: (model folder, embedding cache)."""
    root = tmp_path_factory.mktemp("head")
    train(pcam_small, root / "m", head_config(root / "cache"))
    return root / "m", root / "cache"


def test_linear_head_on_bundled_encoder(pcam_small: Path, head_model: tuple[Path, Path]) -> None:
    folder, _cache = head_model
    spec = load_model(folder, precision="fp32").spec
    assert spec.encoder is not None and spec.encoder["name"] == "default" and spec.head == {
        "kind": "linear", "dim": 512, "hidden": None}
    assert (spec.input_size, spec.mpp, spec.positive_class) == (96, 0.972, "tumour")
    assert spec.metrics["auc"] > 0.85  # the bundled model's features separate PCam well
    assert not (folder / "domain.json").exists()
    weights = read_weights(folder / "model.safetensors")
    assert set(weights) == {"mean", "std", "layers.1.weight", "layers.1.bias"}  # the head only
    assert spec.train_config["embeddings"]["reused"] is False
    # what did not apply to a head is recorded as null: no recipe, no image augmentation; one validation split
    recorded = spec.train_config
    assert recorded["recipe"] is None and recorded["folds"] == 1 and recorded["head"] == "linear"
    assert all(recorded[k] is None for k in ("flips", "hed_jitter", "color_jitter", "frozen_epochs", "compile",
                                             "cache_limit_mb"))
    assert recorded["arch"] is None  # no network of its own to name (it was "")

    # the model folder is an ordinary one: load_model gives the probabilities training validated
    model = load_model(folder, precision="fp32")
    with (folder / "valid" / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    images = np.stack([read_image(pcam_small / r["path"]) for r in rows])
    got = model.predict(images)[:, spec.positive_index]
    want = np.array([float(r["p_tumour"]) for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_head_folder_recording_an_empty_arch_still_loads(head_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Folders written before `train_config.arch` was null for a head hold "": they load and predict the same."""
    import shutil

    folder, _cache = head_model
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "config.json").read_text())
    config["train_config"]["arch"] = ""
    (old / "config.json").write_text(json.dumps(config))
    images = np.zeros((2, 96, 96, 3), np.uint8)
    model = load_model(old, precision="fp32")
    assert model.spec.train_config["arch"] == ""
    np.testing.assert_allclose(model.predict(images), load_model(folder, precision="fp32").predict(images), atol=1e-6)


def test_a_head_on_resized_patches_records_their_scale_at_its_size(pcam_small: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`size` 64 on 96 px patches at 0.972 um/px: the model's patches are 64 px at 1.458 um/px (the 93 um field the
    head trained on); it recorded 0.972, and infer tiled a 62 um field. With no cache named, the default one used is
    recorded (train_config.embedding_cache was null)."""
    monkeypatch.setenv("WSI_SCREEN_CACHE", str(tmp_path / "home-cache"))
    train(pcam_small, tmp_path / "m", head_config(tmp_path / "cache", size=64, epochs=1, embedding_cache=None))
    spec = load_model(tmp_path / "m", precision="fp32").spec
    used = tmp_path / "home-cache" / "embeddings"
    assert spec.train_config["embedding_cache"] == str(used)
    assert Path(spec.train_config["embeddings"]["cache"]).parent == used and any(used.glob("*.safetensors"))
    assert spec.input_size == 64 and spec.mpp == pytest.approx(0.972 * 96 / 64)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mpp"] == pytest.approx(1.458)


def test_head_model_card_names_its_encoder(head_model: tuple[Path, Path]) -> None:
    from wsi_screen.models.card import TO_COMPLETE, encoder_section

    folder, _cache = head_model
    sha = load_model(folder).spec.encoder["weights_sha256"]
    res = run_cli("models", "--card", folder)
    assert res.code == 0, res
    text = res.out
    assert "encoder:" in text and "name: default" in text and f"weights_sha256: {sha}" in text
    assert f"licence: {TO_COMPLETE}   <-- complete this" in text and "yours to state" in text
    assert "not checked for being out of domain" in text and "domain.json" not in text
    from wsi_screen.models.card import read_card, summary
    from wsi_screen.screening.run import model_identity

    head = load_model(folder, precision="fp32")
    assert head.domain is None
    lines = model_identity(folder, head)["card"]  # what infer's run.json and report show of the card
    assert lines == summary(read_card(folder), domain_model=False)  # type: ignore[arg-type]
    assert lines[1].endswith("it has no domain model, so slides unlike that data are not flagged.")
    draft = "Model (its card is a draft: task and tissue to complete), ~10x (0.972 um/px); patch AUC"
    assert lines[0].startswith(draft)
    assert TO_COMPLETE not in " ".join(lines)
    # a registry encoder's card carries the registry's licence and gating
    uni = encoder_section({"name": "uni", "ref": "uni", "kind": "registry", "weights": "MahmoodLab/uni/x",
                           "weights_sha256": "ab" * 32})
    assert (uni["name"], uni["licence"], uni["gated"]) == ("uni", "CC-BY-NC-ND-4.0", True)


def test_rerun_reuses_cached_embeddings(pcam_small: Path, head_model: tuple[Path, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder, cache = head_model
    first = load_model(folder, precision="fp32").spec
    cached = sorted(cache.glob("*.safetensors"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns

    def no_embedding(*_a: object, **_k: object) -> None:
        raise AssertionError("embeddings computed again")

    monkeypatch.setattr(embeddings, "embed_rows", no_embedding)
    again = train(pcam_small, tmp_path / "again", head_config(cache))
    assert again.spec.train_config["embeddings"]["reused"] is True
    assert cached[0].stat().st_mtime_ns == before
    assert again.spec.metrics["auc"] == pytest.approx(first.metrics["auc"])
    # another encoder setting is another key: computed (here: refused, proving the cache was not used)
    with pytest.raises(AssertionError, match="computed again"):
        train(pcam_small, tmp_path / "other", head_config(cache, size=64))


def test_mlp_head_on_hub_encoder_evaluate_and_missing_encoder(pcam_small: Path, tmp_path: Path,
                                                              offline_hub: Path) -> None:
    weights = write_hub_model(offline_hub, "wsi-screen-test/tiny-vit")
    out = tmp_path / "hub-head"
    res = run_cli("train", pcam_small, "--encoder", "hf-hub:wsi-screen-test/tiny-vit", "--head", "mlp",
                  "--epochs", "3", "--mpp", "0.972", "--embedding-cache", tmp_path / "cache", "-o", out, "-q")
    assert res.code == 0, res
    spec = json.loads((out / "config.json").read_text())
    assert spec["encoder"]["ref"] == "hf-hub:wsi-screen-test/tiny-vit" and spec["head"]["kind"] == "mlp"
    assert spec["input_size"] == 96 and spec["encoder"]["input_size"] == 160
    res = run_cli("evaluate", pcam_small, "--model", out, "--split", "valid", "-o", tmp_path / "eval", "-q")
    assert res.code == 0, res
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 60 and 0.0 <= metrics["auc"] <= 1.0

    # without the patches' mpp (a hub encoder records none): a warning that infer cannot use the model on slides
    res = run_cli("train", pcam_small, "--encoder", "hf-hub:wsi-screen-test/tiny-vit", "--head", "linear",
                  "--epochs", "1", "--embedding-cache", tmp_path / "cache", "-o", tmp_path / "no-mpp", "-q")
    assert res.code == 0, res
    assert json.loads((tmp_path / "no-mpp" / "config.json").read_text())["mpp"] is None
    warning = next(line for line in res.err_lines if "no recorded mpp" in line)
    assert "warning" in warning.lower() and "infer cannot apply it to slides" in warning and "--mpp" in warning

    weights.unlink()  # the encoder is gone from the cache: loading the head model says so in one line
    with pytest.raises(EncoderNotFoundError, match="huggingface-cli download wsi-screen-test/tiny-vit"):
        load_model(out)


def test_moved_model_finds_its_weights_file_in_its_folder(pcam_small: Path, tmp_path: Path) -> None:
    """A head on `encoder`=ARCH `encoder_weights`=FILE records the file's path; moved elsewhere with the file copied
    into the model folder's encoder/ folder, it loads from there (sha256 checked), even when the file is called
    model.safetensors like the head's own weights; with neither, one error names both places."""
    import shutil

    from safetensors.torch import save_file

    from tests.hub import TINY_ARCH, tiny_state
    from wsi_screen.errors import ModelError
    from wsi_screen.models.encoder import file_sha256

    weights = tmp_path / "here" / "model.safetensors"  # the name of the head's own weights file
    weights.parent.mkdir()
    save_file(tiny_state(seed=2), str(weights))
    sha = file_sha256(weights)
    train(pcam_small, tmp_path / "here" / "m", head_config(tmp_path / "cache", encoder=TINY_ARCH,
                                                           encoder_weights=str(weights), epochs=1))
    want = load_model(tmp_path / "here" / "m", precision="fp32").predict(np.zeros((2, 96, 96, 3), np.uint8))

    moved = tmp_path / "there" / "m"
    shutil.copytree(tmp_path / "here" / "m", moved)
    shutil.rmtree(tmp_path / "here")  # the recorded path is gone
    copied = moved / "encoder" / "model.safetensors"
    with pytest.raises(ModelError) as info:  # the head's own model.safetensors is not taken for the encoder's
        load_model(moved)
    message = str(info.value)
    assert str(weights) in message and str(copied) in message and "another file" not in message
    assert sha in message and "\n" not in message
    card = run_cli("models", "--card", moved)  # the card keeps the recorded path, and says none is found
    assert card.code == 0 and f"weights: {weights}" in card.out
    assert "encoder weights in use: none: encoder " in card.out and str(copied) in card.out

    copied.parent.mkdir()
    save_file(tiny_state(seed=3), str(copied))  # another file of that name: refused
    with pytest.raises(ModelError, match="another file of that name"):
        load_model(moved)
    save_file(tiny_state(seed=2), str(copied))  # the same file, copied into the model folder
    assert file_sha256(copied) == sha
    got = load_model(moved, precision="fp32").predict(np.zeros((2, 96, 96, 3), np.uint8))
    np.testing.assert_allclose(got, want, atol=1e-6)
    card = run_cli("models", "--card", moved)  # the card names the copy in use
    assert f"encoder weights in use: {copied} (the recorded file is gone" in card.out


def test_moved_model_finds_its_model_folder_encoder_in_its_folder(pcam_small: Path, head_model: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    """A head on `encoder`=FOLDER (a model folder) records the folder's path; once the folder is gone it said "no such
    model folder", advice for typing `encoder`. Now one error names where it looked and the sha256, and the folder
    copied into the model folder's encoder/ folder is used (sha256 checked), as for a weights file."""
    import shutil

    from wsi_screen.errors import ModelError
    from wsi_screen.models import default_model_dir
    from wsi_screen.models.encoder import file_sha256

    encf = tmp_path / "here" / "encf"
    shutil.copytree(default_model_dir(), encf)
    sha = file_sha256(encf / "model.safetensors")
    model = tmp_path / "here" / "m"
    train(pcam_small, model, head_config(head_model[1], encoder=str(encf), epochs=1))
    patches = sorted(p for p in (pcam_small / "images").rglob("*") if p.is_file())[:4]
    images = np.stack([read_image(p) for p in patches])
    want = load_model(model, precision="fp32").predict(images)

    moved = tmp_path / "there" / "m"
    shutil.copytree(model, moved)
    shutil.rmtree(tmp_path / "here")  # the recorded folder is gone
    copied = moved / "encoder" / "encf"
    with pytest.raises(ModelError) as info:
        load_model(moved)
    message = str(info.value)
    assert str(encf) in message and str(copied) in message and sha in message and "\n" not in message
    assert f"copy the folder encf (its model.safetensors has sha256 {sha}) into {copied.parent}" in message
    assert "no such model folder" not in message
    res = run_cli("predict", patches[0], "--model", moved, "--quiet")  # the CLI: the same, in one line
    assert res.code == 1 and len(res.err_lines) == 1 and str(copied) in res.err and sha in res.err, res
    card = run_cli("models", "--card", moved)
    assert card.code == 0 and "encoder weights in use: none: encoder encf: " in card.out

    shutil.copytree(default_model_dir(), copied)
    (copied / "model.safetensors").write_bytes(b"not these weights")  # another folder of that name: refused
    with pytest.raises(ModelError, match="another folder of that name"):
        load_model(moved)
    shutil.copyfile(default_model_dir() / "model.safetensors", copied / "model.safetensors")
    np.testing.assert_allclose(load_model(moved, precision="fp32").predict(images), want, atol=1e-6)
    card = run_cli("models", "--card", moved)
    assert f"encoder weights in use: {copied} (the recorded folder is gone" in card.out


def test_infer_and_calibrate_with_a_head_model(head_model: tuple[Path, Path], tmp_path: Path, example_slide: Path,
                                               slides_dir: Path) -> None:
    model, _cache = head_model
    tif = slides_dir / "CMU-1-Small-Region.pyramid.tif"  # the same tissue, another file: labelled the other way
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nCMU-1-Small-Region,normal\nCMU-1-Small-Region.pyramid,tumour\n")
    run = tmp_path / "run"
    res = run_cli("infer", example_slide, tif, "--model", model, "-o", run, "--workers", "0", "--labels", labels)
    assert res.code == 0, res
    assert "not checked for being out of domain" in res.err
    with (run / "results.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["status"] == "ok" and int(r["n_patches"]) > 0 for r in rows)
    encoder = load_model(model).spec.encoder
    assert encoder is not None
    recorded = json.loads((run / "run.json").read_text())["model"]["encoder"]  # which encoder scored the run
    assert recorded == {"name": "default", "ref": encoder["ref"], "weights_sha256": encoder["weights_sha256"]}
    res = run_cli("calibrate", run, "--labels", labels, "-o", tmp_path / "calibrated")
    assert res.code == 0, res
    calibrated = load_model(tmp_path / "calibrated")
    assert calibrated.spec.encoder == load_model(model).spec.encoder
    assert (tmp_path / "calibrated" / "slide_rule.json").exists()


def test_without_the_patches_mpp_the_encoders_is_offered_not_assumed(pcam_small: Path, head_model: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """PCam has no mpp column: a head on the bundled model (trained at 0.972 um/px) records none and the warning
    names the value to give; the encoder's mpp is not taken for the patches' (docs/encoders.md)."""
    _folder, cache = head_model
    res = run_cli("train", pcam_small, "--encoder", "default", "--epochs", "1", "--embedding-cache", cache,
                  "-o", tmp_path / "m", "-q")
    assert res.code == 0, res
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mpp"] is None
    warning = next(line for line in res.err_lines if "no recorded mpp" in line)
    assert "the encoder default was trained at 0.972 um/px: --mpp=0.972 if the patches were cut at that" in warning


def test_settings_for_the_other_kind_of_training_are_refused(pcam_small: Path, tmp_path: Path) -> None:
    """`recipe` small, image augmentation and the other settings of a whole network are one line with an encoder
    (even at their default values when given: `--flips`), as `head` and `embedding_cache` are without one."""
    for args, said in ((["--encoder", "default", "--recipe", "small"], "--recipe small sets a whole network's"),
                       (["--encoder", "default", "--flips", "--hed-jitter", "0.2"],
                        "--flips/--no-flips, --hed-jitter apply only to a whole network"),
                       (["--encoder", "default", "--color-jitter", "0.1", "--frozen-epochs", "2", "--compile",
                         "--cache-limit", "10"],
                        "--color-jitter, --frozen-epochs, --compile, --cache-limit apply only to a whole network"),
                       (["--arch", "screen_cnn32", "--head", "linear"],
                        "--head applies only to a head on an --encoder; --arch screen_cnn32 trains a whole network"),
                       (["--arch", "screen_cnn32", "--head", "mlp", "--embedding-cache", str(tmp_path / "c")],
                        "--head, --embedding-cache apply only to a head on an --encoder")):
        res = run_cli("train", pcam_small, *args, "-o", tmp_path / "m")
        assert res.code == 1 and len(res.err_lines) == 1 and res.err_lines[0].startswith("wsi-screen: error: "), res
        assert said in res.err and "Traceback" not in res.err, res
    assert not (tmp_path / "m").exists()
    from wsi_screen.errors import ConfigError
    from wsi_screen.training.config import TrainConfig

    with pytest.raises(ConfigError, match="`flips` applies only to a whole network"):
        TrainConfig(arch="", encoder="default", flips=False)
    with pytest.raises(ConfigError, match="`head` applies only to a head on an `encoder`"):
        TrainConfig(arch="resnet10t", head="mlp")
    assert TrainConfig(arch="", encoder="default", recipe="auto").applied()["recipe"] is None
    assert TrainConfig(arch="resnet10t", recipe="small").applied()["head"] is None


def test_a_config_file_holding_the_defaults_serves_both_kinds_of_training(
        pcam_small: Path, head_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --config file that spells out the augmentation defaults (or `head`'s) used to make `train --encoder`
    (or `--arch`) refuse them as if typed; a value from the file is refused only where it differs from its default,
    as on the command line any value is."""
    folder, cache = head_model
    monkeypatch.setattr(embeddings, "embed_rows", lambda *_a, **_k: pytest.fail("embeddings computed again"))
    cfg = tmp_path / "wsi-screen.toml"
    cfg.write_text("[train]\nflips = true\nhed-jitter = 0.05\ncolor_jitter = 0.1\nfrozen-epochs = 2\n"
                   "compile = false\ncache-limit = 4096\nhead = \"linear\"\n")
    res = run_cli("--config", cfg, "train", pcam_small, "--encoder", "default", "--mpp", "0.972", "--epochs", "15",
                  "--batch-size", "32", "--embedding-cache", cache, "-o", tmp_path / "m", "--quiet")
    assert res.code == 0, res
    spec = load_model(tmp_path / "m", precision="fp32").spec
    assert spec.head == {"kind": "linear", "dim": 512, "hidden": None}
    assert spec.train_config["flips"] is None
    assert spec.train_config["overrides"] == ["embedding_cache", "epochs", "head"]  # none of the file's defaults
    assert spec.metrics["auc"] == pytest.approx(load_model(folder).spec.metrics["auc"])
    # a whole network reads the same file's `head` = linear as its default: refused neither (here the run goes on
    # to the dataset, whose missing column is the first thing wrong)
    res = run_cli("--config", cfg, "train", pcam_small, "--arch", "screen_cnn32", "--label-column", "nope",
                  "-o", tmp_path / "n")
    assert res.code == 1 and "nope" in res.err and "--head" not in res.err, res
    # a value away from the default is refused from the file too
    cfg.write_text("[train]\nflips = false\n")
    res = run_cli("--config", cfg, "train", pcam_small, "--encoder", "default", "-o", tmp_path / "o")
    assert res.code == 1 and res.err_lines == ["wsi-screen: error: --flips/--no-flips applies only to a whole network "
                                               "(images augmented, decoded or compiled, a backbone frozen); a head on "
                                               "an --encoder trains on fixed embeddings"], res


def test_encoder_and_arch_together_are_refused(pcam_small: Path, tmp_path: Path) -> None:
    """The house's one line and exit 1, as the options only a whole network uses are refused with --encoder (it was
    click's usage dump, "Error: ...", which the library's check of the same rule never reached)."""
    res = run_cli("train", pcam_small, "--encoder", "default", "--arch", "resnet18", "-o", tmp_path / "m")
    assert (res.code, res.out) == (1, ""), res
    assert res.err == ("wsi-screen: error: give --arch (train a whole network) or --encoder (train a head on a frozen "
                       "encoder), not both\n")
    assert not (tmp_path / "m").exists()
    from wsi_screen.errors import ConfigError
    from wsi_screen.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"give `arch` .* or `encoder` .*, not both"):
        TrainConfig(arch="resnet18", encoder="default")
    res = run_cli("train", pcam_small, "-o", tmp_path / "m")
    assert res.code != 0 and "--encoder" in res.err


def test_a_head_records_the_environment_a_whole_network_does(head_model: tuple[Path, Path]) -> None:
    """train_config names the thread count, torch and timm versions, the device and the arithmetic for a head too
    (timm builds the encoder; the embeddings' arithmetic is what a GPU changes), as docs/classifier.md says."""
    import timm
    import torch

    folder, _cache = head_model
    recorded = load_model(folder, precision="fp32").spec.train_config
    assert recorded["timm_version"] == timm.__version__ and recorded["torch_version"] == torch.__version__
    assert recorded["mixed_precision"] == "fp32" and recorded["device"] == {"type": "cpu"}
    assert recorded["threads"] == torch.get_num_threads()


def test_another_carved_split_of_the_same_images_reuses_their_embeddings(
        patches_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image's embedding is the same whatever its role: another seed carving another validation split, or the
    dataset folder moved, reads the cache back (with a foundation encoder, GPU-hours), and gives the model the
    embeddings a fresh computation would."""
    import shutil

    data = make_subset(patches_dir / "pcam", tmp_path / "pcam", {"train": 40})  # no valid split: one is carved
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    train(data, tmp_path / "s0", head_config(cache, epochs=3))
    seed1_fresh = train(data, tmp_path / "s1_fresh", head_config(fresh, epochs=3, seed=1))
    moved = tmp_path / "moved"
    shutil.move(data, moved)

    monkeypatch.setattr(embeddings, "embed_rows", lambda *_a, **_k: pytest.fail("embeddings computed again"))
    seed1 = train(moved, tmp_path / "s1", head_config(cache, epochs=3, seed=1))
    assert seed1.spec.train_config["embeddings"]["reused"] is True
    assert (tmp_path / "s0" / "split.csv").read_text() != (tmp_path / "s1" / "split.csv").read_text()
    assert len(list(cache.glob("*.safetensors"))) == 1
    got, want = read_weights(tmp_path / "s1" / "model.safetensors"), read_weights(tmp_path / "s1_fresh" /
                                                                                   "model.safetensors")
    assert set(got) == set(want) and all(bool((got[k] == want[k]).all()) for k in got)
    assert seed1.spec.metrics["auc"] == seed1_fresh.spec.metrics["auc"]


def test_a_heads_training_time_is_the_heads_and_the_embedding_is_timed_apart(pcam_small: Path,
                                                                             tmp_path: Path) -> None:
    """train's "N s of training" (train_config.seconds) is the head's, as a whole network's excludes decoding its
    images; embedding them (the costly part with a foundation encoder) is embeddings.seconds: the two add up to no
    more than the call (they used to overlap, the embedding counted as training)."""
    import time

    started = time.perf_counter()
    result = train(pcam_small, tmp_path / "m", head_config(tmp_path / "cache", epochs=3))
    wall = time.perf_counter() - started
    recorded = result.spec.train_config
    assert recorded["embeddings"]["reused"] is False and recorded["embeddings"]["seconds"] > 0
    assert recorded["seconds"] + recorded["embeddings"]["seconds"] <= wall + 0.1  # each rounded to 0.1 s


def test_an_interrupted_embedding_goes_on_where_it_stopped(pcam_small: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C half-way through embedding the dataset (with a foundation encoder, the hours of a head's training)
    used to lose all of it: the chunks made are kept, a rerun embeds only the rest, and the model is the one an
    uninterrupted run makes."""
    from wsi_screen.training import data as training_data

    monkeypatch.setattr(embeddings, "CHUNK", 64)  # 180 images: chunks of 64, 64 and 52
    whole = train(pcam_small, tmp_path / "whole", head_config(tmp_path / "fresh", epochs=3))
    decoded: list[int] = []

    def interrupted_after(chunks: int):  # type: ignore[no-untyped-def]
        def iter_images(*args, **kwargs):  # type: ignore[no-untyped-def]
            for k, loaded in enumerate(training_data.iter_images(*args, **kwargs)):
                if k == chunks:
                    raise KeyboardInterrupt
                decoded.append(len(loaded.images))
                yield loaded
        return iter_images

    cache = tmp_path / "cache"
    monkeypatch.setattr(embeddings, "iter_images", interrupted_after(1))
    with pytest.raises(KeyboardInterrupt):
        train(pcam_small, tmp_path / "m", head_config(cache, epochs=3))
    assert decoded == [64] and not list(cache.glob("*.safetensors"))
    assert [p.name for p in cache.glob("*.parts/*")] == ["000000000.safetensors"]

    decoded.clear()
    monkeypatch.setattr(embeddings, "iter_images", interrupted_after(99))
    again = train(pcam_small, tmp_path / "m", head_config(cache, epochs=3))
    assert decoded == [64, 52]  # only the rest
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob("*.parts"))
    got, want = read_weights(tmp_path / "m" / "model.safetensors"), read_weights(tmp_path / "whole" /
                                                                                  "model.safetensors")
    assert set(got) == set(want) and all(bool((got[k] == want[k]).all()) for k in got)
    assert again.spec.metrics["auc"] == whole.spec.metrics["auc"]
    stale = next(cache.glob("*.safetensors")).with_suffix(".parts")  # a run killed once the file was written
    stale.mkdir()
    (stale / "000000000.safetensors").write_bytes(b"left")
    train(pcam_small, tmp_path / "m2", head_config(cache, epochs=3))  # reuses the file and removes them
    assert not stale.exists()


def test_a_sub_second_training_is_timed_in_tenths(pcam_small: Path, head_model: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    """A head on cached embeddings trains in well under a second: train's summary said "(0 s of training)".
    Durations under 10 s now carry one decimal; whole seconds above."""
    import re

    from wsi_screen.progress import duration

    _folder, cache = head_model
    res = run_cli("train", pcam_small, "--encoder", "default", "--head", "linear", "--epochs", "2", "--mpp", "0.972",
                  "--embedding-cache", cache, "--threads", "1", "-q", "-o", tmp_path / "m")
    assert res.code == 0, res.err
    found = re.search(r"; (\d+(?:\.\d)?) s in all \((\d+(?:\.\d)?) s of training\)$", res.out.strip())
    assert found, res.out
    training = float(found.group(2))
    recorded = json.loads((tmp_path / "m" / "config.json").read_text())["train_config"]["seconds"]
    assert 0 < training < 10 and abs(training - recorded) <= 0.1, (training, recorded)
    assert [duration(s) for s in (0.04, 0.43, 9.9, 9.96, 12.6, 125.2)] == ["0.0", "0.4", "9.9", "10", "13", "125"]


def test_tune_searches_a_heads_settings_on_the_cached_embeddings(pcam_small: Path, head_model: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    """`tune --encoder E --head mlp` trains one head per setting on the embeddings `train` cached (read once, by
    every trial; the encoder never embeds an image again); before, tune had no --encoder and trained whole
    networks only."""
    folder, cache = head_model
    before = sorted(p.name for p in cache.glob("*.safetensors"))
    res = run_cli("tune", pcam_small, "--encoder", "default", "--head", "mlp", "--mpp", "0.972", "--epochs", "3",
                  "--lr", "1e-4,1e-3", "--embedding-cache", cache, "-o", tmp_path / "tune", "-q")
    assert res.code == 0, res
    assert sorted(p.name for p in cache.glob("*.safetensors")) == before  # the same cache file, not a new one
    cached = load_model(folder).spec.train_config["embeddings"]["cache"]
    with (tmp_path / "tune" / "trials.csv").open(newline="") as fh:
        trials = list(csv.DictReader(fh))
    assert [t["lr"] for t in trials] == ["0.0001", "0.001"]
    for t in trials:
        spec = json.loads((Path(t["model_dir"]) / "config.json").read_text())
        assert (spec["arch"], spec["head"]["kind"]) == ("default+mlp", "mlp")
        assert spec["train_config"]["lr"] == float(t["lr"])
        assert spec["train_config"]["embeddings"]["cache"] == cached and spec["train_config"]["embeddings"]["reused"]
    best = load_model(tmp_path / "tune" / "best", precision="fp32").spec
    assert best.encoder is not None and best.encoder["name"] == "default" and best.head is not None
    assert best.head["kind"] == "mlp" and best.metrics["auc"] > 0.8


def test_a_heads_search_records_its_embedding_pass_once(pcam_small: Path, tmp_path: Path) -> None:
    """A 2-trial head search on a fresh cache embeds the images once: tune.json's ``embeddings`` records that pass
    (not read back, seconds > 0), and each trial's config.json records 0 embedding seconds (shared), so summing the
    trials does not count the pass twice (before, every trial's config.json claimed the whole pass as its own)."""
    from wsi_screen.training.tune import tune

    result = tune(pcam_small, tmp_path / "tune", head_config(tmp_path / "cache", epochs=2), {"lr": [1e-4, 1e-3]})
    summary = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert summary["embeddings"]["reused"] is False and summary["embeddings"]["seconds"] > 0
    assert summary["embeddings"]["shared"] is False
    assert len(result.trials) == 2
    for trial in result.trials:
        recorded = json.loads((trial.model_dir / "config.json").read_text())["train_config"]["embeddings"]
        assert recorded["cache"] == summary["embeddings"]["cache"]
        assert (recorded["seconds"], recorded["shared"]) == (0.0, True)
    trials_embedding = sum(json.loads((t.model_dir / "config.json").read_text())["train_config"]["embeddings"]
                           ["seconds"] for t in result.trials)
    assert trials_embedding + summary["embeddings"]["seconds"] == summary["embeddings"]["seconds"]
