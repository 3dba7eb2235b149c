"""Checkpoint I/O: safetensors weights + ``config.json``, and nothing that unpickles.

A model folder is ``model.safetensors`` (the state dict) plus ``config.json`` (the
:class:`~wsi_screen.models.spec.ModelSpec`). :func:`save_model` writes both atomically (temporary name,
then rename; the config last, so a folder with a config is complete). Pickle-based files (``torch.save``
``.pt``/``.pth``/``.ckpt``, ``pytorch_model.bin``, ``.pkl``) are refused with :class:`UnsafeFileError`,
detected by their magic bytes as well as by their extension: unpickling runs arbitrary code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as _save_bytes
from torch import nn

from wsi_screen._safe_write import atomic_write_bytes, atomic_write_text
from wsi_screen.errors import ModelError, UnsafeFileError
from wsi_screen.models.registry import classifier_parameter_names
from wsi_screen.models.spec import CONFIG_NAME, WEIGHTS_NAME, ModelSpec

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".joblib")

_CONVERT_HINT = ("convert it once, in an environment you trust, with safetensors.torch.save_file(state_dict, "
                 "'model.safetensors')")


def sniff(path: Path) -> str:
    """Identify a weights file by its first bytes: 'safetensors', 'pickle', 'zip' or 'unknown'."""
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"  # torch.save's zip container holds a pickle (data.pkl)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def check_safe(path: Path) -> None:
    """Raise unless ``path`` is a safetensors file; pickles get :class:`UnsafeFileError`."""
    kind = sniff(path)
    if kind == "safetensors":
        return
    if kind in ("pickle", "zip") or path.suffix.lower() in PICKLE_SUFFIXES:
        what = kind if kind != "unknown" else path.suffix
        raise UnsafeFileError(f"{path}: refusing to load a pickle-based file ({what} format): unpickling can "
                              f"run arbitrary code; {_CONVERT_HINT}")
    raise ModelError(f"{path}: not a safetensors file")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict (on CPU), refusing anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    check_safe(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: corrupt safetensors file: {exc}") from None


def safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file as bytes, its JSON header in sorted key order.

    The safetensors writer emits ``__metadata__`` keys in hash-map order, which differs between processes:
    two runs with equal tensors gave files with different bytes. Sorting the header (same characters, same
    length, offsets unchanged) makes equal states give equal files.
    """
    import json

    raw = _save_bytes(dict(state), metadata=dict(metadata) if metadata else None)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen (same content); keep the writer's own bytes then
        return raw
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:]


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      ) -> None:
    """Write :func:`safetensors_bytes` to ``path`` atomically (fsynced, then renamed)."""
    atomic_write_bytes(path, safetensors_bytes(state, metadata))


def state_for_saving(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors (channels-last weights are made contiguous)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_model(model_dir: str | Path, module: nn.Module, spec: ModelSpec) -> Path:
    """Write ``model.safetensors`` and then ``config.json`` into ``model_dir`` (created if needed)."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = state_for_saving(module)
    metadata = {"format": "pt", "arch": spec.arch, "classes": ",".join(spec.classes)}
    write_safetensors(out / WEIGHTS_NAME, state, metadata)
    atomic_write_text(out / CONFIG_NAME, spec.to_json())
    log.debug("saved %s (%d tensors) to %s", spec.arch, len(state), out)
    return out


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """A model folder from a folder, its config.json or its model.safetensors; pickles are refused."""
    path = Path(path)
    if path.is_file():
        if path.name == CONFIG_NAME:
            return path.parent
        check_safe(path)
        if path.name != WEIGHTS_NAME or not (path.parent / CONFIG_NAME).exists():
            raise ModelError(f"{path}: a bare weights file has no config.json beside it; load a model folder "
                             "(from `wsi-screen train`), or use it as `pretrained` weights for training")
        return path.parent
    if not path.is_dir():
        raise ModelError(f"{path}: no such model folder")
    if not (path / WEIGHTS_NAME).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFileError(f"{path}: holds {', '.join(pickles)} but no {WEIGHTS_NAME}; pickle-based "
                                  f"checkpoints are refused (they can run arbitrary code); {_CONVERT_HINT}")
        raise ModelError(f"{path}: no {WEIGHTS_NAME}; not a wsi-screen model folder")
    return path


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a complete state dict, with a one-line error listing what does not match."""
    target = module.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch: {_few(wrong)}")
        if missing:
            parts.append(f"missing: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_few(unexpected)}")
        raise ModelError(f"{source}: weights do not fit the architecture in config.json ({'; '.join(parts)})")
    module.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# --- transfer learning -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainedReport:
    """What :func:`load_pretrained` did."""

    source: str
    loaded: int
    head_reset: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    spec: ModelSpec | None = None
    #: the member whose weights were taken when the source is a cross-validated ensemble, else None
    ensemble_member: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "loaded": self.loaded, "head_reset": self.head_reset,
                "missing": self.missing, "unexpected": self.unexpected, "ensemble_member": self.ensemble_member}


_PREFIXES = ("module.", "model.", "_orig_mod.")


def _strip_prefixes(state: dict[str, torch.Tensor],
                    target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DataParallel's ``module.``, Lightning's ``model.``, torch.compile's)."""
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k in target for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


_MEMBERS = "members."


def _first_member(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """The first member's tensors of a cross-validated ensemble's state dict (``members.<i>.<name>``, see
    :class:`wsi_screen.models.ensemble.Ensemble`) and the number of members; any other state as it is, 0."""
    if not state or any(k in target for k in state) or not all(k.startswith(_MEMBERS) for k in state):
        return state, 0
    members = {k[len(_MEMBERS):].split(".", 1)[0] for k in state}
    prefix = f"{_MEMBERS}0."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, len(members)


def load_pretrained(module: nn.Module, path: str | Path, *, classes: Sequence[str] | None = None,
                    ) -> PretrainedReport:
    """Initialise ``module`` from local weights: a safetensors state dict (ours or timm's) or a model folder.

    Tensors whose name and shape match are copied. The classifier is kept at its fresh initialisation
    when its shape differs (another number of classes) or, when the file comes with a ``config.json`` and
    ``classes`` (the new model's class names, in output order) is given, when the source's classes are not
    the same list: other names or another order give its outputs another meaning. Any other shape mismatch
    is an error (another architecture); missing and unexpected tensors are logged and reported.

    A cross-validated model folder (an ensemble of fold models) gives its first member's weights (member 0,
    the first fold's model): the members start from different seeds, so their weights cannot be averaged
    into one network. Nothing is downloaded.
    """
    path = Path(path)
    spec: ModelSpec | None = None
    if path.is_dir():
        model_dir = resolve_model_dir(path)
        if (model_dir / CONFIG_NAME).exists():
            spec = ModelSpec.read(model_dir)
        weights = model_dir / WEIGHTS_NAME
    else:
        weights = path
        if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).exists():
            spec = ModelSpec.read(path.parent)
    state = read_weights(weights)
    target = module.state_dict()
    state = _strip_prefixes(state, target)
    state, n_members = _first_member(state, target)
    if n_members:
        log.info("%s: a cross-validated ensemble of %d fold models; starting from member 0 (the first fold's "
                 "model: the members start from different seeds, so their weights are not averaged)", weights,
                 n_members)
    head = classifier_parameter_names(module)
    renamed = classes is not None and spec is not None and list(classes) != list(spec.classes)
    merged: dict[str, torch.Tensor] = {}
    head_reset: list[str] = []
    wrong: list[str] = []
    for key, value in state.items():
        if key not in target:
            continue
        if key in head and renamed:
            head_reset.append(key)
        elif value.shape == target[key].shape:
            merged[key] = value.to(target[key].dtype)
        elif key in head:
            head_reset.append(key)
        else:
            wrong.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
    if wrong:
        raise ModelError(f"{weights}: tensors do not fit this architecture (another model?): {_few(wrong)}")
    if not merged:
        example = _few(sorted(state)[:3]) if state else "none"
        expected = _few(sorted(target)[:3])
        raise ModelError(f"{weights}: none of its {len(state)} tensors match {type(module).__name__}'s "
                         f"parameter names (file has e.g. {example}; expected e.g. {expected})")
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in merged and k not in head_reset
                     and not k.endswith("num_batches_tracked"))
    head_missing = [k for k in missing if k in head]
    if missing and missing != head_missing:
        log.warning("%s: %d tensors of the architecture are not in the file and keep their random "
                    "initialisation: %s", weights, len(missing), _few(missing))
    if unexpected:
        log.warning("%s: %d tensors in the file are not used by the architecture: %s", weights,
                    len(unexpected), _few(unexpected))
    if renamed and spec is not None and classes is not None:
        log.info("%s: classifier re-initialised: the classes [%s] are not the source's [%s] (%s)", weights,
                 ", ".join(classes), ", ".join(spec.classes), _few(head_reset or head_missing))
    elif head_reset or head_missing:
        log.info("%s: classifier re-initialised for the new class set (%s)", weights,
                 _few(head_reset or head_missing))
    full = {**target, **merged}
    module.load_state_dict(full, strict=True)
    log.info("initialised %d of %d tensors from %s", len(merged), len(target), weights)
    return PretrainedReport(source=str(weights), loaded=len(merged), head_reset=head_reset or head_missing,
                            missing=missing, unexpected=unexpected, spec=spec,
                            ensemble_member=0 if n_members else None)
