"""Known pathology foundation encoders, as data: what each needs so that a user gives only its name.

Each entry says where the weights live (a Hugging Face hub repository), how to build the network (a timm
architecture and its keywords, or a ``transformers`` model), what it expects (input size, the resolution of its
training patches in um/px, the normalisation mean/std), how one patch's embedding is pooled from the network's
output, the embedding's length, and the weights' licence and gating. Loading is
:func:`wsi_screen.models.encoder.load_encoder`; the ``models`` command lists this table.

Facts are from the model cards and from TRIDENT's (mahmoodlab/TRIDENT) encoder definitions, read for the
settings, not copied. Pooling:

* ``model``: what the timm model returns with its classifier removed (its own global pool: the class token of
  these ViTs, the average pool of a CNN);
* ``cls+mean``: the class token concatenated with the mean of the patch tokens, register tokens skipped
  (Virchow2: 1 class + 4 register tokens come first, so the embedding is 2 x 1280);
* ``cls``: the class token of a ``transformers`` model's ``last_hidden_state`` (Phikon-v2).

This module is light (no torch): listing the registry loads nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from wsi_screen.errors import UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("model", "cls+mean", "cls")
LOADERS = ("timm", "transformers")


@dataclass(frozen=True, kw_only=True)
class EncoderInfo:
    """One known encoder. ``kwargs`` go to ``timm.create_model`` (``mlp_layer``/``act_layer`` named as strings,
    resolved when built); ``arch`` is the timm architecture used for a local weights file."""

    name: str
    hub: str
    arch: str
    input_size: int
    mpp: float
    dim: int
    licence: str
    gated: bool
    loader: str = "timm"
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "model"
    aliases: tuple[str, ...] = ()
    notes: str = ""

    @property
    def repo_id(self) -> str:
        """The hub repository (``ORG/NAME``)."""
        return self.hub.removeprefix("hf-hub:")


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

ENCODERS: dict[str, EncoderInfo] = {e.name: e for e in (
    EncoderInfo(name="uni", hub="hf-hub:MahmoodLab/uni", arch="vit_large_patch16_224", input_size=224, mpp=0.5,
                dim=1024, licence="CC-BY-NC-ND-4.0", gated=True, aliases=("uni_v1", "uni1"),
                kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
                notes="ViT-L/16 (Chen et al. 2024), 20x"),
    EncoderInfo(name="uni2-h", hub="hf-hub:MahmoodLab/UNI2-h", arch="vit_giant_patch14_224", input_size=224, mpp=0.5,
                dim=1536, licence="CC-BY-NC-ND-4.0", gated=True, aliases=("uni2", "uni_v2", "uni2h"),
                kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                        "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                        "dynamic_img_size": True, **_SWIGLU},
                notes="ViT-H/14 with 8 register tokens, 20x"),
    EncoderInfo(name="virchow2", hub="hf-hub:paige-ai/Virchow2", arch="vit_huge_patch14_224", input_size=224,
                mpp=0.5, dim=2560, licence="CC-BY-NC-ND-4.0", gated=True, pooling="cls+mean",
                kwargs={"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
                        "dynamic_img_size": True, **_SWIGLU},
                notes="ViT-H/14, 4 register tokens; class token + mean of patch tokens (2 x 1280); trained at "
                      "5-40x, 20x recommended"),
    EncoderInfo(name="h-optimus-0", hub="hf-hub:bioptimus/H-optimus-0", arch="vit_giant_patch14_reg4_dinov2",
                input_size=224, mpp=0.5, dim=1536, licence="Apache-2.0", gated=False,
                aliases=("hoptimus0", "h_optimus_0"),
                kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
                mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
                notes="ViT-g/14 with 4 register tokens; its own mean/std; 0.5 um/px"),
    EncoderInfo(name="prov-gigapath", hub="hf-hub:prov-gigapath/prov-gigapath", arch="vit_giant_patch14_dinov2",
                input_size=224, mpp=0.5, dim=1536, licence="Apache-2.0", gated=True, aliases=("gigapath",),
                kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                        "mlp_ratio": 5.33334, "dynamic_img_size": True},
                notes="tile encoder (ViT-g, 16 px patches), 20x"),
    EncoderInfo(name="phikon-v2", hub="hf-hub:owkin/phikon-v2", arch="", loader="transformers", input_size=224,
                mpp=0.5, dim=1024, licence="Owkin non-commercial", gated=False, pooling="cls",
                aliases=("phikon_v2", "phikonv2"),
                notes="a transformers Dinov2 (ViT-L/16), not a timm model: needs `pip install transformers`"),
)}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_BY_NAME: dict[str, EncoderInfo] = {
    **{_key(a): e for e in ENCODERS.values() for a in e.aliases},
    **{_key(e.name): e for e in ENCODERS.values()},
}


def find_encoder(name: str) -> EncoderInfo | None:
    """The registry entry for a name or alias (case-insensitive, ``_`` = ``-``), or None."""
    return _BY_NAME.get(_key(name))


def get_encoder_info(name: str) -> EncoderInfo:
    """The registry entry for ``name``; an unknown name raises with the closest known ones."""
    found = find_encoder(name)
    if found is not None:
        return found
    close = difflib.get_close_matches(_key(name), list(_BY_NAME), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `list_encoders` lists them"
    raise UnknownModelError(f"unknown encoder {name!r}{hint}")


def list_encoders(pattern: str = "") -> list[EncoderInfo]:
    """The registry in display order, optionally those whose name or an alias matches a glob pattern (``uni*``;
    case-insensitive, ``_`` = ``-``)."""
    if not pattern:
        return list(ENCODERS.values())
    glob = _key(pattern)
    return [e for e in ENCODERS.values() if any(fnmatch.fnmatchcase(_key(n), glob) for n in (e.name, *e.aliases))]
