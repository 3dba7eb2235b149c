"""Scaling: `wsi-screen tile` time and peak memory on slides of 1x, 4x and 16x the area.

    python bench/scaling.py [--scales 1,4,16] [--workers 2]

Slides come from bench/make_slide.py (24,576 px square at 1x). Cost must grow linearly with area (time per
patch flat) and peak RSS must stay flat (within 10 %) because patches stream through fixed-size shards.
The baseline column is the 1x slide: time ratio against area ratio.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, header, python, run, run_median, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=3, help="runs per slide; the median is reported")
    args = parser.parse_args(argv)
    scales = [int(s) for s in args.scales.split(",")]
    missing = [s for s in scales if not (args.data / f"mosaic-{s}x.tif").exists()]
    if missing:
        run([python(), str(Path(__file__).parent / "make_slide.py"), "--scales", ",".join(map(str, missing)),
             "--out", str(args.data)])

    from wsi_screen.tiling.store import PatchStore

    rows: list[list[object]] = []
    base: tuple[float, float, int] | None = None
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    try:
        for scale in scales:
            slide = args.data / f"mosaic-{scale}x.tif"
            out = work / f"s{scale}"
            m = run_median([python(), "-m", "wsi_screen.cli", "tile", str(slide), "-o", str(out), "--workers",
                            str(args.workers), "--quiet"], args.repeats,
                           before=lambda out=out: shutil.rmtree(out, ignore_errors=True))
            store = PatchStore.open(out / f"mosaic-{scale}x.zarr")
            n = len(store)
            w, h = store.attrs["slide"]["dimensions"]
            if base is None:
                base = (m.seconds, m.peak_rss_mb, n)
            rows.append([f"{scale}x ({w:,} x {h:,} px)", n, m.seconds, n / m.seconds, m.peak_rss_mb,
                         (m.seconds / base[0]) / (n / base[2]), m.peak_rss_mb / base[1]])
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(header("Scaling of `wsi-screen tile` with slide area"))
    print(table(["slide", "patches", "wall s", "patches/s", "peak RSS MB", "time/patch vs 1x", "RSS vs 1x"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
