"""``--device`` on train, tune, evaluate, predict and infer through the real entry point (this machine has no
GPU, so ``--device cuda`` is tested for real; ``--device cpu`` runs, and the outputs record the device)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.classifier_data import make_subset
from tests.conftest import run_cli
from wsi_screen import progress

COMMANDS = ("train", "tune", "evaluate", "predict", "infer")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.fixture(autouse=True)
def _restore_state() -> Iterator[None]:
    """The CLI sets torch's thread count and the package logger; undo that for other tests."""
    logger = logging.getLogger("wsi_screen")
    saved = (logger.level, logger.propagate, progress.enabled(), torch.get_num_threads())
    yield
    logger.level, logger.propagate = saved[0], saved[1]
    progress.set_enabled(saved[2])
    torch.set_num_threads(saved[3])


@pytest.fixture(scope="module")
def herlev_tiny(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_device"), {"train": 12, "test": 3},
                       label_column="binary_label")


def _args(command: str, data: Path, example_slide: Path, out: Path) -> list[str]:
    train = [str(data), "--arch", "screen_cnn32", "--label-column", "binary_label", "--epochs", "1",
             "--batch-size", "8", "--folds", "1", "--threads", "1", "-o", str(out)]
    return {
        "train": ["train", *train],
        "tune": ["tune", *train, "--batch-size", "8"],
        "evaluate": ["evaluate", str(data), "-o", str(out)],
        "predict": ["predict", str(next((data / "test").rglob("*.jpg")))],
        "infer": ["infer", str(example_slide), "-o", str(out), "--workers", "0"],
    }[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_devices(command: str) -> None:
    res = run_cli(command, "--help")
    text = " ".join(res.out.split())
    assert res.code == 0 and "--device [auto|cpu|cuda|cuda:N|mps]" in text and "[default: auto]" in text


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_without_a_gpu_is_one_line(command: str, device: str, herlev_tiny: Path, example_slide: Path,
                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_cli(*_args(command, herlev_tiny, example_slide, out), "--device", device)
    assert res.code == 1, res
    assert res.err_lines == [f"wsi-screen: error: device '{device}' asked for, but this machine has no CUDA GPU "
                             f"(torch {torch.__version__} sees none); use 'cpu' or 'auto'"], res
    assert not out.exists()  # refused before anything was written


@no_gpu
@pytest.mark.parametrize("command", ["evaluate", "predict", "infer"])
def test_an_absent_gpu_is_refused_before_the_model_is_read(command: str, herlev_tiny: Path, example_slide: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head model's encoder (ViT-L: 10 s) used to load before the device was looked at."""
    from wsi_screen.models.spec import ModelSpec

    def read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was read before the device was checked")

    monkeypatch.setattr(ModelSpec, "read", read)
    res = run_cli(*_args(command, herlev_tiny, example_slide, tmp_path / "out"), "--device", "cuda")
    assert res.code == 1 and len(res.err_lines) == 1, res
    assert res.err_lines[0].startswith("wsi-screen: error: device 'cuda' asked for, but this machine has no CUDA"), res


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_device_name_is_a_usage_error(command: str, herlev_tiny: Path, example_slide: Path,
                                            tmp_path: Path) -> None:
    res = run_cli(*_args(command, herlev_tiny, example_slide, tmp_path / "out"), "--device", "gpu")
    assert res.code == 2, res
    assert "Invalid value for '--device': device 'gpu' is not a device name; use one of auto, cpu, cuda, cuda:N, " \
           "mps" in res.err, res


def test_cpu_runs_and_is_recorded(herlev_tiny: Path, tmp_path: Path) -> None:
    """train, evaluate and predict on --device cpu: the model folder and the evaluation record it (tune maps its
    options onto the same training config as train)."""
    model = tmp_path / "model"
    res = run_cli(*_args("train", herlev_tiny, Path(), model), "--device", "cpu", "--mpp", "0.5", "-q")
    assert res.code == 0, res
    config = json.loads((model / "config.json").read_text())["train_config"]
    assert config["device"] == {"type": "cpu"} and config["mixed_precision"] == "fp32"

    res = run_cli("evaluate", herlev_tiny, "--model", model, "-o", tmp_path / "eval", "--device", "cpu", "-q")
    assert res.code == 0, res
    source = json.loads((tmp_path / "eval" / "metrics.json").read_text())["source"]
    assert source["device"] == {"type": "cpu"} and source["images"] == 6

    images = sorted((herlev_tiny / "test").rglob("*.jpg"))
    res = run_cli("predict", *images, "--model", model, "--device", "cpu", "--json", "-q")
    assert res.code == 0, res
    records = [json.loads(line) for line in res.out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in images]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in records)


@no_gpu
def test_infer_records_the_device(demo_run: Path) -> None:
    """The demo run (``--device`` left at auto, on this CPU-only machine) says where it scored."""
    info = json.loads((demo_run / "run.json").read_text())
    assert info["settings"]["device"] == "auto" and info["model"]["device"] == {"type": "cpu"}
    slide = json.loads(next(demo_run.glob("*/slide.json")).read_text())
    assert slide["model"]["device"] == {"type": "cpu"}
