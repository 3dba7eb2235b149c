"""Tiling throughput: the whole `wsi-screen tile` process against baselines measured in the same run.

    python bench/tile.py [--slide bench/data/mosaic-1x.tif] [--mpp 0.5] [--size 224] [--workers 2]
                         [--tiatoolbox /work/tiatoolbox-venv/bin/python]

Rows (same slide, same grid of patches: the coordinates of the store `wsi-screen tile` writes):

* OpenSlide read_region loop, one thread (the baseline: ratio 1.0);
* tiatoolbox's PointsPatchExtractor over the same patch centres (in its own environment, when given);
* `wsi-screen tile` as a whole process (thumbnail, tissue mask, reads, resize, zarr writes, commit), with
  the default reader (direct JPEG decode) and with `--reader openslide`, and with `--stain macenko`.

Throughput counts output patches; MP/s counts output megapixels (patches x size^2). Peak RSS is the process's
own maximum resident set. Each row is the median of ``--repeats`` runs, with ``os.sync()`` before each (the
machine is shared and page-cache writeback is noisy). The slide is built by bench/make_slide.py if missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, header, python, run, run_median, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DATA / "mosaic-1x.tif")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--tiatoolbox", default="/work/tiatoolbox-venv/bin/python",
                        help="python of an environment with tiatoolbox (skipped if missing)")
    args = parser.parse_args(argv)
    if not args.slide.exists():
        run([python(), str(Path(__file__).parent / "make_slide.py"), "--scales", "1", "--out", str(args.slide.parent)])

    from wsi_screen.tiling.store import PatchStore

    work = Path(tempfile.mkdtemp(prefix="bench-tile-"))
    try:
        rows = []
        tile_cmd = [python(), "-m", "wsi_screen.cli", "tile", str(args.slide), "--mpp", str(args.mpp),
                    "--size", str(args.size), "--workers", str(args.workers), "--quiet"]
        def fresh(name: str) -> Callable[[], None]:  # every repetition tiles into an empty output folder
            return lambda: shutil.rmtree(work / name, ignore_errors=True)

        ours = run_median([*tile_cmd, "-o", str(work / "fast")], args.repeats, before=fresh("fast"))
        store = PatchStore.open(work / "fast" / (args.slide.stem + ".zarr"))
        n, tile_l0 = len(store), store.tile_size_l0
        coords_path = work / "coords.npy"
        np.save(coords_path, store.coords)
        mp = n * args.size * args.size / 1e6

        base = run_median([python(), str(Path(__file__).parent / "_openslide_loop.py"), str(args.slide),
                           str(coords_path), str(tile_l0), "0"], args.repeats, own_seconds=True)
        base_s = base.seconds
        base_rate = n / base_s

        def row(name: str, seconds: float, rss: float) -> list[object]:
            return [name, n, seconds, n / seconds, mp / seconds, rss, (n / seconds) / base_rate]

        rows.append(row("OpenSlide read_region loop, 1 thread (baseline)", base_s, base.peak_rss_mb))
        tia = Path(args.tiatoolbox)
        if tia.exists():
            t = run_median([str(tia), str(Path(__file__).parent / "_tiatoolbox_extract.py"), str(args.slide),
                            str(coords_path), str(tile_l0), str(args.size), str(args.mpp)], args.repeats,
                           own_seconds=True)
            rows.append(row("tiatoolbox PointsPatchExtractor", t.seconds, t.peak_rss_mb))
        rows.append(row(f"wsi-screen tile, whole process ({args.workers} readers)", ours.seconds, ours.peak_rss_mb))
        slow = run_median([*tile_cmd, "--reader", "openslide", "-o", str(work / "openslide")], args.repeats,
                          before=fresh("openslide"))
        rows.append(row("wsi-screen tile --reader openslide", slow.seconds, slow.peak_rss_mb))
        stain = run_median([*tile_cmd, "--stain", "macenko", "-o", str(work / "stain")], args.repeats,
                           before=fresh("stain"))
        rows.append(row("wsi-screen tile --stain macenko", stain.seconds, stain.peak_rss_mb))

        w, h = store.attrs["slide"]["dimensions"]
        print(header(f"Tiling: {args.slide.name} ({w} x {h} px), {n} patches of {args.size} px at {args.mpp} um/px"))
        print(table(["method", "patches", "wall s", "patches/s", "MP/s", "peak RSS MB", "x baseline"], rows))
        if tia.exists():
            ratio = rows[2][3] / rows[1][3]  # type: ignore[operator]
            print(f"\nwsi-screen tile vs tiatoolbox: {ratio:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
