"""Inference throughput: `infer`'s store -> model path against bare forward passes of the same batches.

    python bench/infer.py [--slide bench/data/mosaic-1x.tif] [--model MODEL_DIR] [--batch-size 128] [--workers 0]

The slide is tiled once at the model's mpp and patch size (not timed). Then, in this process:

* bare forward passes: every batch of the store already in memory as a uint8 tensor; only normalisation and
  the model run (the baseline, ratio 1.0);
* `score_stores`: the path `wsi-screen infer` uses: patches stream from the zarr store through a
  DataLoader (in a background thread by default; ``--workers N``: N worker processes), are normalised and
  scored, with each patch's domain distance (ratio = its throughput / the baseline); then the same without
  the domain distance (the model's ``domain`` set aside), to show what the distance costs;
* the whole `wsi-screen infer` process on the same slide, reusing the store (includes model loading,
  heatmap, GeoJSON, report).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, header, python, run, table


def _loader(workers: int) -> str:
    return f"{workers} worker processes" if workers else "background thread"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DATA / "mosaic-1x.tif")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes (0: the background reader thread infer uses by default)")
    args = parser.parse_args(argv)
    if not args.slide.exists():
        run([python(), str(Path(__file__).parent / "make_slide.py"), "--scales", "1", "--out", str(args.slide.parent)])

    import resource

    import torch

    from wsi_screen.models import default_model_dir, load_model
    from wsi_screen.screening.score import score_stores
    from wsi_screen.tiling.store import PatchStore

    model_dir = args.model or default_model_dir()
    model = load_model(model_dir)
    spec = model.spec
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    try:
        stores = work / "stores"
        run([python(), "-m", "wsi_screen.cli", "tile", str(args.slide), "-o", str(stores), "--mpp", str(spec.mpp),
             "--size", str(spec.input_size), "--stain", spec.stain_method, "--quiet"])
        location = str(stores / (args.slide.stem + ".zarr"))
        store = PatchStore.open(location)
        n = len(store)
        batches = [torch.from_numpy(store.read(slice(i, min(n, i + args.batch_size))))
                   for i in range(0, n, args.batch_size)]
        mp = n * spec.input_size ** 2 / 1e6

        model.predict_tensor(model.preprocess(batches[0]))  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            model.predict_tensor(model.preprocess(b))
        bare = time.perf_counter() - t0

        for _ in score_stores([location], model, batch_size=args.batch_size, workers=args.workers):
            pass  # warm-up: worker start-up, file cache
        t0 = time.perf_counter()
        for _ in score_stores([location], model, batch_size=args.batch_size, workers=args.workers):
            pass
        streamed = time.perf_counter() - t0
        domain, model.domain = model.domain, None  # the same scoring without the domain distance
        t0 = time.perf_counter()
        for _ in score_stores([location], model, batch_size=args.batch_size, workers=args.workers):
            pass
        no_domain = time.perf_counter() - t0
        model.domain = domain
        rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        whole = run([python(), "-m", "wsi_screen.cli", "infer", str(args.slide), "-o", str(work / "run"),
                     "--model", str(model_dir), "--stores", str(stores), "--batch-size", str(args.batch_size),
                     "--loader-workers", str(args.workers), "--quiet"])
        rows = [
            [f"bare forward passes ({torch.get_num_threads()} torch threads; baseline)", n, bare, n / bare,
             mp / bare, rss_self, 1.0],
            [f"infer scoring: store -> DataLoader ({_loader(args.workers)}) -> model", n, streamed, n / streamed,
             mp / streamed, rss_self, bare / streamed],
            ["infer scoring without the domain distance", n, no_domain, n / no_domain, mp / no_domain, rss_self,
             bare / no_domain],
            ["wsi-screen infer, whole process (store reused)", n, whole.seconds, n / whole.seconds,
             mp / whole.seconds, whole.peak_rss_mb, bare / whole.seconds],
        ]
        print(header(f"Inference: {spec.arch} on {n} patches of {spec.input_size} px ({args.slide.name}), "
                     f"batch {args.batch_size}"))
        print(table(["method", "patches", "wall s", "patches/s", "MP/s", "peak RSS MB", "x bare forward"], rows))
        if model.domain is not None:
            print(f"\nscoring with the domain distance: {no_domain / streamed:.2f}x the throughput without it")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
