"""Build a synthetic cohort of slides with known truth from labelled PCam patches.

    python scripts/make_synthetic_slides.py OUT_DIR --pos 4 --neg 4 --seed 0 [--grid 16x16] [--split valid]

Writes OUT_DIR/synth_NNN.tiff (pyramidal generic TIFF), OUT_DIR/truth.json and OUT_DIR/slides.csv
(columns slide,label; usable as ``wsi-screen infer --labels``). See :mod:`wsi_screen.synthetic.slides`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from wsi_screen.errors import WsiScreenError
from wsi_screen.synthetic.slides import DEFAULT_SPLIT, PCAM_MPP, build_cohort, default_patches_dir


def _grid(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--grid must look like 16x16, got {text!r}") from exc
    return cols, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--pos", type=int, default=4, help="number of tumour slides (default 4)")
    parser.add_argument("--neg", type=int, default=4, help="number of normal slides (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=_grid, default=(16, 16),
                        help="tissue patches COLSxROWS (default 16x16)")
    parser.add_argument("--tumour-fraction", type=float, default=0.1,
                        help="share of tissue cells that are tumour on positive slides (default 0.1)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, help="patch split to draw from (default valid)")
    parser.add_argument("--mpp", type=float, default=PCAM_MPP, help=f"level-0 um/px (default {PCAM_MPP})")
    parser.add_argument("--patches", type=Path, default=None,
                        help="patch folder with labels.csv (default: shared data patches/pcam)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        truths = build_cohort(args.out_dir, n_pos=args.pos, n_neg=args.neg, seed=args.seed,
                              patches_dir=args.patches or default_patches_dir(), grid=args.grid,
                              tumour_fraction=args.tumour_fraction, mpp=args.mpp, split=args.split)
    except WsiScreenError as exc:
        print(f"make_synthetic_slides: error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(truths)} slides in {args.out_dir} ({time.perf_counter() - t0:.1f} s); "
          f"labels in {args.out_dir / 'slides.csv'}, truth in {args.out_dir / 'truth.json'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
