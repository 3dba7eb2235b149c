"""Training epoch time by torch thread count: the default against --threads 1 and 2.

    python bench/threads.py [--patches ../shared/data/patches] [--repeats 3]

Two workloads, each a full `wsi-screen train` process whose per-epoch seconds are read from history.csv
(median over epochs 2-3 of the median run; epoch 1 pays warm-up):

* the seed's task: screen_cnn32 on Herlev (716 train images at 32 px, README command),
* the default model's: resnet10t on 3,000 PCam train patches at 96 px.

Ratios are against ``--threads 1`` measured in the same run. The default (``--threads 0``) is what a user
gets without the option: one thread on machines with 2 cores or fewer.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, header, python, run, table

WORKLOADS = {
    "screen_cnn32, Herlev 32 px": ("herlev", ["--arch", "screen_cnn32", "--size", "32", "--label-column",
                                              "binary_label"]),
    "resnet10t, PCam 96 px (1,000 train patches)": ("pcam-1000", ["--arch", "resnet10t", "--mpp", "0.972"]),
}


def _pcam_subset(patches: Path, work: Path) -> Path:
    """The first 500 train rows of each class and 300 valid rows of PCam (images linked)."""
    folder = work / "pcam-1000"
    folder.mkdir()
    (folder / "images").symlink_to((patches / "pcam" / "images").resolve())
    with (patches / "pcam" / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts: dict[str, int] = {}
    keep = []
    for r in rows:
        if r["split"] == "train":
            counts[r["label"]] = counts.get(r["label"], 0) + 1
            if counts[r["label"]] > 500:
                continue
        elif r["split"] == "valid" and sum(1 for k in keep if k["split"] == "valid") >= 300:
            continue
        keep.append(r)
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    return folder


def epoch_seconds(dataset: Path, args: list[str], threads: int, out: Path) -> float:
    cmd = [python(), "-m", "wsi_screen.cli", "train", str(dataset), *args, "--epochs", "3", "--patience", "0",
           "--threads", str(threads), "--seed", "0", "--overwrite", "-o", str(out), "--quiet"]
    run(cmd, env={"HF_HUB_OFFLINE": "1"})
    with (out / "history.csv").open(newline="") as fh:
        seconds = [float(r["seconds"]) for r in csv.DictReader(fh)]
    return statistics.median(seconds[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=Path, default=REPO.parent / "shared" / "data" / "patches")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datasets = {"herlev": args.patches / "herlev", "pcam-1000": _pcam_subset(args.patches, work)}
        for label, (key, extra) in WORKLOADS.items():
            times = {}
            for threads in (0, 1, 2):
                runs = [epoch_seconds(datasets[key], extra, threads, work / f"m{threads}")
                        for _ in range(args.repeats)]
                times[threads] = statistics.median(runs)
            base = times[1]
            rows.append([label, times[0], times[1], times[2], base / times[0], base / times[2]])
    print(header("Training epoch time by thread count (issue: runs a user can trust)"))
    print(table(["workload", "default s/epoch", "--threads 1", "--threads 2", "default vs 1 (x)", "2 vs 1 (x)"],
                rows))
    print("\nx > 1: faster than one thread. Medians of", args.repeats, "runs of 3 epochs (epochs 2-3).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
