"""Build the realistic-size slide cohort that bench/infer.py screens (generated, never committed).

    python bench/make_cohort.py [--slides 6] [--grid 72] [--out bench/data/cohort]

Synthetic slides of real lymph-node tissue (:func:`wsi_screen.synthetic.slides.build_cohort`): PCam *valid*
patches (96 px at 0.972 um/px) on a ``grid`` x ``grid`` square, half of the slides with a tumour focus of 10 %
of the cells, written as pyramidal TIFFs. A 72 x 72 grid gives ~4,300 patches that the tiler keeps per slide
(pale patches fall under --min-tissue), the size of a real sentinel-node section at 10x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--grid", type=int, default=72, help="tissue cells per side (default 72)")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--out", type=Path, default=DATA / "cohort")
    args = parser.parse_args(argv)

    from wsi_screen.synthetic.slides import build_cohort

    t0 = time.perf_counter()
    n_pos = args.slides // 2
    truths = build_cohort(args.out, n_pos=n_pos, n_neg=args.slides - n_pos, seed=args.seed,
                          grid=(args.grid, args.grid), split="valid")
    print(f"{len(truths)} slides of {args.grid}x{args.grid} cells in {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
