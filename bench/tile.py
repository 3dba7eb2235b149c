"""Tiling throughput: the whole `wsi-screen tile` process against baselines measured in the same run.

    python bench/tile.py [--slide bench/data/mosaic-1x.tif | --slide FOLDER] [--mpp 0.5] [--size 224] [--workers 2]
                         [--stains macenko,reinhard,vahadane] [--tiatoolbox /work/tiatoolbox-venv/bin/python]
                         [--tia-stain-patches 1000]

``--slide FOLDER`` tiles a folder of slides (``*.tif``) in one `tile` process, as users do; every baseline then runs
over each slide's patches in turn and its seconds are summed. Make one from ``python bench/make_slide.py --scales 1``
and copies of mosaic-1x.tif under other names (see bench/RESULTS.md).

Rows (same slides, same grid of patches: the coordinates of the stores `wsi-screen tile` writes):

* OpenSlide read_region loop, one thread (the baseline: ratio 1.0);
* wsi-screen's own reader threads alone over the same patches (bench/_reader_floor.py: no thumbnail, mask or
  store, start-up excluded): the floor under the whole `tile` process on this machine;
* anchors, in the tiatoolbox environment (which has pyvips with the pyvips-binary wheel): a single-thread
  libvips ``Region.fetch`` loop, tiatoolbox's PointsPatchExtractor over the same patch centres, and the same
  plus tiatoolbox's Macenko, Reinhard and Vahadane normalisers (fitted on our bundled target; on the first
  ``--tia-stain-patches`` patches: they take 3-35 ms a patch);
* `wsi-screen tile` as a whole process (thumbnail, tissue mask, reads, zarr writes, commit), with the default
  reader (direct JPEG decode) and codec (jpeg), with `--codec lz4`, `--pixels none` (coordinates only),
  `--reader openslide`, and with `--stain macenko`, `reinhard`, `vahadane` (``--stains``).

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
    parser.add_argument("--stains", default="macenko,reinhard,vahadane", help="stain methods with a row each")
    parser.add_argument("--tiatoolbox", default="/work/tiatoolbox-venv/bin/python",
                        help="python of an environment with tiatoolbox and pyvips (skipped if missing)")
    parser.add_argument("--tia-stain-patches", type=int, default=1000,
                        help="patches tiatoolbox's normalisers are timed on (default 1000)")
    args = parser.parse_args(argv)
    if not args.slide.exists():
        run([python(), str(Path(__file__).parent / "make_slide.py"), "--scales", "1", "--out", str(args.slide.parent)])
    slides = sorted(args.slide.glob("*.tif")) if args.slide.is_dir() else [args.slide]
    stains = [m for m in args.stains.split(",") if m]

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
        per_slide = []
        for slide in slides:
            store = PatchStore.open(work / "fast" / (slide.stem + ".zarr"))
            coords_path = work / f"coords-{slide.stem}.npy"
            np.save(coords_path, store.coords)
            per_slide.append((slide, coords_path, len(store), store.tile_size_l0))
        n = sum(k for _, _, k, _ in per_slide)
        mp_per_patch = args.size * args.size / 1e6

        def summed(script: list[str], *extra: str, py: str = python()) -> Measured:
            """One baseline over every slide's patches in turn: seconds summed, the largest peak RSS."""
            parts = [run_median([py, *script, str(slide), str(coords), str(tile_l0), *extra], args.repeats,
                                own_seconds=True) for slide, coords, _, tile_l0 in per_slide]
            return Measured(sum(m.seconds for m in parts), max(m.peak_rss_mb for m in parts), "")

        here = Path(__file__).parent
        base = summed([str(here / "_openslide_loop.py")], "0")
        base_rate = n / base.seconds

        def row(name: str, m: Measured, patches: int = n) -> list[object]:
            rate = patches / m.seconds
            return [name, patches, m.seconds, rate, rate * mp_per_patch, m.peak_rss_mb, rate / base_rate]

        rows.append(row("OpenSlide read_region loop, 1 thread (baseline)", base))
        floor = summed([str(here / "_reader_floor.py")], str(args.size), str(args.workers))
        rows.append(row(f"wsi-screen's {args.workers} reader threads alone (no mask, no store; the floor)", floor))
        tia = Path(args.tiatoolbox)
        tia_rows: dict[str, list[object]] = {}
        if tia.exists() and len(slides) > 1:
            vips = summed([str(here / "_vips_loop.py")], py=str(tia))
            rows.append(row("libvips Region.fetch loop, 1 thread (pyvips-binary; anchor)", vips))
        elif tia.exists():
            slide, coords_path, _, tile_l0 = per_slide[0]
            vips = run_median([str(tia), str(Path(__file__).parent / "_vips_loop.py"), str(slide),
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
        ours_rows: dict[str, list[object]] = {"none": row(f"wsi-screen tile, whole process ({args.workers} readers, "
                                                          "default codec jpeg)", fast)}
        rows.append(ours_rows["none"])
        rows.append(row("wsi-screen tile --codec lz4", ours("lz4", "--codec", "lz4")))
        rows.append(row("wsi-screen tile --pixels none (coordinates only)", ours("coords", "--pixels", "none")))
        if len(slides) > 1:  # peak RSS must not grow with the number of slides
            one = run_median([*tile_cmd[:4], str(slides[0]), *tile_cmd[5:], "-o", str(work / "one")], args.repeats,
                             before=fresh("one"))
            rows.append(row(f"wsi-screen tile, the first slide alone (peak RSS against {len(slides)} slides)", one,
                            per_slide[0][2]))
        else:
            rows.append(row("wsi-screen tile --reader openslide", ours("openslide", "--reader", "openslide")))
        for method in stains:
            ours_rows[method] = row(f"wsi-screen tile --stain {method}", ours(method, "--stain", method))
            rows.append(ours_rows[method])

        w, h = store.attrs["slide"]["dimensions"]
        what = f"{args.slide.name} ({w} x {h} px)" if len(slides) == 1 else \
            f"a folder of {len(slides)} slides ({args.slide.name}/, the last {w} x {h} px)"
        print(header(f"Tiling: {what}, {n} patches of {args.size} px at {args.mpp} um/px"))
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
