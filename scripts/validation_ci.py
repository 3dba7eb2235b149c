"""95 % confidence intervals of a model's validation figures (docs/default-model.md quotes them).

    python scripts/validation_ci.py EVAL_DIR [--sensitivity 0.95]

Reads ``EVAL_DIR/predictions.csv`` (written by ``wsi-screen evaluate`` and by ``train`` in MODEL/valid) and
prints the AUC with a percentile-bootstrap interval (2,000 resamples within each class), and the specificity
at the model's operating point and at sensitivity >= X (threshold chosen on the same predictions by train's own
rule, ``wsi_screen.metrics.choose_threshold``, so that figure is optimistic by construction) with Wilson intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from wsi_screen.metrics import bootstrap_auc, choose_threshold, wilson


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--sensitivity", type=float, default=0.95)
    parser.add_argument("--positive", default="tumour")
    args = parser.parse_args(argv)
    with (args.eval_dir / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([r["label"] == args.positive for r in rows])
    p = np.array([float(r[f"p_{args.positive}"]) for r in rows])
    auc, lo, hi = bootstrap_auc(p, y, n_boot=2000)
    metrics = json.loads((args.eval_dir / "metrics.json").read_text())
    t_model = float(metrics["threshold"])
    t_sens = choose_threshold(y, p, f"sensitivity:{args.sensitivity}")
    out = {"n": int(y.size), "n_positive": int(y.sum()), "auc": auc, "auc_ci": [lo, hi]}
    for name, t in (("model_threshold", t_model), (f"sensitivity_{args.sensitivity:g}", t_sens)):
        tp, tn = int((p[y] >= t).sum()), int((p[~y] < t).sum())
        out[name] = {"threshold": t, "sensitivity": tp / y.sum(), "sensitivity_ci": wilson(tp, int(y.sum())),
                     "specificity": tn / (~y).sum(), "specificity_ci": wilson(tn, int((~y).sum()))}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
