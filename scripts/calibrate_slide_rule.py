"""Choose a model's slide-level rule and threshold on synthetic slides with known truth.

    python scripts/calibrate_slide_rule.py --model MODEL_DIR --work runs/calibration [--pos 16 --neg 16]

Builds a cohort of synthetic slides from the PCam *valid* split (tumour blobs of 2 % to 25 % of the tissue
on positive slides, none on negative ones; never the test split), screens it with the model, scores every
slide with every rule (mean, max, top-k for several k, fraction above the patch threshold), and picks the
rule with the best slide AUC and its threshold (highest specificity at sensitivity >= 0.95; see
:func:`wsi_screen.aggregate.choose_rule`). Writes ``MODEL_DIR/slide_rule.json``, which ``wsi-screen infer``
reads, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

from wsi_screen import runfolder
from wsi_screen.aggregate import RULES, choose_rule, slide_score
from wsi_screen.models import load_model
from wsi_screen.screening import SLIDE_RULE_JSON, InferConfig, run_infer
from wsi_screen.synthetic import build_slide, default_patches_dir

TOPK_CANDIDATES = (1, 3, 5, 10, 20, 40)


def build(work: Path, n_pos: int, n_neg: int, seed: int, grid: tuple[int, int]) -> Path:
    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    fractions = np.linspace(0.02, 0.25, max(n_pos, 1))
    for i in range(n_pos + n_neg):
        positive = i < n_pos
        name = f"calib_{i:03d}"
        build_slide(slides / f"{name}.tiff", patches_dir=default_patches_dir(), positive=positive, grid=grid,
                    tumour_fraction=float(fractions[min(i, len(fractions) - 1)]),
                    seed=int(rng.integers(2**31)), split="valid")
        rows.append({"slide": name, "label": "tumour" if positive else "normal"})
    with (work / "slides.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return slides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/calibration"))
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--neg", type=int, default=16)
    parser.add_argument("--grid", type=int, default=16, help="tissue grid edge in patches (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    classifier = load_model(args.model)
    slides = build(args.work, args.pos, args.neg, args.seed, (args.grid, args.grid))
    run = args.work / "run"
    summary = run_infer([str(slides)], run, classifier, args.model,
                        InferConfig(labels=str(args.work / "slides.csv"), rule="max", threshold=0.5))
    pos_class = classifier.spec.positive_class
    labels, per_rule = [], {f"topk{k}" if r == "topk" else r: [] for r in RULES
                            for k in (TOPK_CANDIDATES if r == "topk" else (0,))}
    for row in summary.rows:
        if row.status != "ok" or not row.label:
            continue
        scores = runfolder.read_scores(run / row.name / runfolder.SCORES_CSV)
        p = scores.probs[:, scores.classes.index(str(pos_class))]
        labels.append(row.label == "positive")
        for name in per_rule:
            rule = "topk" if name.startswith("topk") else name
            k = int(name[4:]) if rule == "topk" else 5
            per_rule[name].append(slide_score(p, rule, k=k, patch_threshold=summary.aggregate.patch_threshold))
    # choose_rule knows the four rule names; compare top-k variants first, keep the best k
    topk = {n: v for n, v in per_rule.items() if n.startswith("topk")}
    k_best = max(topk, key=lambda n: (_auc(topk[n], labels), -int(n[4:])))
    candidates = {"mean": per_rule["mean"], "max": per_rule["max"], "topk": topk[k_best],
                  "fraction": per_rule["fraction"]}
    rule, threshold, table = choose_rule(candidates, labels)
    result = {
        "rule": rule, "k": int(k_best[4:]), "slide_threshold": threshold,
        "patch_threshold": summary.aggregate.patch_threshold,
        "per_rule": {r.rule: r.to_json() for r in table},
        "topk_auc": {n: _auc(v, labels) for n, v in topk.items()},
        "calibrated_on": {"cohort": "synthetic slides from PCam valid", "n_positive": int(sum(labels)),
                          "n_negative": int(len(labels) - sum(labels)), "grid": args.grid, "seed": args.seed,
                          "tumour_fractions": "0.02-0.25"},
        "method": "best slide AUC; threshold with the highest specificity at sensitivity >= 0.95",
    }
    (args.model / SLIDE_RULE_JSON).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _auc(scores: list[float], labels: list[bool]) -> float:
    from wsi_screen.aggregate import roc_auc

    return float(roc_auc(np.asarray(scores), np.asarray(labels)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
