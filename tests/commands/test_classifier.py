"""The classifier commands through the real entry point: help, a full round, and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.classifier_data import make_subset
from wsi_screen.cli import cli, main
from wsi_screen.training.tune import SEARCHABLE

COMMANDS = ("models", "train", "evaluate", "predict", "tune")


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """`--threads` sets torch's thread count for the whole process; put it back for other tests (``main`` puts
    back the logging and the bars itself)."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def herlev_small(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_cli"), {"train": 16, "test": 4},
                       label_column="binary_label")


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``wsi-screen ARGS`` through main(); returns (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--quiet" in result.output


def test_help_stays_light() -> None:
    code = ("import sys\nfrom wsi_screen.cli import main\n"
            "for c in ('train', 'evaluate', 'predict', 'tune', 'models'):\n"
            "    try:\n        main([c, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_models_lists_screen_cnn32_with_its_size(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["models"], capsys)
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("screen_cnn32"))
    assert "2,534,402" in line and " 32 " in line
    code, out, _ = run(["models", "resnet1*"], capsys)
    assert code == 0 and "resnet18" in out and "11,177,538" in out
    code, _, err = run(["models", "resnt50"], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "did you mean" in err


@pytest.mark.slow
def test_train_evaluate_predict_tune(herlev_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    code, out, err = run(["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
                          "--epochs", "2", "--batch-size", "16", "--mpp", "0.5", "--threads", "1", "-q",
                          "-o", str(model)], capsys)
    assert code == 0, err
    assert "best epoch" in out and "threshold" in out and err == ""
    config = json.loads((model / "config.json").read_text())
    # the patches' 0.5 um/px at the 32 px the model takes (the most common Herlev size resized; it was 0.5)
    common = max(config["data"]["image_sizes"].items(), key=lambda item: item[1])[0]
    mpp = 0.5 * int(common.split("x")[0]) / 32
    assert config["mpp"] == pytest.approx(mpp) and mpp > 0.5 and config["train_config"]["epochs"] == 2
    domain = json.loads((model / "domain.json").read_text())  # fitted on train, threshold on valid
    assert domain["fitted_on"]["split"] == "train" and domain["calibrated_on"]["n"] == config["data"]["n_valid"]
    card = json.loads((model / "card.json").read_text())
    assert card["intended_use"]["mpp"] == pytest.approx(mpp)
    assert card["intended_use"]["classes"] == ["abnormal", "normal"]
    code, out, _ = run(["models", "--card", str(model)], capsys)
    assert code == 0 and "tissue: TO COMPLETE   <-- complete this" in out
    assert "research_use: Research use only, not for diagnosis." in out

    evaluation = tmp_path / "eval"
    code, out, err = run(["evaluate", str(herlev_small), "--model", str(model), "-o", str(evaluation)], capsys)
    assert code == 0, err
    assert "label column 'binary_label'" in err  # taken from the model
    assert "resized to the model input" in err  # test images are 200 px, the model takes 32
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["source"]["split"] == "test"
    assert 0.0 <= metrics["domain"]["flagged_fraction"] <= 1.0 and "out of domain" in out
    with (evaluation / "predictions.csv").open() as fh:
        header = fh.readline().strip().split(",")
    assert header[-2:] == ["domain_distance", "in_domain"]
    for key in ("accuracy", "precision", "recall", "f1", "auc", "balanced_accuracy", "sensitivity",
                "specificity", "confusion_matrix", "per_class", "macro"):
        assert key in metrics
    assert (evaluation / "roc.png").exists() and (evaluation / "confusion.png").exists()

    image = next((herlev_small / "test").rglob("*.jpg"))
    code, out, err = run(["predict", str(image), "--model", str(model), "--json"], capsys)
    assert code == 0, err
    record = json.loads(out)
    assert record["predicted"] in ("abnormal", "normal") and set(record["probabilities"]) == {"abnormal", "normal"}
    assert record["domain_distance"] >= 0 and isinstance(record["in_domain"], bool)
    # one number, one rounding: it was 0.045757 in probabilities and 0.04575711488723755 as positive_probability
    assert record["positive_probability"] == record["probabilities"][record["positive_class"]]
    assert record["positive_probability"] == round(record["positive_probability"], 6)
    code, out, _ = run(["predict", str(herlev_small / "test"), "--model", str(model)], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 1 + 8

    code, out, err = run(["tune", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
                          "--epochs", "1", "--lr", "1e-3,1e-4", "--batch-size", "16", "--optimizer", "adam",
                          "--threads", "1", "-q", "-o", str(tmp_path / "tune")], capsys)
    assert code == 0, err
    assert "<- best" in out and (tmp_path / "tune" / "best" / "config.json").exists()


def test_error_paths_are_one_line(herlev_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["train", str(herlev_small), "--arch", "resnet5O", "-o", str(tmp_path / "m")], "did you mean"),
        (["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "diagnosis",
          "-o", str(tmp_path / "m")], "no column 'diagnosis'"),
        (["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
          "--group-column", "patient", "-o", str(tmp_path / "m")], "--group-column"),
        (["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
          "--size", "64", "-o", str(tmp_path / "m")], "takes 32x32"),
        (["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
          "--threshold-rule", "sens>0.9", "-o", str(tmp_path / "m")], "threshold rule"),
        (["evaluate", str(herlev_small), "--model", str(tmp_path), "-o", str(tmp_path / "e")], "model.safetensors"),
    ]
    for args, message in cases:
        code, _, err = run([*args, "-q"], capsys)
        assert code == 1, args
        assert err.startswith("wsi-screen: error: ") and message in err, err
        assert err.strip().count("\n") == 0, err


def test_model_errors_through_the_cli(herlev_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_screen.models import ModelSpec, create_model, save_model

    seven = ModelSpec(arch="screen_cnn32", classes=[f"c{i}" for i in range(7)], input_size=32)
    save_model(tmp_path / "seven", create_model("screen_cnn32", num_classes=7), seven)
    code, _, err = run(["evaluate", str(herlev_small), "--model", str(tmp_path / "seven"), "-o",
                        str(tmp_path / "e")], capsys)
    assert code == 1 and "model's classes are c0" in err and err.strip().count("\n") == 0

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(create_model("screen_cnn32", num_classes=2).state_dict(), pickled / "model.pth")
    code, _, err = run(["predict", str(next(herlev_small.rglob("*.jpg"))), "--model", str(pickled)], capsys)
    assert code == 1 and "refused" in err and "model.pth" in err

    code, _, err = run(["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
                        "--pretrained", str(pickled / "model.pth"), "-o", str(tmp_path / "m")], capsys)
    assert code == 1 and "pickle" in err

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    binary = ModelSpec(arch="screen_cnn32", classes=["abnormal", "normal"], input_size=32, positive_class="abnormal",
                       threshold=0.5)
    save_model(tmp_path / "binary", create_model("screen_cnn32", num_classes=2), binary)
    code, _, err = run(["predict", str(bad), "--model", str(tmp_path / "binary")], capsys)
    assert code == 1 and "bad.jpg: unreadable image" in err

    code, _, err = run(["evaluate", str(herlev_small), "--model", str(tmp_path / "binary"), "--split", "valid",
                        "-o", str(tmp_path / "e")], capsys)
    assert code == 1 and "split 'valid' is empty" in err


def test_train_weights_without_an_encoder_is_refused_in_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The house's one line and exit 1, as for the other options that do not go together with (or without)
    --encoder (--arch with --encoder, --flips with --encoder): it was click's usage dump and exit 2, unlike them."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code, out, err = run(["train", str(tmp_path), "--arch", "screen_cnn32", "--weights", str(weights),
                          "-o", str(tmp_path / "m")], capsys)
    assert (code, out) == (1, ""), err
    assert err == ("wsi-screen: error: --weights is an --encoder's file (name the architecture it is for with "
                   "--encoder); a whole network starts from local weights with --pretrained\n")
    assert not (tmp_path / "m").exists()
    # with neither --arch nor --encoder, the option given is refused first, in the same line and exit 1 (it was
    # "Missing option '--arch'", exit 2, while docs/encoders.md promises the one-line refusal of --weights)
    code, out, err = run(["train", str(tmp_path), "--weights", str(weights), "-o", str(tmp_path / "m")], capsys)
    assert (code, out) == (1, ""), err
    assert err == ("wsi-screen: error: --weights is an --encoder's file (name the architecture it is for with "
                   "--encoder); a whole network starts from local weights with --pretrained\n")
    for args, said in ((["--head", "mlp"], "--head applies only to a head on an --encoder\n"),
                       (["--embedding-cache", str(tmp_path / "c")],
                        "--embedding-cache applies only to a head on an --encoder\n")):
        code, out, err = run(["train", str(tmp_path), *args, "-o", str(tmp_path / "m")], capsys)
        assert (code, out, err) == (1, "", f"wsi-screen: error: {said}")
    # with none of them, what is missing is said (a usage error: one line, exit 2)
    code, out, err = run(["train", str(tmp_path), "-o", str(tmp_path / "m")], capsys)
    assert code == 2 and err == ("wsi-screen: error: Missing option '--arch' (a network to train) or --encoder "
                                 "(a frozen encoder to train a head on). (see wsi-screen train --help)\n")
    assert not (tmp_path / "m").exists()


def test_predict_prints_one_column_per_class_and_goes_on_past_a_bad_file(
        herlev_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It used to print both p(abnormal) and p_abnormal, and to stop at the first file that is not an image."""
    from wsi_screen.models import ModelSpec, create_model, save_model

    torch.manual_seed(0)
    binary = ModelSpec(arch="screen_cnn32", classes=["abnormal", "normal"], input_size=32, positive_class="abnormal",
                       threshold=0.5)
    save_model(tmp_path / "binary", create_model("screen_cnn32", num_classes=2), binary)
    images = sorted((herlev_small / "test").rglob("*.jpg"))[:2]
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    code, out, err = run(["predict", str(images[0]), str(notes), str(images[1]), "--model", str(tmp_path / "binary"),
                          "-q"], capsys)
    lines = out.strip().splitlines()
    assert lines[0].split("\t") == ["path", "predicted", "p_abnormal", "p_normal"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == [str(images[0]), str(images[1])]  # the others are still predicted
    assert all(len(r) == 4 and abs(float(r[2]) + float(r[3]) - 1) < 1e-3 for r in rows)
    errors = [line for line in err.splitlines() if line.startswith("wsi-screen: error: ")]
    assert code == 1 and len(errors) == 1, err  # one line for the file that is not an image
    assert errors[0].startswith(f"wsi-screen: error: {notes}: unreadable image ("), err
    assert errors[0].endswith(")") and "dataset" not in errors[0], err  # predict has no dataset to fix it in


def test_infer_sets_torch_threads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`infer --threads`, as train and evaluate have it (the fixture restores torch's count)."""
    (tmp_path / "empty").mkdir()
    code, _, err = run(["infer", str(tmp_path / "empty"), "-o", str(tmp_path / "run"), "--threads", "3"], capsys)
    assert code == 1 and "no slides to screen" in err  # refused after the model was set up with 3 threads
    assert torch.get_num_threads() == 3


def test_predict_has_threads_and_says_what_batch_size_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`predict --threads`, as infer and evaluate have it; `--batch-size` has help text like theirs."""
    help_text = CliRunner().invoke(cli, ["predict", "--help"], terminal_width=200).output
    assert "--threads INTEGER RANGE" in help_text and "Torch compute threads." in help_text
    assert "--batch-size INTEGER RANGE" in help_text and "Images per forward pass." in help_text
    code, _, err = run(["predict", str(tmp_path), "--threads", "3"], capsys)  # an empty folder: refused after
    assert code == 1 and f"{tmp_path}: no image files found" in err, err  # the model was set up with 3 threads
    assert torch.get_num_threads() == 3


def test_cross_validated_training_names_its_out_of_fold_auc() -> None:
    """Its AUC is of pooled out-of-fold predictions, not a validation split's: the summary line of `train` used to
    call it "valid AUC". (The figures as fit_folds records them; a real 2-fold run takes ~20 s here.)"""
    from wsi_screen.commands.train import result_parts
    from wsi_screen.models import ModelSpec
    from wsi_screen.models.card import draft

    metrics = {"auc": 0.875, "balanced_accuracy": 0.75, "sensitivity": 1.0, "specificity": 0.5, "n": 16,
               "cross_validation": {"folds": 2, "per_fold": [], "auc_mean": 0.8, "auc_sd": 0.1}}
    spec = ModelSpec(arch="screen_cnn32", classes=["abnormal", "normal"], input_size=32, positive_class="abnormal",
                     threshold=0.4682, metrics=metrics)
    line = ", ".join(result_parts(spec, 1, 1))
    assert "out-of-fold AUC 0.875" in line and "(out-of-fold sensitivity 1.000, specificity 0.500)" in line
    assert "valid" not in line
    assert draft(spec)["validation"]["data"].startswith("pooled out-of-fold predictions of 2-fold cross-validation")
    single = ModelSpec(arch="screen_cnn32", classes=["abnormal", "normal"], input_size=32, positive_class="abnormal",
                       threshold=0.5, metrics={k: v for k, v in metrics.items() if k != "cross_validation"})
    assert "valid AUC 0.875" in ", ".join(result_parts(single, 1, 1))


def test_evaluate_warns_when_the_images_trained_the_model(patches_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Cross-validation trains on the dataset's valid split too: evaluating that split with the model scored images
    it trained on and said nothing. Now one line says how many, and metrics.json records it; a held-out split
    stays silent."""
    from tests.classifier_data import read_rows, write_rows

    data = make_subset(patches_dir / "herlev", tmp_path / "herlev", {"train": 14, "test": 3},
                       label_column="binary_label")
    rows = read_rows(data)
    for row in [r for r in rows if r["split"] == "train"][::2]:
        row["split"] = "valid"  # 7 of each class
    write_rows(data, rows)
    model = tmp_path / "model"
    code, out, err = run(["train", str(data), "--arch", "screen_cnn32", "--label-column", "binary_label", "--folds",
                          "2", "--epochs", "1", "--batch-size", "16", "--mpp", "0.5", "--threads", "1",
                          "-o", str(model)], capsys)
    assert code == 0, err
    assert "the dataset's 14 valid images train the model too: evaluate it on --split test, or set --carve-valid " \
           "to keep them held out" in err  # said as training starts
    # the summary's time was the training loop's alone (58 s of a 113 s run): now the whole run's, and the loop's
    assert re.search(r"; \d+(\.\d)? s in all \(\d+(\.\d)? s of training\)$", out.strip()), out
    code, _, err = run(["evaluate", str(data), "--model", str(model), "--split", "valid", "-q",
                        "-o", str(tmp_path / "eval-valid")], capsys)
    assert code == 0, err
    line = next(x for x in err.splitlines() if "trained this model" in x)
    assert "14 of the 14 images evaluated trained this model (cross-validation trains on the dataset's train and " \
           "valid images" in line
    assert "--split test" in line and "--carve-valid" in line and "`" not in line
    metrics = json.loads((tmp_path / "eval-valid" / "metrics.json").read_text())
    assert metrics["source"]["images_that_trained_the_model"] == 14
    code, _, err = run(["evaluate", str(data), "--model", str(model), "-q", "-o", str(tmp_path / "eval-test")],
                       capsys)
    assert code == 0 and "trained this model" not in err, err
    assert json.loads((tmp_path / "eval-test" / "metrics.json").read_text())["source"][
        "images_that_trained_the_model"] == 0


def test_interrupted_cross_validation_says_a_rerun_starts_over(herlev_small: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-validated runs are not checkpointed, yet Ctrl-C said "rerun to resume" and `train --help` promised a
    resume for every run. Now the run says so as it starts and on Ctrl-C; a single-split run keeps its promise."""
    from wsi_screen.training.loop import Loop

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Loop, "train_epoch", interrupt)
    common = ["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label", "--epochs", "1",
              "--mpp", "0.5", "--threads", "1"]
    code, _, err = run([*common, "--folds", "2", "-o", str(tmp_path / "cv")], capsys)
    assert code == 130
    assert "cross-validated training is not checkpointed: if interrupted, a rerun starts again at epoch 1 " \
           "(--folds 1 trains one checkpointed model)" in err
    assert err.strip().splitlines()[-1] == "wsi-screen: interrupted; cross-validated training is not checkpointed: " \
                                          "a rerun starts again at epoch 1"
    code, _, err = run([*common, "--folds", "1", "-o", str(tmp_path / "one")], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "wsi-screen: interrupted; finished work is kept, rerun " \
                                                           "to resume"
    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert "Cross-validated runs (--folds, by default below 3,000 images) are not checkpointed" in help_text


def test_tune_follows_the_recipe_unless_told(herlev_small: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """tune's --optimizer defaulted to adamw and overrode the small recipe's adam (train says adam on the same
    data); now, as for train, the recipe's optimiser and learning rate stand unless --optimizer / --lr are given."""
    import csv

    common = ["tune", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label", "--epochs", "1",
              "--mpp", "0.5", "--threads", "1", "-q"]
    code, _, err = run([*common, "--batch-size", "16", "-o", str(tmp_path / "recipe")], capsys)
    assert code == 0, err
    with (tmp_path / "recipe" / "trials.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert (row["optimizer"], float(row["lr"]), row["batch_size"]) == ("adam", 1e-3, "16")
    chosen = json.loads((tmp_path / "recipe" / "best" / "config.json").read_text())["train_config"]
    assert chosen["recipe"] == "small" and chosen["optimizer"] == "adam"
    # tune.json's space: every searchable setting, null where not searched (weight_decay was absent)
    space = json.loads((tmp_path / "recipe" / "tune.json").read_text())["space"]
    assert space == {**dict.fromkeys(SEARCHABLE), "batch_size": [16]}
    code, _, err = run([*common, "--optimizer", "adamw,sgd", "-o", str(tmp_path / "given")], capsys)
    assert code == 0, err
    with (tmp_path / "given" / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["optimizer"] for r in rows] == ["adamw", "sgd"]
    # a searched optimiser brings its own lr and weight decay, not the small recipe's Adam ones (1e-3, 0)
    assert [float(r["lr"]) for r in rows] == [1e-3, 0.01]
    # --batch-size not given: not searched (null, it showed [64]), each trial trains with train's 64
    assert [r["batch_size"] for r in rows] == ["64", "64"] and [float(r["weight_decay"]) for r in rows] == [0.05, 1e-4]
    space = json.loads((tmp_path / "given" / "tune.json").read_text())["space"]
    assert space == {**dict.fromkeys(SEARCHABLE), "optimizer": ["adamw", "sgd"]}
    sgd = json.loads((tmp_path / "given" / "trials" / "002" / "config.json").read_text())["train_config"]
    assert (sgd["optimizer"], sgd["lr"], sgd["weight_decay"], sgd["recipe"]) == ("sgd", 0.01, 1e-4, "small")


def test_interrupted_search_says_it_does_not_resume(herlev_small: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted tune said 'rerun to resume', and the rerun was refused ('already holds a search')."""
    import wsi_screen.training.tune as tune_module

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "fit", interrupt)
    code, _, err = run(["tune", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
                        "--epochs", "1", "--mpp", "0.5", "--threads", "1", "-q", "-o", str(tmp_path / "t")], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "wsi-screen: interrupted; a search does not resume: " \
                                                           "rerun with --overwrite to start it again", err


NON_FINITE = [("--hed-jitter", "nan"), ("--color-jitter", "nan"), ("--warmup-epochs", "nan"), ("--cache-limit", "nan"),
              ("--weight-decay", "nan"), ("--weight-decay", "inf"), ("--lr", "inf"), ("--lr", "nan"),
              ("--valid-fraction", "nan"), ("--label-smoothing", "nan"), ("--drop-rate", "nan"), ("--mpp", "nan")]


@pytest.mark.parametrize(("option", "value"), NON_FINITE)
def test_train_refuses_a_non_finite_setting_before_training(option: str, value: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """click's ranges let NaN through: `--hed-jitter nan` trained, then failed writing config.json and left a half
    folder; `--lr inf` failed after epoch 1. TrainConfig now refuses it, in one line, before the data are read."""
    out = tmp_path / "model"
    code, _, err = run(["train", str(tmp_path), "--arch", "screen_cnn32", "--threads", "1", "--epochs", "1",
                        option, value, "-q", "-o", str(out)], capsys)
    assert code != 0
    assert err.startswith("wsi-screen: error: ") and err.strip().count("\n") == 0, err
    assert option in err and value in err, err
    assert not out.exists()


@pytest.mark.parametrize(("option", "values", "bad"), [("--weight-decay", "0,-1", "-1"), ("--lr", "1e-3,-1", "-1"),
                                                       ("--lr", "1e-3,nan", "nan"), ("--batch-size", "16,nan", "nan")])
def test_tune_refuses_a_value_train_refuses_before_trial_1(option: str, values: str, bad: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`tune --weight-decay 0,-1` trained trial 2 with -1, and `--lr 1e-3,-1` trained trial 1 fully before failing:
    every searched value now meets TrainConfig's checks before the data are read."""
    out = tmp_path / "tune"
    code, _, err = run(["tune", str(tmp_path), "--arch", "screen_cnn32", "--threads", "1", "--epochs", "1",
                        option, values, "-q", "-o", str(out)], capsys)
    assert code != 0
    assert err.startswith("wsi-screen: error: ") and err.strip().count("\n") == 0, err
    assert option in err and bad in err, err
    assert not out.exists()


@pytest.mark.parametrize("folds", ["1", "2"])
def test_a_diverging_training_stops_in_one_line(folds: str, herlev_small: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--optimizer sgd --lr 100` ended in sklearn's 'Input contains NaN' as an internal error: a training loss or
    validation scores that are not finite now stop the run with one line that says what to change."""
    out = tmp_path / "model"
    code, _, err = run(["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
                        "--threads", "1", "--epochs", "2", "--batch-size", "8", "--folds", folds, "--mpp", "0.5",
                        "--optimizer", "sgd", "--lr", "1e6", "-q", "-o", str(out)], capsys)
    assert code == 1
    assert re.fullmatch(r"wsi-screen: error: training diverged at epoch 1 \((train loss nan|validation scores not "
                        r"finite)\); lower --lr", err.strip()), err
    assert not (out / "config.json").exists()


def test_train_with_sgd_under_the_small_recipe_records_sgds_defaults(herlev_small: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--optimizer sgd` on a small dataset trained at the recipe's Adam lr 1e-3 and weight decay 0."""
    out = tmp_path / "model"
    code, _, err = run(["train", str(herlev_small), "--arch", "screen_cnn32", "--label-column", "binary_label",
                        "--threads", "1", "--epochs", "1", "--batch-size", "16", "--folds", "1", "--mpp", "0.5",
                        "--optimizer", "sgd", "-q", "-o", str(out)], capsys)
    assert code == 0, err
    resolved = json.loads((out / "config.json").read_text())["train_config"]
    assert (resolved["recipe"], resolved["optimizer"], resolved["lr"], resolved["weight_decay"]) == \
        ("small", "sgd", 0.01, 1e-4)


def test_the_summary_says_its_balanced_accuracy_is_at_the_threshold() -> None:
    """The epoch lines' `bal. acc` is at the arg-max and the summary's at the threshold, both unlabelled."""
    from types import SimpleNamespace

    from wsi_screen.commands.train import result_parts

    spec = SimpleNamespace(metrics={"auc": 0.9, "balanced_accuracy": 0.8, "sensitivity": 0.95, "specificity": 0.6},
                           threshold=0.3, positive_class="abnormal")
    assert result_parts(spec, 2, 3)[2] == "balanced accuracy 0.800 at the threshold"
    argmax = SimpleNamespace(metrics={"auc": None, "balanced_accuracy": 0.5}, threshold=None, positive_class=None)
    assert result_parts(argmax, 1, 1)[2] == "balanced accuracy 0.500"
