"""Tiling throughput: the whole `wsi-screen tile` process against baselines measured in the same run.

    python bench/tile.py [--slide bench/data/mosaic-1x.tif] [--mpp 0.5] [--size 224] [--workers 2]
                         [--tiatoolbox /work/tiatoolbox-venv/bin/python] [--tia-stain-patches 1000]

Rows (same slide, same grid of patches: the coordinates of the store `wsi-screen tile` writes):

* OpenSlide read_region loop, one thread (the baseline: ratio 1.0);
* wsi-screen's own reader threads alone over the same patches (bench/_reader_floor.py: no thumbnail, mask or
  store, start-up excluded): the floor under the whole `tile` process on this machine;
* anchors, in the tiatoolbox environment (which has pyvips with the pyvips-binary wheel): a single-thread
  libvips ``Region.fetch`` loop, tiatoolbox's PointsPatchExtractor over the same patch centres, and the same
  plus tiatoolbox's Macenko, Reinhard and Vahadane normalisers (fitted on our bundled target; on the first
  ``--tia-stain-patches`` patches: they take 3-35 ms a patch);
* `wsi-screen tile` as a whole process (thumbnail, tissue mask, reads, zarr writes, commit), with the default
  reader (direct JPEG decode) and with `--reader openslide`, and with `--stain macenko`, `reinhard`, `vahadane`.

Throughput counts output patches; MP/s counts output megapixels (patches x size^2). Peak RSS is the process's
own maximum resident set. Each row is the median of ``--repeats`` runs, with ``os.sync()`` before each (the
machine is shared and page-cache writeback is noisy). The slide is built by bench/make_slide.py if missing.
hs2p (a tiling peer) is not on this machine's package index, so it has no row.
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
from common import DATA, Measured, header, python, run, run_median, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DATA / "mosaic-1x.tif")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--tiatoolbox", default="/work/tiatoolbox-venv/bin/python",
                        help="python of an environment with tiatoolbox and pyvips (skipped if missing)")
    parser.add_argument("--tia-stain-patches", type=int, default=1000,
                        help="patches tiatoolbox's normalisers are timed on (default 1000)")
    args = parser.parse_args(argv)
    if not args.slide.exists():
        run([python(), str(Path(__file__).parent / "make_slide.py"), "--scales", "1", "--out", str(args.slide.parent)])

    from wsi_screen.tiling.stain import BUNDLED_TARGET
    from wsi_screen.tiling.store import PatchStore

    target = str(Path(__file__).resolve().parents[1] / "wsi_screen" / BUNDLED_TARGET)
    work = Path(tempfile.mkdtemp(prefix="bench-tile-"))
    try:
        rows = []
        tile_cmd = [python(), "-m", "wsi_screen.cli", "tile", str(args.slide), "--mpp", str(args.mpp),
                    "--size", str(args.size), "--workers", str(args.workers), "--quiet"]

        def fresh(name: str) -> Callable[[], None]:  # every repetition tiles into an empty output folder
            return lambda: shutil.rmtree(work / name, ignore_errors=True)

        def ours(name: str, *extra: str) -> Measured:
            return run_median([*tile_cmd, *extra, "-o", str(work / name)], args.repeats, before=fresh(name))

        fast = ours("fast")
        store = PatchStore.open(work / "fast" / (args.slide.stem + ".zarr"))
        n, tile_l0 = len(store), store.tile_size_l0
        coords_path = work / "coords.npy"
        np.save(coords_path, store.coords)
        mp_per_patch = args.size * args.size / 1e6

        base = run_median([python(), str(Path(__file__).parent / "_openslide_loop.py"), str(args.slide),
                           str(coords_path), str(tile_l0), "0"], args.repeats, own_seconds=True)
        base_rate = n / base.seconds

        def row(name: str, m: Measured, patches: int = n) -> list[object]:
            rate = patches / m.seconds
            return [name, patches, m.seconds, rate, rate * mp_per_patch, m.peak_rss_mb, rate / base_rate]

        rows.append(row("OpenSlide read_region loop, 1 thread (baseline)", base))
        floor = run_median([python(), str(Path(__file__).parent / "_reader_floor.py"), str(args.slide),
                            str(coords_path), str(tile_l0), str(args.size), str(args.workers)], args.repeats,
                           own_seconds=True)
        rows.append(row(f"wsi-screen's {args.workers} reader threads alone (no mask, no store; the floor)", floor))
        tia = Path(args.tiatoolbox)
        tia_rows: dict[str, list[object]] = {}
        if tia.exists():
            vips = run_median([str(tia), str(Path(__file__).parent / "_vips_loop.py"), str(args.slide),
                               str(coords_path), str(tile_l0)], args.repeats, own_seconds=True)
            rows.append(row("libvips Region.fetch loop, 1 thread (pyvips-binary; anchor)", vips))
            extract = [str(tia), str(Path(__file__).parent / "_tiatoolbox_extract.py"), str(args.slide),
                       str(coords_path), str(tile_l0), str(args.size), str(args.mpp)]
            tia_rows["none"] = row("tiatoolbox PointsPatchExtractor", run_median(extract, args.repeats,
                                                                                 own_seconds=True))
            rows.append(tia_rows["none"])
            k = min(n, args.tia_stain_patches)
            for method in ("macenko", "reinhard", "vahadane"):
                m = run_median([*extract, method, target, str(k)], args.repeats, own_seconds=True)
                tia_rows[method] = row(f"tiatoolbox extractor + {method.capitalize()}Normalizer (first {k:,})", m, k)
                rows.append(tia_rows[method])
        ours_rows: dict[str, list[object]] = {"none": row(f"wsi-screen tile, whole process ({args.workers} readers)",
                                                          fast)}
        rows.append(ours_rows["none"])
        rows.append(row("wsi-screen tile --reader openslide", ours("openslide", "--reader", "openslide")))
        for method in ("macenko", "reinhard", "vahadane"):
            ours_rows[method] = row(f"wsi-screen tile --stain {method}", ours(method, "--stain", method))
            rows.append(ours_rows[method])

        w, h = store.attrs["slide"]["dimensions"]
        print(header(f"Tiling: {args.slide.name} ({w} x {h} px), {n} patches of {args.size} px at {args.mpp} um/px"))
        print(table(["method", "patches", "wall s", "patches/s", "MP/s", "peak RSS MB", "x baseline"], rows))
        if tia_rows:
            print()
            print(table(["stain", "wsi-screen tile patches/s", "tiatoolbox patches/s", "wsi-screen vs tiatoolbox"],
                        [[method, ours_rows[method][3], tia_rows[method][3],
                          f"{ours_rows[method][3] / tia_rows[method][3]:.1f}x"]  # type: ignore[operator]
                         for method in tia_rows]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
