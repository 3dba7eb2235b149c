"""Fit a model folder's domain distance on a labelled patch dataset (``wsi-screen train`` does this itself).

    python scripts/fit_domain.py --model wsi_screen/resources/models/default --data ../shared/data/patches/pcam

Features of the dataset's *train* split fit the distance, its *valid* split sets the threshold (1 % flagged);
writes ``domain.safetensors`` and ``domain.json`` into the model folder (see wsi_screen/models/domain.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from wsi_screen.models import load_model
from wsi_screen.models.domain import collect_features, fit
from wsi_screen.training.data import iter_images, open_patch_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, precision="fp32")  # reference statistics in float32
    folder = open_patch_folder(args.data, label_column=args.label_column)
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    started = time.perf_counter()
    feats = {}
    for split in ("train", "valid"):
        rows = folder.indices(split)
        batches = (loaded.images for loaded in iter_images(folder, rows, model.spec.input_size, chunk=512))
        feats[split] = collect_features(model.module, batches, mean, std)
        logging.info("%s: %d images in %.0f s", split, len(feats[split]["stem"]), time.perf_counter() - started)
    labels = np.asarray(folder.label_indices(model.spec.classes, folder.indices("train")))
    domain = fit(feats["train"], labels, feats["valid"], info={"dataset": folder.root.name})
    domain.save(args.model)
    logging.info("threshold %.4f (flags %.2f %% of valid); written to %s", domain.threshold,
                 100 * domain.info["calibrated_on"]["flagged_fraction"], args.model)


if __name__ == "__main__":
    main()
