"""Training survives a kill: per-epoch checkpoints, resume, byte-identical weights (wsi_screen.training.checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.classifier_data import make_subset
from tests.conftest import run_cli
from wsi_screen.models.checkpoint import safetensors_bytes

#: enough to kill a run after its second epoch and leave it work to resume
EPOCHS = 4


@pytest.fixture(scope="module")
def herlev_mid(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Herlev binary, 60 train images per class: epochs long enough to kill one mid-run.

    (It was 120: an epoch still takes over a second here, fifty times the 20 ms the test polls the checkpoint at,
    so the kill lands after epoch 2 and well before epoch 4 ends.)"""
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_mid"), {"train": 60},
                       label_column="binary_label")


@pytest.fixture(scope="module")
def herlev_few(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Herlev binary, 20 train images per class: a training that finishes, for checks that kill nothing."""
    return make_subset(patches_dir / "herlev", tmp_path_factory.mktemp("herlev_few"), {"train": 20},
                       label_column="binary_label")


def _args(dataset: Path, out: Path) -> list[str]:
    return ["train", str(dataset), "--arch", "screen_cnn32", "--size", "32", "--label-column", "binary_label",
            "--epochs", str(EPOCHS), "--patience", "0", "--batch-size", "16", "--threads", "1", "--workers", "0",
            "--seed", "3", "--folds", "1", "-o", str(out), "--quiet"]  # checkpoints: one validation split


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_bytes_do_not_depend_on_metadata_order() -> None:
    import torch

    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4)}
    one = safetensors_bytes(state, {"arch": "x", "format": "pt", "classes": "a,b", "z": "1", "m": "2"})
    two = safetensors_bytes(dict(reversed(list(state.items()))),
                            {"m": "2", "z": "1", "classes": "a,b", "format": "pt", "arch": "x"})
    assert one == two
    n = int.from_bytes(one[:8], "little")
    header = json.loads(one[8:8 + n])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_killed_training_resumes_to_the_same_bytes(herlev_mid: Path, tmp_path: Path) -> None:
    # (that two uninterrupted runs agree is test_train.py's test_training_is_deterministic_under_the_seed)
    whole = tmp_path / "whole"
    assert run_cli(*_args(herlev_mid, whole)).code == 0
    assert not (whole / "checkpoint").exists()  # a finished folder keeps no checkpoint

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "wsi_screen.cli", *_args(herlev_mid, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = killed / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < EPOCHS
    assert not (killed / "config.json").exists() and not (killed / "model.safetensors").exists()

    assert run_cli(*_args(herlev_mid, killed)).code == 0  # the same command resumes
    assert _sha(killed / "model.safetensors") == _sha(whole / "model.safetensors")
    rows = (killed / "history.csv").read_text().splitlines()
    assert len(rows) == EPOCHS + 1 and [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(1, EPOCHS + 1)]
    assert not (killed / "checkpoint").exists()


def test_checkpoint_of_other_settings_is_refused_and_restart_starts_over(herlev_few: Path, tmp_path: Path) -> None:
    from tests.classifier_data import tiny_config
    from wsi_screen.errors import ConfigError
    from wsi_screen.training import checkpoint as train_checkpoint
    from wsi_screen.training.train import train

    out = tmp_path / "m"
    config = tiny_config(epochs=2)
    train(herlev_few, out, config)
    # leave a checkpoint behind as a killed run would, then change a setting
    (out / "config.json").unlink()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.json").write_text(json.dumps({"fingerprint": "other", "tensors": "x"}))
    with pytest.raises(ConfigError, match=r"unreadable training checkpoint|`restart`"):
        train(herlev_few, out, config)
    result = train(herlev_few, out, tiny_config(epochs=2, restart=True))
    assert result.best_epoch >= 1 and (out / "config.json").exists()
    assert not (out / train_checkpoint.CHECKPOINT_DIR).exists()


def test_a_checkpoint_of_other_settings_names_what_differs(herlev_few: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming with an option changed is refused naming that option and both values, not "other settings, data
    or thread count" for the user to guess among forty; the same command still resumes."""
    from wsi_screen.training import checkpoint as train_checkpoint

    real_save = train_checkpoint.save

    def save_then_interrupt(out: Path, **kwargs: object) -> None:
        real_save(out, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # Ctrl-C once epoch 1 is checkpointed

    out = tmp_path / "m"
    args = _args(herlev_few, out)
    monkeypatch.setattr(train_checkpoint, "save", save_then_interrupt)
    assert run_cli(*args).code == 130
    monkeypatch.undo()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epoch"] == 1

    changed = [*args[:args.index("--epochs")], "--epochs", "6", *args[args.index("--epochs") + 2:], "--monitor", "loss"]
    res = run_cli(*changed)
    assert res.code == 1, res
    assert res.err.strip().splitlines()[-1] == (
        f"wsi-screen: error: {out}: holds a checkpoint of a run with other settings (--epochs {EPOCHS}, now 6; "
        "--monitor auto, now loss); rerun with the same options to resume it, or set --restart to start over")
    res = run_cli(*[a for a in args if a != "--quiet"], "--seed", "4")  # another seed carves another split
    assert res.code == 1 and "(--seed 3, now 4; the data (images, labels or split))" in res.err, res
    assert run_cli(*args).code == 0  # the same command resumes it
    assert len((out / "history.csv").read_text().splitlines()) == EPOCHS + 1


def test_the_gradient_scaler_is_checkpointed(tmp_path: Path) -> None:
    """A float16 run (GPUs without bfloat16) resumes with its gradient scaler's scale and growth count, not a
    fresh 65,536 that would skip steps while it backs off again. The scaler runs on the CPU here."""
    import torch

    from wsi_screen.training import checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=100)
    for factor in (float("inf"), 1.0):  # one overflowing step (backs off to 2**15), then one clean step
        loss = model(torch.ones(1, 3)).sum() * factor
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**15 and scaler.state_dict()["_growth_tracker"] == 1
    common = {"settings": checkpoint.run_settings({}, "d"), "model": model, "optimizer": optimizer,
              "schedule": schedule, "generator": torch.Generator().manual_seed(0)}
    best = {"best_state": {k: v.clone() for k, v in model.state_dict().items()}, "best_probs": np.zeros((2, 2))}
    checkpoint.save(tmp_path, epoch=1, stale=0, best_score=0.5, best_epoch=1, history=[], scaler=scaler, **best,
                    **common)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=100)
    assert checkpoint.load(tmp_path, scaler=fresh, **common) is not None
    assert fresh.get_scale() == 2.0**15 and fresh.state_dict()["_growth_tracker"] == 1
    plain = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert plain["scaler"]["scale"] == 2.0**15
    checkpoint.save(tmp_path, epoch=2, stale=0, best_score=0.5, best_epoch=1, history=[], **best,
                    **common)  # float32 or bfloat16: no scaler
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["scaler"] is None
