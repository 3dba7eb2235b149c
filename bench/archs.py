"""CPU scoring throughput of candidate architectures for the default model, against today's resnet10t.

    python bench/archs.py [--archs resnet10t,convnext_femto,...] [--patches 1024] [--repeats 3] [--threads 1]

A stronger default model must keep `infer`'s CPU scoring throughput at >= 0.8x today's (issue 27), so only
architectures that pass here are trained as candidates (``ARCHS`` of ``scripts/train_default_model.sh --device
cuda``). Each row is a child process that builds the architecture with random weights (2 classes, the bundled
model's 96 px input, channels-last, eval), wraps it as ``infer`` does (:class:`PatchClassifier`), warms it up on one
batch, then scores ``--patches`` real PCam valid patches in batches of 128 through ``predict_tensor`` (normalise,
forward, softmax), in float32 and in bfloat16 autocast. The domain distance and the reading of patches are left
out: they do not depend on the architecture (the distance's cost grows with the feature width, a few % of a
forward pass). Rows are medians of ``--repeats`` runs; the repeats go round the architectures in turn, so a change
in the machine's load touches every row alike. bfloat16 is only what ``auto`` picks on CPUs that compute it
natively (AMX or AVX512-BF16); where the table says "emulated", ``auto`` scores in float32 and the bfloat16 column
only shows what forcing it would cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, header, python, run, table

DEFAULT_ARCHS = ["resnet10t", "resnet18", "resnet14t", "convnext_atto", "convnext_femto", "regnetx_008",
                 "efficientnet_lite0", "mobilenetv3_large_100", "repvit_m1"]
BASELINE = "resnet10t"
#: the bound a candidate must keep (issue 27: infer's CPU scoring throughput >= 0.8x today's)
MIN_RATIO = 0.8


def child(arch: str, precision: str, n: int, threads: int) -> None:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from wsi_screen.models import ModelSpec, create_model
    from wsi_screen.models.classifier import PatchClassifier

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pcam = REPO.parent / "shared" / "data" / "patches" / "pcam" / "images" / "valid"
    files = sorted(pcam.rglob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"{pcam}: {len(files)} patches, {n} asked for")
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    spec = ModelSpec(arch=arch, classes=["normal", "tumour"], input_size=96, positive_class="tumour", mpp=0.972,
                     threshold=0.5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    classifier = PatchClassifier(create_model(arch, 2), spec, precision=precision)
    batches = [classifier.preprocess(images[i:i + 128]) for i in range(0, n, 128)]
    classifier.predict_tensor(batches[0])  # warm-up (oneDNN picks its kernels)
    t0 = time.perf_counter()
    for x in batches:
        classifier.predict_tensor(x)
    print(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(DEFAULT_ARCHS))
    parser.add_argument("--patches", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("ARCH", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.patches, args.threads)
        return 0
    import torch

    sys.path.insert(0, str(REPO))
    from wsi_screen.models import create_model
    from wsi_screen.models.precision import native_bf16
    from wsi_screen.models.registry import count_parameters

    archs = args.archs.split(",")
    if BASELINE not in archs:
        archs.insert(0, BASELINE)
    seconds: dict[tuple[str, str], list[float]] = {(a, p): [] for a in archs for p in ("fp32", "bf16")}
    rss: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):
        for arch in archs:
            for precision in ("fp32", "bf16"):
                m = run([python(), __file__, "--child", arch, precision, "--patches", str(args.patches),
                         "--threads", str(args.threads)])
                seconds[(arch, precision)].append(float(m.stdout.split()[0]))
                rss[(arch, precision)] = max(rss.get((arch, precision), 0.0), m.peak_rss_mb)
    rate = {k: args.patches / statistics.median(v) for k, v in seconds.items()}
    bf16 = "native" if native_bf16(torch.device("cpu")) else "emulated"
    rows = []
    for arch in archs:
        ratios = [rate[(arch, p)] / rate[(BASELINE, p)] for p in ("fp32", "bf16")]
        auto_ratio = ratios[1] if bf16 == "native" else ratios[0]
        rows.append([arch, f"{count_parameters(create_model(arch, 2)) / 1e6:.1f}", rate[(arch, "fp32")], ratios[0],
                     rate[(arch, "bf16")], ratios[1], rss[(arch, "fp32")],
                     "yes" if auto_ratio >= MIN_RATIO else "no"])
    print(header(f"Scoring throughput by architecture: {args.patches} PCam valid patches of 96 px, batch 128, "
                 f"{args.threads} torch thread(s), median of {args.repeats}"))
    print(f"bfloat16 on this CPU: {bf16} (so `--precision auto` scores in {'bf16' if bf16 == 'native' else 'fp32'})\n")
    print(table(["architecture", "M params", "fp32 patches/s", "x resnet10t fp32", "bf16 patches/s",
                 "x resnet10t bf16", "peak RSS MB", f">= {MIN_RATIO}x at auto's precision"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
