"""Fuzz ``wsi-screen tile`` with seeded corrupt variants of the real CMU slides.

    python scripts/fuzz_slides.py [--seed 0] [--n N] [--batch 60] [--work DIR] [--timeout 300]

Builds the variants (tests/fuzz.py: flipped and overwritten bytes, cuts, absurd TIFF tags and IFD pointers,
broken DICOM attributes and offset tables, over SVS, pyramid TIFF, OME-TIFF and DICOM), tiles them in batches
beside a good slide (one ``wsi-screen tile --quiet`` process per batch), and prints markdown tables of what
happened by family and by format, then every bad outcome with its stderr lines. Exit status 1 when any
variant was not cleanly refused or tiled, or any batch aborted, hung, or changed the good slide's patches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzz import FORMATS, run_fuzz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the fuzzer, print the report; the exit status."""
    default_slides = Path(os.environ.get("WSI_SCREEN_DATA", REPO.parent / "shared" / "data")) / "slides"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--n", type=int, default=None,
                        help="how many variants (default: the full corpus); a subset covers every family "
                             "and format")
    parser.add_argument("--batch", type=int, default=60, help="variants per wsi-screen process (default 60)")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder, kept (default: a temporary folder, removed at the end)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per batch before it is a hang")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")
    parser.add_argument("--slides", type=Path, default=default_slides,
                        help=f"folder of the real slides (default {default_slides})")
    parser.add_argument("--json", type=Path, default=None,
                        help="write every result (with its stderr lines) here (default: WORK/results.json "
                             "when --work is given)")
    parser.add_argument("--keep", action="store_true", help="keep each batch's slides and stores under --work")
    args = parser.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"
    work = args.work or Path(tempfile.mkdtemp(prefix="wsi-screen-fuzz-"))
    formats = [f.strip() for f in args.formats.split(",")] if args.formats else None
    try:
        report = run_fuzz(work, args.slides, seed=args.seed, n=args.n, formats=formats, batch_size=args.batch,
                          timeout=args.timeout, keep=args.keep,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    out = args.json or (args.work / "results.json" if args.work else None)
    if out is not None:
        out.write_text(json.dumps(report.to_json(), indent=1))
    print(report.markdown())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
