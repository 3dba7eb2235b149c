"""Inference throughput on a cohort of realistic-size slides, against bare forward passes measured in the same run.

    python bench/infer.py [--cohort bench/data/cohort] [--model MODEL_DIR] [--batch-size 128] [--repeats 3]
                          [--no-compile]

The cohort (bench/make_cohort.py: 6 synthetic slides of real lymph-node tissue, ~4,300-4,500 patches each) is
tiled once at the model's mpp and patch size (not timed). Then, every row the median of ``--repeats`` runs:

* bare forward passes over every patch of the cohort, already in memory as uint8 tensors (only normalisation
  and the model run): eager float32 (the baseline of the scoring target), bfloat16 autocast, and
  ``torch.compile`` in float32 (its first calls, the compilation, reported apart; on a third of the patches);
* ``score_stores``, the path ``wsi-screen infer`` uses (patches streamed from the zarr stores by a background
  thread, normalised, scored with the domain distance), at the default precision (``auto``), and without the
  domain distance;
* the whole ``wsi-screen infer`` process on the cohort as a user runs it: streaming (the default: a
  coordinates-only store per slide, patches read from the slide, normalised and scored in one pass; start-up,
  model loading, tissue mask, reading, scoring, heatmaps, GeoJSON, report), with where its time went (run.json's
  stages); and reusing lz4 pixel stores (``--stores``);
* peak RSS of the whole streaming process on 1, 3 and all slides (it must not grow with the number of slides).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, header, python, run, run_median, table


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=Path, default=DATA / "cohort")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    args = parser.parse_args(argv)
    if not args.cohort.exists():
        run([python(), str(Path(__file__).parent / "make_cohort.py"), "--out", str(args.cohort)])
    slides = sorted(args.cohort.glob("*.tiff"))

    import torch

    from wsi_screen.models import default_model_dir, load_model
    from wsi_screen.screening.run import InferConfig, decision_thresholds, resolve_aggregate
    from wsi_screen.screening.score import score_stores
    from wsi_screen.tiling.store import PatchStore

    model_dir = args.model or default_model_dir()
    fp32 = load_model(model_dir, precision="fp32")
    auto = load_model(model_dir)
    # rescored in float32 near the thresholds infer decides at (the model's, the slide rule's), as infer does
    auto.decision_thresholds = decision_thresholds(auto, resolve_aggregate(model_dir, auto, InferConfig()))
    spec = fp32.spec
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    try:
        stores = work / "stores"
        run([python(), "-m", "wsi_screen.cli", "tile", str(args.cohort), "-o", str(stores), "--mpp", str(spec.mpp),
             "--size", str(spec.input_size), "--stain", spec.stain_method, "--codec", "lz4", "--quiet"])
        locations = [str(stores / (s.stem + ".zarr")) for s in slides]
        batches = []
        for location in locations:
            store = PatchStore.open(location)
            batches += [torch.from_numpy(store.read(slice(i, min(len(store), i + args.batch_size))))
                        for i in range(0, len(store), args.batch_size)]
        n = sum(len(b) for b in batches)

        def bare(model: object, forward: Callable[[torch.Tensor], object] | None = None,
                 some: list[torch.Tensor] | None = None) -> Callable[[], None]:
            def go() -> None:
                for b in batches if some is None else some:
                    x = model.preprocess(b)  # type: ignore[attr-defined]
                    if forward is None:
                        model.predict_tensor(x)  # type: ignore[attr-defined]
                    else:
                        with torch.inference_mode():
                            forward(x)
            return go

        rows: list[list[object]] = []
        base = {}
        for name, model in (("fp32", fp32), ("bf16", load_model(model_dir, precision="bf16"))):
            model.predict_tensor(model.preprocess(batches[0]))  # warm-up (oneDNN picks its kernels)
            base[name] = median_seconds(bare(model), args.repeats)
        rows.append(["bare forward passes, eager float32 (baseline)", n, base["fp32"], n / base["fp32"], 1.0, "-"])
        rows.append(["bare forward passes, bfloat16 autocast", n, base["bf16"], n / base["bf16"],
                     base["fp32"] / base["bf16"], "-"])
        compile_note = ""
        if not args.no_compile:
            try:
                compiled = torch.compile(fp32.module)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    compiled(fp32.preprocess(batches[0]))
                    compiled(fp32.preprocess(batches[-1]))  # the last batch is smaller: a second graph
                first_call = time.perf_counter() - t0
                part = batches[: max(1, len(batches) // 3)]  # a third of the cohort: it is slow and close to eager
                n_part = sum(len(b) for b in part)
                s = median_seconds(bare(fp32, compiled, part), args.repeats)
                rate = n_part / s
                rows.append([f"bare forward passes, torch.compile float32 (first calls {first_call:.0f} s, not "
                             f"counted; a third of the patches)", n_part, s, rate, rate / (n / base["fp32"]), "-"])
            except Exception as exc:  # no C compiler, an unsupported platform: say so
                compile_note = f"torch.compile unavailable here: {type(exc).__name__}: {exc}"
        for _ in score_stores(locations, auto, batch_size=args.batch_size):
            pass  # warm-up: file cache
        prec = auto.precision
        streamed = median_seconds(lambda: [None for _ in score_stores(locations, auto, batch_size=args.batch_size)],
                                  args.repeats)
        rows.append([f"infer scoring ({prec}): stores -> background reader -> model, with domain distance", n,
                     streamed, n / streamed, base["fp32"] / streamed, base[prec] / streamed])
        domain, auto.domain = auto.domain, None
        no_domain = median_seconds(lambda: [None for _ in score_stores(locations, auto, batch_size=args.batch_size)],
                                   args.repeats)
        auto.domain = domain
        rows.append([f"infer scoring ({prec}) without the domain distance", n, no_domain, n / no_domain,
                     base["fp32"] / no_domain, base[prec] / no_domain])

        def infer_cmd(k: int, out: Path, *, stream: bool = True) -> list[str]:
            return [python(), "-m", "wsi_screen.cli", "infer", *map(str, slides[:k]), "-o", str(out),
                    "--model", str(model_dir), *(() if stream else ("--stores", str(stores))),
                    "--batch-size", str(args.batch_size), "--quiet"]

        out = work / "run"
        whole = run_median(infer_cmd(len(slides), out), args.repeats, before=lambda: shutil.rmtree(out, True))
        rows.append([f"wsi-screen infer, whole process, streaming (default: no pixel stores; {len(slides)} slides)",
                     n, whole.seconds, n / whole.seconds, base["fp32"] / whole.seconds, base[prec] / whole.seconds])
        info = json.loads((out / "run.json").read_text())  # the last repetition's
        out_kept = work / "run-stores"
        kept = run_median(infer_cmd(len(slides), out_kept, stream=False), args.repeats,
                          before=lambda: shutil.rmtree(out_kept, True))
        rows.append([f"wsi-screen infer, whole process, lz4 pixel stores reused (--stores; {len(slides)} slides)",
                     n, kept.seconds, n / kept.seconds, base["fp32"] / kept.seconds, base[prec] / kept.seconds])

        rss_rows = []
        for k in sorted({1, min(3, len(slides)), len(slides)}):
            out_k = work / f"run{k}"
            m = run(infer_cmd(k, out_k))
            rss_rows.append([k, sum(len(PatchStore.open(loc)) for loc in locations[:k]), m.seconds, m.peak_rss_mb])
        sizes = ", ".join(f"{len(PatchStore.open(loc)):,}" for loc in locations)
        print(header(f"Inference: {spec.arch} on {n:,} patches of {spec.input_size} px ({len(slides)} slides of "
                     f"{sizes} patches), batch {args.batch_size}, {torch.get_num_threads()} torch threads"))
        print(table(["method", "patches", "wall s", "patches/s", "x eager fp32 forward",
                     f"x bare forward ({prec})"], rows))
        if compile_note:
            print(f"\n{compile_note}")
        stages = info["stages"]
        per = {k: statistics.mean(s["seconds"].get(k, 0.0) for s in info["slides"])
               for k in ("open", "tile", "score", "outputs")}
        print(f"\nWhere the whole process's {info['seconds'] + (stages.get('start_up') or 0):.1f} s went (run.json): "
              f"start-up {stages.get('start_up') or 0:.2f} s (interpreter, imports, model), slides "
              f"{stages['slides']:.2f} s, run outputs {stages['run_outputs']:.2f} s; per slide on average: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in per.items()))
        print()
        print(table(["slides", "patches", "wall s", "peak RSS MB"], rss_rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
