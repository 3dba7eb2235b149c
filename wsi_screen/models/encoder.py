"""Patch encoders: a network that turns a patch into an embedding (N, D), loaded by name or from a file.

:func:`load_encoder` takes one reference and returns an :class:`Encoder` that carries its identity
(:class:`EncoderIdentity`: name, the sha256 of its weights, input size, mpp, mean/std, pooling, dimension):

* ``default`` or a wsi-screen **model folder**: its backbone (the classifier minus its final layer), with the
  model's own input size, mpp and normalisation;
* a **registry name** (:mod:`wsi_screen.models.encoders`: ``uni``, ``uni2-h``, ``virchow2``, ``h-optimus-0``,
  ``prov-gigapath``, ``phikon-v2``): its hub repository with the keywords, pooling and preprocessing it needs;
* ``hf-hub:ORG/NAME`` or ``timm/NAME.TAG``: a timm model on the Hugging Face hub (``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``);
* a timm **architecture** or registry name with ``weights=FILE`` (``.safetensors``; ``.pth``/``.bin`` are read
  with ``torch.load(weights_only=True)``, which loads tensors and refuses arbitrary objects).

Hub files are fetched through ``huggingface_hub`` into its cache, which honours ``HF_HOME``/``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` (read when loading, not when imported) and the token of ``huggingface-cli login`` or
``HF_TOKEN`` for gated repositories. Weights that are neither cached nor downloadable raise
:class:`~wsi_screen.errors.EncoderNotFoundError`, one line saying which encoder, where it looked, why (offline, the
hub unreachable, no such repository or file, gated) and how to get them. The built network never downloads
anything else (timm is always called with ``pretrained=False``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_screen.errors import EncoderNotFoundError, ModelError, UnknownModelError
from wsi_screen.models.encoders import POOLINGS, EncoderInfo, find_encoder, list_encoders
from wsi_screen.models.spec import CONFIG_NAME, WEIGHTS_NAME, ModelSpec

log = logging.getLogger(__name__)

#: the reference that names the bundled model as an encoder
DEFAULT_REF = "default"
HUB_PREFIX = "hf-hub:"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
#: relative difference between the scale patches reach an encoder at and its own mpp beyond which a run warns
SCALE_RTOL = 0.25


@dataclass(frozen=True, kw_only=True)
class EncoderIdentity:
    """What identifies an encoder and what it expects; recorded in embeddings and in head models' config.json.

    ``ref`` loads the same encoder again (with ``weights`` for a local file); ``weights_sha256`` is the sha256
    of the weights file, checked when a head model loads its encoder.
    """

    name: str
    ref: str
    kind: str  # model-folder, registry, hub, file
    arch: str
    weights: str | None
    weights_sha256: str
    input_size: int
    mpp: float | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    dim: int
    licence: str = ""
    gated: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderIdentity:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in data.items() if k in names}
            kwargs["mean"] = tuple(float(v) for v in kwargs["mean"])
            kwargs["std"] = tuple(float(v) for v in kwargs["std"])
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed encoder record: {exc}") from None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Size, mpp and normalisation, as embeddings record them."""
        return {"input_size": self.input_size, "mpp": self.mpp, "mean": list(self.mean), "std": list(self.std),
                "resize": "bilinear, antialiased"}

    def seen_mpp(self, mpp: float, size: int) -> float:
        """The um/px at which the encoder sees patches of ``size`` px at ``mpp`` um/px (resized to its input size)."""
        return mpp * size / self.input_size

    def scale_note(self, mpp: float | None, size: int) -> str | None:
        """A warning where patches of ``size`` px at ``mpp`` um/px reach the encoder (resized to its input size) at a
        scale more than :data:`SCALE_RTOL` off the one it was trained at; None where they do not, or an mpp is
        unknown. Training a head on the encoder and embedding slides warn with it."""
        if self.mpp is None or mpp is None:
            return None
        seen = self.seen_mpp(mpp, size)
        if math.isclose(seen, self.mpp, rel_tol=SCALE_RTOL):
            return None
        resized = f" (resized from {size} to {self.input_size} px: {seen:.3g} um/px to the encoder)" \
            if size != self.input_size else ""
        return f"the patches are {mpp:.3g} um/px{resized}, the encoder {self.name} was trained at {self.mpp:.3g} um/px"


class EncoderModule(nn.Module):
    """Normalised float images (N, 3, H, W) -> embeddings (N, D): resized to the encoder's input size where they
    differ, then the backbone and its pooling (see :mod:`wsi_screen.models.encoders`)."""

    def __init__(self, backbone: nn.Module, *, pooling: str, input_size: int, prefix_tokens: int = 1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        self.input_size = input_size
        self.prefix_tokens = prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        if self.pooling == "cls":  # a transformers model
            out = self.backbone(pixel_values=x).last_hidden_state[:, 0]
        else:
            out = self.backbone(x)
            if self.pooling == "cls+mean":
                out = torch.cat([out[:, 0], out[:, self.prefix_tokens:].mean(dim=1)], dim=-1)
        return out.flatten(1)


class Encoder:
    """An encoder ready to embed uint8 RGB patches: ``module`` (eval mode, on ``device``) and its ``identity``."""

    def __init__(self, module: EncoderModule, identity: EncoderIdentity, *, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> None:
        from wsi_screen.models.device import resolve_device
        from wsi_screen.models.precision import resolve

        self.identity = identity
        self.device = resolve_device(device)
        self.precision = resolve(precision, self.device)
        self.module = module.to(self.device).eval()
        self._mean = torch.tensor(identity.mean, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self._std = torch.tensor(identity.std, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)

    def __repr__(self) -> str:
        i = self.identity
        return f"Encoder({i.name!r}, dim={i.dim}, input_size={i.input_size}, mpp={i.mpp}, pooling={i.pooling!r})"

    @property
    def dim(self) -> int:
        return self.identity.dim

    def embed_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 embeddings (N, D) on the CPU."""
        from wsi_screen.models.pixels import normalise, to_unit_float
        from wsi_screen.models.precision import autocast

        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ModelError(f"an encoder takes uint8 (N, H, W, 3), got {batch.dtype} {tuple(batch.shape)}")
        x = normalise(to_unit_float(batch.to(self.device, non_blocking=True)), self._mean, self._std)
        with torch.inference_mode(), autocast(self.precision, self.device):
            out = self.module(x)
        return out.float().cpu()

    def embed(self, images: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, D)."""
        from wsi_screen.models.pixels import numpy_to_tensor

        parts = [self.embed_tensor(numpy_to_tensor(images[i:i + batch_size])).numpy()
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


# --- loading ---------------------------------------------------------------------------------------------
def load_encoder(spec: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", precision: str = "fp32") -> Encoder:
    """Load an encoder by reference (see the module docstring); ``weights`` is a local weights file."""
    ref = str(spec)
    kind = _kind(ref, weights)
    mpp = _recorded_mpp(ref, weights, kind)
    if weights is not None:
        module, identity = _from_file(ref, Path(weights), mpp)
    elif kind == "model-folder":
        module, identity = _from_model_folder(ref, mpp)
    elif kind == "registry":
        module, identity = _from_registry(find_encoder(ref), mpp)  # type: ignore[arg-type]
    else:
        module, identity = _from_hub(ref, ref.removeprefix(HUB_PREFIX), None, mpp)
    # the encoder's own record; the patches a command gives it may differ (`embed --mpp/--size` logs its own)
    at = f" at {identity.mpp:g} um/px" if identity.mpp is not None else ", no recorded resolution"
    log.info("encoder %s: %d-dim embeddings; its own input %d px%s (%s pooling)", identity.name, identity.dim,
             identity.input_size, at, identity.pooling)
    return Encoder(module, identity, device=device, precision=precision)


def recorded_mpp(spec: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None) -> float | None:
    """The um/px an encoder reference records for its patches (its identity's ``mpp``), known without building the
    network or reading its weights (a foundation encoder's are GBs): a registry encoder's, a model folder's
    ``config.json``'s; None for a hub reference or an architecture with a weights file, which record none. A
    reference :func:`load_encoder` refuses before reading any weights is refused here alike."""
    ref = str(spec)
    return _recorded_mpp(ref, weights, _kind(ref, weights))


def _kind(ref: str, weights: str | os.PathLike[str] | None) -> str:
    """Which loader a reference goes to: ``file``, ``model-folder``, ``registry`` or ``hub``."""
    if weights is not None:
        return "file"
    if _names_folder(ref):
        return "model-folder"
    if find_encoder(ref) is not None:
        return "registry"
    if _names_hub(ref):
        return "hub"
    raise _unknown(ref)


def _recorded_mpp(ref: str, weights: str | os.PathLike[str] | None, kind: str) -> float | None:
    if kind == "model-folder":
        return ModelSpec.read(_model_folder(ref)).mpp
    if kind == "hub":  # records none; its config (a few KB) is looked up so that a missing encoder says so first
        _hub_config(ref, ref.removeprefix(HUB_PREFIX))
        return None
    info = _file_info(ref, Path(weights))[0] if weights is not None else find_encoder(ref)
    return info.mpp if info else None


def _names_folder(ref: str) -> bool:
    return ref == DEFAULT_REF or Path(ref).is_dir() or Path(ref).name == CONFIG_NAME


def _names_hub(ref: str) -> bool:
    return ref.startswith(HUB_PREFIX) or ref.startswith("timm/")


def _model_folder(ref: str) -> Path:
    from wsi_screen.models import default_model_dir
    from wsi_screen.models.checkpoint import resolve_model_dir

    return default_model_dir() if ref == DEFAULT_REF else resolve_model_dir(Path(ref))


def _unknown(ref: str) -> ModelError:
    import timm

    if Path(ref).is_file():
        return ModelError(f"{ref}: a weights file is not an encoder by itself; name its architecture and pass the "
                          f"file: `encoder`=ARCH `encoder_weights`={ref}")
    if Path(ref).suffix or "/" in ref or os.sep in ref:
        return ModelError(f"{ref}: no such model folder (an encoder is a model folder, a registry name, "
                          "hf-hub:ORG/NAME, timm/NAME.TAG, or an architecture with `encoder_weights`=FILE)")
    if timm.is_model(ref):
        return ModelError(f"{ref} is an architecture without weights: set `encoder_weights`=FILE, or name hub weights "
                          f"(e.g. timm/{ref}.<tag>), or a pathology encoder by name (`list_encoders` lists them)")
    import difflib

    names = [e.name for e in list_encoders()]
    close = difflib.get_close_matches(ref.lower(), names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownModelError(f"unknown encoder {ref!r}{hint} (known: {', '.join(names)}; or a model folder, "
                             "hf-hub:ORG/NAME, timm/NAME.TAG, or an architecture with `encoder_weights`=FILE)")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 8 MB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _from_model_folder(ref: str, mpp: float | None) -> tuple[EncoderModule, EncoderIdentity]:
    from wsi_screen.models import default_model_dir, load_model

    folder = _model_folder(ref)
    bundled = ref == DEFAULT_REF or folder.resolve() == default_model_dir().resolve()
    classifier = load_model(folder, precision="fp32")
    spec = classifier.spec
    if spec.ensemble > 1 or getattr(spec, "encoder", None):
        raise ModelError(f"{folder}: a cross-validated ensemble or a head model cannot serve as an encoder; use a "
                         "single model folder")
    backbone = classifier.module
    reset = getattr(backbone, "reset_classifier", None)
    if not callable(reset):
        raise ModelError(f"{folder}: {spec.arch} cannot drop its classifier (no reset_classifier)")
    reset(0)
    dim = int(getattr(backbone, "num_features", 0)) or _probe_dim(backbone, spec.input_size)
    identity = EncoderIdentity(
        name=DEFAULT_REF if bundled else folder.name, ref=DEFAULT_REF if bundled else str(folder.resolve()),
        kind="model-folder", arch=spec.arch, weights=WEIGHTS_NAME,
        weights_sha256=file_sha256(folder / WEIGHTS_NAME), input_size=spec.input_size, mpp=mpp,
        mean=spec.mean, std=spec.std, pooling="model", dim=dim)
    return EncoderModule(backbone, pooling="model", input_size=spec.input_size), identity


def _probe_dim(module: nn.Module, size: int) -> int:
    with torch.inference_mode():
        module.eval()
        return int(module(torch.zeros(1, 3, size, size)).flatten(1).shape[1])


def _resolved_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Registry keywords with ``mlp_layer``/``act_layer`` names turned into the classes timm needs."""
    import timm.layers

    classes: dict[str, Any] = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": nn.SiLU, "GELU": nn.GELU}
    out = dict(kwargs)
    for key in ("mlp_layer", "act_layer"):
        if isinstance(out.get(key), str):
            out[key] = classes[out[key]]
    return out


def _from_registry(info: EncoderInfo, mpp: float | None) -> tuple[EncoderModule, EncoderIdentity]:
    if info.loader == "transformers":
        return _from_transformers(info, mpp)
    return _from_hub(info.name, info.repo_id, info, mpp)


def _hub_cache() -> Path:
    """The hub cache, from the environment as it is now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser())
    return cache / "huggingface" / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _get_hint(repo: str, alternative: str) -> str:
    return f"get it where there is network with `huggingface-cli download {repo}` (same HF_HOME), or {alternative}"


def _not_found(name: str, repo: str, reason: str, advice: str | None = None) -> EncoderNotFoundError:
    """The error for hub files that cannot be had: ``reason``, then ``advice`` (by default: download them, or name a
    local file); its ``reason`` and ``repo`` let a head model give its own advice (:func:`load_identified`)."""
    if advice is None:
        arch = name if find_encoder(name) is not None else "ARCH"
        advice = _get_hint(repo, f"pass a local file: `encoder`={arch} `encoder_weights`=FILE")
    exc = EncoderNotFoundError(f"{reason}; {advice}")
    exc.reason, exc.repo = reason, repo
    return exc


def _cache_hint(repo: str) -> str:
    """How a head model gets its hub encoder: download it, or copy its cache folder (docs/encoders.md)."""
    return _get_hint(repo, f"copy its cache folder {_hub_cache() / ('models--' + repo.replace('/', '--'))} from a "
                           "machine that has it")


def hub_file(name: str, repo: str, filenames: tuple[str, ...]) -> Path:
    """The first of ``filenames`` that repository ``repo`` has, from the cache or downloaded into it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache = _hub_cache()
    offline = _offline()
    unreachable = False  # online, a file neither cached nor fetched: the hub could not be reached
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=offline))
        except GatedRepoError:
            gated = (f"encoder {name}: {repo} is gated: accept its terms on https://huggingface.co/{repo}, then log "
                     "in (`huggingface-cli login` or HF_TOKEN) and rerun")
            raise _not_found(name, repo, gated, f"or set `encoder`={name} `encoder_weights`=FILE") from None
        except RepositoryNotFoundError:
            raise EncoderNotFoundError(
                f"encoder {name}: no repository {repo} on the hub (or it is gated/private and no token was given: "
                f"`huggingface-cli login` or HF_TOKEN); looked in {cache} too") from None
        except LocalEntryNotFoundError:  # not cached, and offline or the hub unreachable: try the next name
            unreachable = not offline
            continue
        except EntryNotFoundError:
            continue  # the repository has no such file
        except (HfHubHTTPError, OSError) as exc:
            raise _not_found(name, repo, f"encoder {name}: cannot fetch {repo} ({exc}); looked in {cache}") from None
    if offline or unreachable:
        why = "is offline (HF_HUB_OFFLINE)" if offline else "the hub could not be reached (no network?)"
        raise _not_found(name, repo, f"encoder {name}: {repo} is not in the Hugging Face cache {cache} and {why}")
    raise _not_found(name, repo, f"encoder {name}: {repo} on the hub has none of {', '.join(filenames)} (looked in "
                                 f"{cache} too)")


def _hub_config(name: str, repo: str) -> dict[str, Any]:
    path = hub_file(name, repo, ("config.json",))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable hub config of {repo}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the hub config of {repo} is not a JSON object")
    return data


def _from_hub(name: str, repo: str, info: EncoderInfo | None,
              mpp: float | None) -> tuple[EncoderModule, EncoderIdentity]:
    config = _hub_config(name, repo)
    arch = str(config.get("architecture") or (info.arch if info else ""))
    if not arch:
        raise ModelError(f"encoder {name}: the hub config of {repo} names no timm architecture; it may not be a timm "
                         "model (transformers models load by registry name, e.g. phikon-v2)")
    weights = hub_file(name, repo, HUB_WEIGHTS)
    cfg = config.get("pretrained_cfg") or {}
    kwargs = {**(config.get("model_args") or {}), **(info.kwargs if info else {})}
    size = info.input_size if info else int((cfg.get("input_size") or (3, 224, 224))[-1])
    mean = info.mean if info else _triple(cfg.get("mean"), (0.485, 0.456, 0.406))
    std = info.std if info else _triple(cfg.get("std"), (0.229, 0.224, 0.225))
    return _build_timm(name=name, ref=info.name if info else f"{HUB_PREFIX}{repo}", kind="registry" if info else "hub",
                       arch=arch, kwargs=kwargs, weights=weights, size=size, mpp=mpp,
                       mean=mean, std=std, info=info, weights_label=f"{repo}/{weights.name}",
                       hub_classifier=cfg.get("classifier"))


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if not value or len(value) != 3:
        return default
    return (float(value[0]), float(value[1]), float(value[2]))


def _file_info(ref: str, path: Path) -> tuple[EncoderInfo | None, str]:
    """A weights file's registry entry (None for a bare architecture) and architecture, refusing what cannot take a
    weights file, before anything is built or read."""
    from wsi_screen.models.registry import check_arch

    info = find_encoder(ref)
    if info is not None and info.loader != "timm":
        raise ModelError(f"encoder {info.name} is a {info.loader} model: `encoder_weights` works for timm "
                         "architectures only; put its hub files in the Hugging Face cache instead")
    hub, folder = _names_hub(ref), _names_folder(ref)
    if info is None and (hub or folder):
        what, own = ("a hub reference", "the hub's") if hub else ("a model folder", "the folder's own")
        raise ModelError(f"{ref}: `encoder_weights` goes with a timm architecture name (e.g. resnet50), not {what}; "
                         f"name the architecture the file is for, or leave the file out to load {own}")
    arch = info.arch if info else check_arch(ref)
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    return info, arch


def _from_file(ref: str, path: Path, mpp: float | None) -> tuple[EncoderModule, EncoderIdentity]:
    import timm

    from wsi_screen.models.registry import default_cfg

    info, arch = _file_info(ref, path)
    kwargs = dict(info.kwargs) if info else {}
    if info is None:
        with torch.device("meta"):
            cfg = default_cfg(timm.create_model(arch, pretrained=False))
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        mean = _triple(cfg.get("mean"), (0.485, 0.456, 0.406))
        std = _triple(cfg.get("std"), (0.229, 0.224, 0.225))
    else:
        size, mean, std = info.input_size, info.mean, info.std
    return _build_timm(name=info.name if info else arch, ref=info.name if info else arch, kind="file", arch=arch,
                       kwargs=kwargs, weights=path, size=size, mpp=mpp, mean=mean, std=std,
                       info=info, weights_label=str(path.resolve()))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from ``.pth``/``.bin`` with ``torch.load(weights_only=True)`` (tensors
    only; a file that needs arbitrary objects is refused)."""
    from wsi_screen.models.checkpoint import read_weights, sniff

    kind = sniff(path)
    if kind == "safetensors":
        return read_weights(path)
    if kind not in ("zip", "pickle") and path.suffix.lower() not in TORCH_SUFFIXES:
        if path.stat().st_size == 0:  # a failed download or copy: say so, not that its kind is wrong
            raise ModelError(f"{path}: is empty (0 bytes); copy the weights file again")
        if path.suffix.lower() == ".safetensors":
            raise ModelError(f"{path}: cannot be read as safetensors (its header is missing or damaged: a truncated "
                             "or partly copied file?); copy the weights file again")
        raise ModelError(f"{path}: not a weights file (.safetensors, .pth or .bin)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError...: one line either way
        raise ModelError(_unreadable_state(path, str(exc).strip() or type(exc).__name__)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: holds no state dict of tensors")
    return state


def _unreadable_state(path: Path, text: str) -> str:
    """One line of our own for torch's refusal of a file under ``weights_only=True`` (torch's own message is a page
    of advice to unpickle it, which wsi-screen never does)."""
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:  # torch.save(model): a pickled object, not a state dict
        return (f"{path}: holds a pickled object ({found.group(1)}), not tensors only, and wsi-screen does not "
                "unpickle objects; save the model's state dict instead: "
                "safetensors.torch.save_file(model.state_dict(), FILE) or torch.save(model.state_dict(), FILE)")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", text, re.S)
    why = " ".join((detail.group(1) if detail else text.splitlines()[0]).split())
    return f"{path}: cannot be read as tensors only (torch.load weights_only=True): {why}"


def classifier_names(module: nn.Module, extra: Any = None) -> tuple[str, ...]:
    """The names of an architecture's classifier (timm's pretrained config ``classifier``: ``fc``, ``head``,
    ``head.fc``...; ``extra`` adds those a hub config names), whose tensors a classifier-less backbone drops."""
    from wsi_screen.models.registry import default_cfg

    names: list[str] = []
    for value in (default_cfg(module).get("classifier"), extra):
        names += [value] if isinstance(value, str) else [str(v) for v in value or () if isinstance(v, str)]
    return tuple(dict.fromkeys(n for n in names if n))


def _load_backbone_state(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                         classifier: tuple[str, ...] = ()) -> None:
    """Load weights into a classifier-less backbone: the tensors of the classifier (``classifier``: its module
    names) are dropped; any other tensor the backbone lacks, a missing one or another shape is an error."""
    from wsi_screen.models.checkpoint import _few, _strip_prefixes

    target = module.state_dict()
    state = _strip_prefixes(state, target)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    extra = sorted(k for k in state if k not in target)
    dropped = [k for k in extra if any(k == n or k.startswith(n + ".") for n in classifier)]
    unexpected = [k for k in extra if k not in dropped]
    if wrong or missing or unexpected:
        parts = [f"shape mismatch: {_few(wrong)}"] if wrong else []
        parts += [f"missing: {_few(missing)}"] if missing else []
        parts += [f"not in the architecture: {_few(unexpected)}"] if unexpected else []
        raise ModelError(f"{source}: weights do not fit the architecture ({'; '.join(parts)}); are they another "
                         "architecture's (e.g. a deeper model of the same family)?")
    if dropped:
        log.info("%s: %d tensors not used by the encoder (its classifier): %s", source, len(dropped), _few(dropped))
    module.load_state_dict({k: state[k].to(v.dtype) if k in state else v for k, v in target.items()}, strict=True)


def _build_timm(*, name: str, ref: str, kind: str, arch: str, kwargs: Mapping[str, Any], weights: Path, size: int,
                mpp: float | None, mean: tuple[float, float, float], std: tuple[float, float, float],
                info: EncoderInfo | None, weights_label: str,
                hub_classifier: Any = None) -> tuple[EncoderModule, EncoderIdentity]:
    import timm

    from wsi_screen.models.registry import check_arch

    check_arch(arch)
    build = {k: v for k, v in _resolved_kwargs(kwargs).items() if k not in ("num_classes", "pretrained")}
    try:
        backbone = timm.create_model(arch, pretrained=False, num_classes=0, **build)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"encoder {name}: cannot build {arch} with {sorted(build)}: {exc}") from None
    _load_backbone_state(backbone, read_state(weights), str(weights), classifier_names(backbone, hub_classifier))
    pooling = info.pooling if info else "model"
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    module = EncoderModule(backbone, pooling=pooling, input_size=size, prefix_tokens=prefix)
    dim = _probe_dim(module, size)
    if info is not None and dim != info.dim:
        log.warning("encoder %s gives %d-dim embeddings, the registry says %d", name, dim, info.dim)
    identity = EncoderIdentity(name=name, ref=ref, kind=kind, arch=arch, weights=weights_label,
                               weights_sha256=file_sha256(weights), input_size=size, mpp=mpp, mean=mean, std=std,
                               pooling=pooling, dim=dim, licence=info.licence if info else "",
                               gated=info.gated if info else False)
    return module, identity


def _from_transformers(info: EncoderInfo, mpp: float | None) -> tuple[EncoderModule, EncoderIdentity]:
    try:
        import transformers
    except ImportError:
        raise ModelError(f"encoder {info.name} is a transformers model (Dinov2), not a timm one: install "
                         "transformers (`pip install transformers`) to use it") from None
    weights = hub_file(info.name, info.repo_id, ("model.safetensors",))
    hub_file(info.name, info.repo_id, ("config.json",))
    try:
        backbone = transformers.AutoModel.from_pretrained(str(weights.parent), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"encoder {info.name}: transformers cannot load {weights.parent}: {exc}") from None
    module = EncoderModule(backbone, pooling=info.pooling, input_size=info.input_size)
    identity = EncoderIdentity(name=info.name, ref=info.name, kind="registry", arch=type(backbone).__name__,
                               weights=f"{info.repo_id}/{weights.name}", weights_sha256=file_sha256(weights),
                               input_size=info.input_size, mpp=mpp, mean=info.mean, std=info.std,
                               pooling=info.pooling, dim=info.dim, licence=info.licence, gated=info.gated)
    return module, identity


def load_identified(identity: Mapping[str, Any], *, model_dir: str | os.PathLike[str] | None = None,
                    device: str | torch.device = "cpu", precision: str = "fp32") -> Encoder:
    """The encoder a record names (a head model's ``config.json``, in ``model_dir``), checked against the recorded
    weights' sha256. A weights file or model folder no longer at its recorded path is looked for in ``model_dir``
    by its name (:func:`_recorded_source`)."""
    want = EncoderIdentity.from_dict(identity)
    moves = _moves(want)
    weights = _recorded_source(want, model_dir) if moves and want.kind == "file" else None
    ref = str(_recorded_source(want, model_dir)) if moves and want.kind == "model-folder" else want.ref
    try:
        encoder = load_encoder(ref, weights=weights, device=device, precision=precision)
    except EncoderNotFoundError as exc:  # a hub encoder: the advice to name a local file is no use to a head model
        if not exc.repo:
            raise
        raise EncoderNotFoundError(f"{exc.reason}; {_cache_hint(exc.repo)}") from None
    if encoder.identity.weights_sha256 != want.weights_sha256:
        raise ModelError(f"encoder {want.name}: its weights have sha256 {encoder.identity.weights_sha256[:12]}, the "
                         f"model was trained on {want.weights_sha256[:12]} (another version of the encoder)")
    return encoder


#: the folder inside a head model's folder where a moved model finds its encoder (a weights file or a model folder,
#: by its name)
ENCODER_WEIGHTS_DIR = "encoder"


def _moves(want: EncoderIdentity) -> bool:
    """Whether the encoder is a local thing a model moved elsewhere may have to find again: a weights file, or a
    model folder other than the bundled one."""
    return want.kind == "file" or (want.kind == "model-folder" and want.ref != DEFAULT_REF)


def weights_in_use(identity: dict[str, Any], model_dir: str | os.PathLike[str]) -> str | None:
    """For a head model on an encoder file or model folder (``ModelSpec.encoder``): where it is found now, when not
    at its recorded path (a moved model's copy), or why it is not found; None when it is where it was recorded (or
    the encoder is neither)."""
    want = EncoderIdentity.from_dict(identity)
    if not _moves(want) or _found(want, _recorded(want)):
        return None
    try:
        return f"{_recorded_source(want, model_dir)} (the recorded {_noun(want)} is gone; this copy has its sha256)"
    except ModelError as exc:
        return f"none: {exc}"


def _recorded(want: EncoderIdentity) -> Path:
    return Path(want.ref) if want.kind == "model-folder" else Path(str(want.weights))


def _noun(want: EncoderIdentity) -> str:
    return "folder" if want.kind == "model-folder" else "file"


def _found(want: EncoderIdentity, path: Path) -> bool:
    return path.is_dir() if want.kind == "model-folder" else path.is_file()


def _recorded_source(want: EncoderIdentity, model_dir: str | os.PathLike[str] | None) -> Path:
    """An encoder file's weights, or an encoder model folder: at the recorded path, else one of the same name in the
    model folder's ``encoder/`` folder (or, for a file, in the model folder itself): a model moved to another
    machine with its encoder copied into it, checked by the recorded sha256 (a folder's: of its weights file)."""
    recorded, noun = _recorded(want), _noun(want)
    what = "model folder" if noun == "folder" else "weights file"
    if _found(want, recorded):
        return recorded
    if model_dir is None:
        raise ModelError(f"encoder {want.name}: its {what} is not at {recorded}")
    places = [Path(model_dir) / ENCODER_WEIGHTS_DIR / recorded.name]
    if noun == "file" and recorded.name not in (WEIGHTS_NAME, CONFIG_NAME):  # not a name of the model's own files
        places.append(Path(model_dir) / recorded.name)
    named = f"{recorded.name} (sha256 {want.weights_sha256})" if noun == "file" else \
        f"the folder {recorded.name} (its {WEIGHTS_NAME} has sha256 {want.weights_sha256})"
    others = []
    for place in (p for p in places if _found(want, p)):
        weights = place / WEIGHTS_NAME if noun == "folder" else place
        found = file_sha256(weights) if weights.is_file() else None
        if found == want.weights_sha256:
            return place
        others.append(f"{place} has sha256 {found[:12]}" if found else f"{place} has no {WEIGHTS_NAME}")
    if others:
        raise ModelError(f"encoder {want.name}: the model was trained on {named}, but {'; '.join(others)} (another "
                         f"{noun} of that name)")
    raise ModelError(f"encoder {want.name}: its {what} is neither at {recorded} nor in the model folder "
                     f"({places[0]}); copy {named} into {places[0].parent}")
