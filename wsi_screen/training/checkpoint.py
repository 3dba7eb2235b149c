"""Resumable training: the whole state of a run after each finished epoch, without pickle.

``OUT/checkpoint/`` holds ``epoch-NNNN.safetensors`` (every tensor: model, best-epoch model, optimiser
moments, RNG states (the GPU's too when training there), best validation probabilities) and ``state.json``
(everything else: epoch, early-stopping counter, best score, history rows, optimiser hyper-parameters, scheduler
state, the float16 gradient scaler's state on GPUs without bfloat16, the run's settings, data fingerprint and thread
count, and their fingerprint). The tensors file is written first under a new name, then ``state.json`` naming it is
renamed into place: whichever moment a kill lands on, ``state.json`` points to a complete tensors file.

:func:`load` returns None when there is nothing to resume; a checkpoint of other settings is an error that
names the settings that differ and ``restart``. With the same settings and one torch thread a resumed run ends
with the same bytes as an uninterrupted one (tests/training/test_checkpoint.py kills a run with SIGKILL and
compares hashes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_screen._safe_write import atomic_write_text
from wsi_screen.errors import ConfigError
from wsi_screen.models.checkpoint import read_weights, write_safetensors

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_JSON = "state.json"
FORMAT = 1
#: settings that do not change the numbers a run produces (a resume may differ in them)
NEUTRAL_SETTINGS = ("overwrite", "restart", "workers", "cache_limit_mb")


def run_settings(config: dict[str, Any], data_fingerprint: str) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint: the settings that change its numbers,
    the data and the thread count (as JSON values; ``state.json`` keeps them to name what differs)."""
    kept = {k: v for k, v in config.items() if k not in NEUTRAL_SETTINGS}
    settings: dict[str, Any] = json.loads(json.dumps(
        {"config": kept, "data": data_fingerprint, "threads": torch.get_num_threads()}, default=str))
    return settings


def run_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _differences(saved: Any, settings: dict[str, Any]) -> str:
    """```epochs` 6, now 8; the thread count 1, now 2``: what differs between a checkpoint's settings and these
    (empty where the checkpoint predates recording them)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        return ""
    before, now = saved["config"], settings["config"]

    def word(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    parts = [f"`{k}` {word(before.get(k))}, now {word(now.get(k))}" for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k)]
    if saved.get("data") != settings["data"]:
        parts.append("the data (images, labels or split)")
    if saved.get("threads") != settings["threads"]:
        parts.append(f"the thread count {saved.get('threads')}, now {settings['threads']}")
    return "; ".join(parts)


@dataclass
class Resumed:
    """What a checkpoint gives back to the loop."""

    epoch: int
    stale: int
    best_score: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    best_probs: np.ndarray
    history: list[dict[str, Any]]


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    groups = []
    for g in plain["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save(out: Path, *, settings: dict[str, Any], epoch: int, stale: int, best_score: float, best_epoch: int,
         best_state: dict[str, torch.Tensor], best_probs: np.ndarray, history: list[dict[str, Any]],
         model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
         generator: torch.Generator, scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the state after ``epoch`` (atomically; the previous epoch's tensors are removed after). On a GPU
    also its random-number state (dropout there) and the float16 gradient scaler's scale."""
    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in best_state.items():
        tensors[f"best.{k}"] = v.detach().cpu().contiguous()
    optim_tensors, optim_plain = _split_optimizer(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    device = _device_of(model)
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors["best_probs"] = torch.from_numpy(np.ascontiguousarray(best_probs, dtype=np.float32))
    name = f"epoch-{epoch:04d}.safetensors"
    write_safetensors(folder / name, tensors)
    doc = {"format": FORMAT, "fingerprint": run_fingerprint(settings), "settings": settings, "tensors": name,
           "epoch": epoch, "stale": stale, "best_score": best_score, "best_epoch": best_epoch, "history": history,
           "optimizer": optim_plain, "schedule": schedule.state_dict(),
           "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    try:
        text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=True)
    except TypeError as exc:
        raise ConfigError(f"cannot checkpoint this run's scheduler or optimiser state: {exc}") from exc
    atomic_write_text(folder / STATE_JSON, text + "\n")
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load(out: Path, *, settings: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         schedule: Any, generator: torch.Generator, scaler: torch.amp.GradScaler | None = None) -> Resumed | None:
    """Restore the loop from ``out/checkpoint`` (None when there is none)."""
    folder = out / CHECKPOINT_DIR
    path = folder / STATE_JSON
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        tensors = read_weights(folder / doc["tensors"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{folder}: unreadable training checkpoint ({exc}); set `restart` to start over"
                          ) from exc
    if doc.get("fingerprint") != run_fingerprint(settings):
        differs = _differences(doc.get("settings"), settings)
        raise ConfigError(f"{out}: holds a checkpoint of a run with other "
                          + (f"settings ({differs})" if differs else "settings, data or thread count")
                          + "; rerun with the same options to resume it, or set `restart` to start over")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_join_optimizer(tensors, doc["optimizer"]))
    schedule.load_state_dict(doc["schedule"])
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    device = _device_of(model)
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    if scaler is not None and doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    log.info("resuming from the checkpoint after epoch %d (`restart` starts over)", doc["epoch"])
    return Resumed(epoch=int(doc["epoch"]), stale=int(doc["stale"]), best_score=float(doc["best_score"]),
                   best_epoch=int(doc["best_epoch"]),
                   best_state={k[5:]: v for k, v in tensors.items() if k.startswith("best.")},
                   best_probs=tensors["best_probs"].numpy(), history=list(doc["history"]))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def remove(out: Path) -> None:
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
