"""Choose a model's slide rule and threshold on one synthetic cohort, report it on another.

    python scripts/calibrate_slide_rule.py --model MODEL_DIR --work runs/calibration [--slides 500]

1. Scores every PCam *valid* patch in all 8 orientations with the model once (a score bank, cached in WORK).
2. Plans two cohorts (seeds ``--choose-seed`` and ``--report-seed``) of ``--slides`` slides each: half
   negative, half with foci (ITC, micro- or macro-metastasis in turn), ~500-20,000 scored patches,
   irregular tissue and foci, every patch in a random orientation (:mod:`wsi_screen.synthetic.cohort`); runs the
   tiler's tissue detector on each slide's thumbnail to drop the patches the tiler would drop, and gives
   every other patch its score from the bank.
3. Chooses the rule, its settings and the slide threshold on the first cohort (highest sensitivity at
   specificity >= ``--min-specificity`` among the negatives of every size bin, so the threshold holds on the
   largest slides; :mod:`wsi_screen.screening.calibration`), and the smallest region that counts
   as a focus.
4. Reports the choice on the second cohort, never tuned on: slide AUC with a bootstrap CI, sensitivity by
   focus class and specificity by slide size with Wilson CIs.

Writes ``MODEL_DIR/slide_rule.json`` (read by ``wsi-screen infer``), WORK/cohort-*.csv (every slide's truth
and scores) and prints the tables that docs/default-model.md quotes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from wsi_screen._safe_write import atomic_write_text
from wsi_screen.metrics import ThresholdRule, choose_threshold
from wsi_screen.models import load_model
from wsi_screen.screening import calibration
from wsi_screen.screening.run import SLIDE_RULE_JSON, model_identity
from wsi_screen.screening.runfolder import csv_text
from wsi_screen.screening.spatial import ScoreGrid
from wsi_screen.synthetic import cohort
from wsi_screen.synthetic.slides import PCAM_MPP, default_patches_dir

PATCH_PX = 96
#: tissue cells of the smallest and largest slides: the tiler keeps ~84 % of them (pale and fatty patches
#: fall under --min-tissue), so the slides carry ~500 to ~20,000 scored patches
MIN_CELLS, MAX_CELLS = 600, 24000


def bank_for(model_dir: Path, work: Path) -> tuple[cohort.ScoreBank, Path]:
    """The model's score bank (computed once, cached in WORK) and where it is."""
    classifier = load_model(model_dir, precision="fp32")  # the rule is defined on float32 scores
    sha = model_identity(model_dir, classifier)["sha256"]
    path = work / f"bank-{sha[:12]}"
    if path.with_suffix(".json").exists():
        bank = cohort.ScoreBank.load(path)
        if bank.model_sha256 == sha and bank.thumbs:
            return bank, path
    bank = cohort.compute_score_bank(classifier, default_patches_dir(), model_sha256=sha)
    bank.save(path)
    return bank, path


_BANK: cohort.ScoreBank | None = None


def _init(bank_path: str) -> None:
    global _BANK
    _BANK = cohort.ScoreBank.load(bank_path)


def _one(args: tuple[cohort.CohortSlide, float]) -> tuple[calibration.LabelledSlide, cohort.SlideLayout]:
    s, patch_threshold = args
    bank = _BANK
    if bank is None:  # pragma: no cover - set by the pool initializer
        raise RuntimeError("score bank not loaded")
    cell_mm = PATCH_PX * PCAM_MPP / 1000.0
    layout = cohort.layout_for(s, cell_mm=cell_mm, pools={k: len(v) for k, v in bank.paths.items()})
    kept = cohort.kept_cells(layout, bank, mpp=PCAM_MPP, patch_px=PATCH_PX)
    probs = cohort.simulate_probs(layout, bank, kept=kept)
    grid = ScoreGrid(probs, (0, 0), PATCH_PX, cell_mm, np.zeros(probs.shape, np.int64))
    return calibration.labelled_slide(s.name, grid, layout.positive, patch_threshold, layout.size_class), layout


def simulate(bank_path: Path, seed: int, n: int, patch_threshold: float,
             jobs: int) -> list[tuple[calibration.LabelledSlide, cohort.SlideLayout]]:
    """Every slide of the cohort of ``seed``: its candidate scores (worker processes share the work)."""
    from concurrent.futures import ProcessPoolExecutor

    plan = cohort.plan_cohort(seed, n, min_patches=MIN_CELLS, max_patches=MAX_CELLS)
    with ProcessPoolExecutor(max_workers=max(1, jobs), initializer=_init, initargs=(str(bank_path),)) as pool:
        return list(pool.map(_one, [(s, patch_threshold) for s in plan], chunksize=4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/calibration"))
    parser.add_argument("--slides", type=int, default=500, help="slides per cohort (default 500)")
    parser.add_argument("--choose-seed", type=int, default=0)
    parser.add_argument("--report-seed", type=int, default=1)
    parser.add_argument("--min-specificity", type=float, default=calibration.DEFAULT_MIN_SPECIFICITY)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes simulating slides (default 2)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    spec = load_model(args.model).spec
    patch_threshold = spec.threshold if spec.threshold is not None else 0.5
    bank, bank_path = bank_for(args.model, args.work)
    cohorts = {"choose": simulate(bank_path, args.choose_seed, args.slides, patch_threshold, args.jobs),
               "report": simulate(bank_path, args.report_seed, args.slides, patch_threshold, args.jobs)}
    train = [s for s, _ in cohorts["choose"]]
    config, doc = calibration.calibrate(train, patch_threshold=patch_threshold,
                                        min_specificity=args.min_specificity)
    held = [s for s, _ in cohorts["report"]]
    chosen = doc["name"]
    result = calibration.report([s.scores[chosen] for s in held], [s.positive for s in held],
                                [s.size_class for s in held], [s.n_patches for s in held], config.slide_threshold)
    y = np.array([s.positive for s in held])
    for name, row in doc["candidates"].items():
        row["held_out_auc"] = float(roc_auc_score(y, [s.scores[name] for s in held]))
    doc["calibrated_on"] = {"cohort": "synthetic slides of PCam valid patches (wsi_screen.synthetic.cohort)",
                            "seed": args.choose_seed, "n_slides": len(train),
                            "n_positive": int(sum(s.positive for s in train)),
                            "sizes": f"{MIN_CELLS}-{MAX_CELLS} tissue cells (~500-20,000 scored patches)",
                            "score_bank_model_sha256": bank.model_sha256}
    doc["held_out"] = {"seed": args.report_seed, **result}
    # the trade-off a lab may prefer: the chosen rule at other specificities (chosen and reported as above)
    scores = np.array([s.scores[chosen] for s in train])
    strata = np.array([calibration.size_bin(s.n_patches) for s in train])
    doc["other_operating_points"] = {}
    for spec_min in (0.95, 0.98, 0.99, 1.0):
        t = choose_threshold(np.array(labels_of(train)), scores, ThresholdRule("specificity", spec_min), strata=strata)
        r = calibration.report([s.scores[chosen] for s in held], [s.positive for s in held],
                               [s.size_class for s in held], [s.n_patches for s in held], t)
        doc["other_operating_points"][f"{spec_min:g}"] = {"threshold": t, "held_out": r}
    atomic_write_text(args.model / SLIDE_RULE_JSON, json.dumps(doc, indent=2) + "\n")
    for key, pairs in cohorts.items():
        names = list(pairs[0][0].scores)
        table = [{"slide": s.name, "label": "tumour" if s.positive else "normal", "class": s.size_class,
                  "n_tissue": s.n_patches, "largest_focus_mm": f"{lay.largest_focus_mm:.3f}",
                  "tumour_patches": int(lay.tumour.sum()), **{n: f"{s.scores[n]:.6g}" for n in names}}
                 for s, lay in pairs]
        atomic_write_text(args.work / f"cohort-{key}.csv", csv_text(table, list(table[0])))
    print(_markdown(doc))
    return 0


def labels_of(slides: list[calibration.LabelledSlide]) -> list[bool]:
    return [s.positive for s in slides]


def _pct(entry: dict[str, Any], key: str) -> str:
    if entry["rate"] is None:
        return "n/a"
    lo, hi = entry["ci"]
    return f"{entry[key]}/{entry['n']} = {100 * entry['rate']:.1f} % ({100 * lo:.0f}-{100 * hi:.0f})"


def _markdown(doc: dict[str, Any]) -> str:
    h = doc["held_out"]
    lines = [f"chosen: {doc['name']} >= {doc['slide_threshold']:.4g} (unit: "
             f"{'mm^2' if doc['rule'] == 'region' else 'probability'}); foci: >= {doc['min_focus_patches']} "
             f"patches at p >= {doc['region_threshold']:g}",
             "", "| candidate | AUC (calibration) | threshold | sensitivity | specificity | AUC (held out) |",
             "|---|---|---|---|---|---|"]
    for name, t in doc["candidates"].items():
        lines.append(f"| {name} | {t['auc']:.3f} | {t['threshold']:.4g} | {t['sensitivity']:.3f} | "
                     f"{t['specificity']:.3f} | {t['held_out_auc']:.3f} |")
    lines += ["", f"held-out cohort (seed {h['seed']}, {h['n_slides']} slides): AUC {h['auc']:.3f} "
                  f"({h['auc_ci'][0]:.3f}-{h['auc_ci'][1]:.3f}); sensitivity {_pct(h['sensitivity'], 'detected')}; "
                  f"specificity {_pct(h['specificity'], 'correct')}",
              "", "| focus class | detected |", "|---|---|"]
    lines += [f"| {k} | {_pct(v, 'detected')} |" for k, v in h["sensitivity_by_class"].items()]
    lines += ["", "| negative slide size (tissue patches) | called normal |", "|---|---|"]
    lines += [f"| {k} | {_pct(v, 'correct')} |" for k, v in h["specificity_by_size"].items()]
    lines += ["", "| calibration specificity | threshold | held-out specificity | itc | micro | macro |",
              "|---|---|---|---|---|---|"]
    for key, op in doc["other_operating_points"].items():
        r = op["held_out"]
        by = r["sensitivity_by_class"]
        lines.append(f"| >= {key} | {op['threshold']:.4g} | {_pct(r['specificity'], 'correct')} | "
                     f"{_pct(by['itc'], 'detected')} | {_pct(by['micro'], 'detected')} | "
                     f"{_pct(by['macro'], 'detected')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
