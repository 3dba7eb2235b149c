"""Does scoring in bfloat16 change what the bundled model says? PCam valid patches and the test cohorts' slide calls.

    python scripts/precision_check.py [--model MODEL_DIR] [--work runs/precision] [--slides 500]

1. Every PCam *valid* patch (3,000) scored in float32, in one bfloat16 pass, and in bfloat16 as scoring runs it
   (rescored in float32 near the decision thresholds): AUC of each with a paired bootstrap CI of the difference
   from float32 (2,000 resamples within each class), the largest and mean change of p(tumour), and how many
   patch calls (at the model's threshold) and domain calls change.
2. The score bank (every valid patch in its 8 orientations, see scripts/calibrate_slide_rule.py) in each
   precision, and the two synthetic cohorts the slide rule was chosen and reported on (seeds 0 and 1,
   ``--slides`` each): every slide's score and call under the model's slide rule, float32 against bfloat16.
3. With ``--tiffs FOLDER`` (repeatable): ``wsi-screen infer`` on the slide files in each folder with
   ``--precision fp32`` and ``bf16`` (stores shared): every slide's call, score and metastasis class.

Prints the tables that docs/default-model.md quotes. bfloat16 is run whatever the CPU (emulated where it is not
native: slower, same numbers).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from wsi_screen.models import default_model_dir, load_model
from wsi_screen.models.precision import REFINE_BAND
from wsi_screen.screening.run import InferConfig, decision_thresholds, model_identity, resolve_aggregate
from wsi_screen.synthetic import cohort
from wsi_screen.synthetic.slides import default_patches_dir

_SPEC = importlib.util.spec_from_file_location("calibrate_slide_rule",
                                               Path(__file__).with_name("calibrate_slide_rule.py"))
assert _SPEC is not None and _SPEC.loader is not None
calibrate_slide_rule = importlib.util.module_from_spec(_SPEC)
sys.modules["calibrate_slide_rule"] = calibrate_slide_rule  # its worker processes pickle its functions by name
_SPEC.loader.exec_module(calibrate_slide_rule)


def paired_auc_diff(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of AUC(b) - AUC(a) over bootstrap resamples within each class."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    diffs = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        diffs.append(roc_auc_score(y[idx], b[idx]) - roc_auc_score(y[idx], a[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def patches(model_dir: Path) -> None:
    root = default_patches_dir()
    with (root / "labels.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "valid"]
    images = np.stack([np.asarray(Image.open(root / r["path"]).convert("RGB")) for r in rows])
    y = np.array([r["label"] == "tumour" for r in rows])
    fp32, bf16 = load_model(model_dir, precision="fp32"), load_model(model_dir, precision="bf16")
    pos, thr = fp32.spec.positive_index, fp32.spec.threshold
    a, da = fp32.predict_with_domain(images)
    raw = np.concatenate([bf16.predict_tensor(bf16.preprocess(images[i:i + 256])).numpy()
                          for i in range(0, len(images), 256)])[:, pos]  # one bfloat16 pass each
    b, db = bf16.predict_with_domain(images)  # as scoring runs it: rescored in float32 near the threshold
    a, b = a[:, pos], b[:, pos]
    print(f"## PCam valid (n = {len(y):,}), {model_dir}\n")
    print("| precision | AUC | AUC - float32 (paired bootstrap 95 %) | max / mean |p change| | patch calls "
          "changed | domain calls changed |\n|---|---|---|---|---|---|")
    print(f"| float32 | {roc_auc_score(y, a):.4f} | | | | |")
    for name, v, d in (("bfloat16, one pass", raw, None), ("bfloat16 as scoring runs it (refined)", b, db)):
        lo, hi = paired_auc_diff(y, a, v)
        change = np.abs(v - a)
        dom = "" if d is None or da is None or fp32.domain is None else \
            str(int((fp32.domain.in_domain(d) != fp32.domain.in_domain(da)).sum()))
        print(f"| {name} | {roc_auc_score(y, v):.4f} | {roc_auc_score(y, v) - roc_auc_score(y, a):+.4f} "
              f"({lo:+.4f} to {hi:+.4f}) | {change.max():.4f} / {change.mean():.5f} | "
              f"{int(((v >= thr) != (a >= thr)).sum())} of {len(y):,} | {dom} |")
    print(f"\nrescored in float32: {int((np.abs(raw - thr) < REFINE_BAND).sum())} of {len(y):,} patches "
          f"(p within {REFINE_BAND} of the threshold {thr:.4g}), plus those near the domain threshold\n")


def cohorts(model_dir: Path, work: Path, n_slides: int) -> None:
    import json

    work.mkdir(parents=True, exist_ok=True)
    rule = json.loads((model_dir / "slide_rule.json").read_text())
    name, threshold = rule["name"], float(rule["slide_threshold"])
    sha = model_identity(model_dir, load_model(model_dir, precision="fp32"))["sha256"]
    banks = {}
    for precision in ("fp32", "bf16"):
        path = work / f"bank-{sha[:12]}-{precision}-refined"
        if not path.with_suffix(".json").exists():
            classifier = load_model(model_dir, precision=precision)
            # as infer scores: near the model's and the slide rule's thresholds, in float32
            rule = resolve_aggregate(model_dir, classifier, InferConfig())
            classifier.decision_thresholds = decision_thresholds(classifier, rule)
            bank = cohort.compute_score_bank(classifier, default_patches_dir(), model_sha256=sha)
            bank.save(path)
        banks[precision] = path
    thr = load_model(model_dir, precision="fp32").spec.threshold
    print(f"## Slide calls, rule {name} >= {threshold:.4g} (slide_rule.json)\n")
    print("| cohort (seed) | slides | positive calls fp32 / bf16 | calls that differ | largest score change |")
    print("|---|---|---|---|---|")
    for seed in (0, 1):
        scores = {}
        for precision, path in banks.items():
            slides = calibrate_slide_rule.simulate(path, seed, n_slides, thr, 2)
            scores[precision] = np.array([s.scores[name] for s, _ in slides])
        a, b = scores["fp32"], scores["bf16"]
        print(f"| {'choose' if seed == 0 else 'report'} ({seed}) | {len(a)} | {int((a >= threshold).sum())} / "
              f"{int((b >= threshold).sum())} | {int(((a >= threshold) != (b >= threshold)).sum())} | "
              f"{np.abs(a - b).max():.4g} |")


def tiffs(model_dir: Path, folders: list[Path], work: Path) -> None:
    import subprocess

    print("\n## Slide files screened with `wsi-screen infer`\n")
    print("| folder | slides | tumour calls fp32 / bf16 | calls that differ | metastasis classes that differ | "
          "largest score change |\n|---|---|---|---|---|---|")
    for folder in folders:
        results = {}
        for precision in ("fp32", "bf16"):
            run = work / f"run-{folder.name}-{precision}"
            subprocess.run([sys.executable, "-m", "wsi_screen.cli", "infer", str(folder), "-o", str(run), "--model",
                            str(model_dir), "--stores", str(work / f"stores-{folder.name}"), "--precision", precision,
                            "--quiet"], check=True, stdout=subprocess.DEVNULL)
            with (run / "results.csv").open() as fh:
                results[precision] = {r["slide"]: r for r in csv.DictReader(fh)}
        a, b = results["fp32"], results["bf16"]
        calls = sum(a[k]["diagnosis"] != b[k]["diagnosis"] for k in a)
        classes = sum(a[k]["metastasis"] != b[k]["metastasis"] for k in a)
        change = max(abs(float(a[k]["score"]) - float(b[k]["score"])) for k in a)
        tumour = [sum(r["diagnosis"] == "tumour" for r in x.values()) for x in (a, b)]
        print(f"| {folder} | {len(a)} | {tumour[0]} / {tumour[1]} | {calls} | {classes} | {change:.4g} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--work", type=Path, default=Path("runs/precision"))
    parser.add_argument("--slides", type=int, default=500)
    parser.add_argument("--tiffs", type=Path, action="append", default=[],
                        help="a folder of slides to screen in both precisions (repeatable)")
    args = parser.parse_args(argv)
    patches(args.model)
    cohorts(args.model, args.work, args.slides)
    if args.tiffs:
        tiffs(args.model, args.tiffs, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
