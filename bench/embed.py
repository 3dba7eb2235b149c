"""Embedding throughput and peak memory of ``wsi_screen.models.encoder`` on this machine's CPU.

    python bench/embed.py [--patches 512] [--repeats 3] [--threads 1,2]

Each row is a child process that loads an encoder, warms it up on one batch, then embeds ``--patches`` random
uint8 patches of its input size in batches of 128 (normalise, forward, pool: what ``wsi-screen embed`` does per
store, without reading the store). Reported: patches/s of that loop (median of ``--repeats`` runs) and the
child's peak RSS. Encoders: ``default`` (the bundled resnet10t, 96 px), and timm's resnet10t and
vit_small_patch16_224 (ViT-S/16, 22 M parameters: the size of the small pathology ViTs; the foundation encoders
are 14-50x bigger) with random weights written to a .safetensors file and loaded through ``load_encoder(ARCH,
weights=FILE)``, the path ``--encoder ARCH --weights FILE`` takes, at timm's input size (176 and 224 px).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, python, run_median, table

MODELS = [("default", 96), ("resnet10t", 176), ("vit_small_patch16_224", 224)]


def child(arch: str, size: int, n: int, threads: int) -> None:
    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO))
    from wsi_screen.models.encoder import load_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if arch == "default":
        encoder = load_encoder(arch)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "w.safetensors"
            save_file({k: v.contiguous() for k, v in timm.create_model(arch, num_classes=0).state_dict().items()},
                      str(path))
            encoder = load_encoder(arch, weights=path)
    if encoder.identity.input_size != size:
        raise SystemExit(f"{arch} takes {encoder.identity.input_size} px, not {size}")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    encoder.embed_tensor(images[:128])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, 128):
        encoder.embed_tensor(images[i:i + 128])
    print(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    parser.add_argument("--child", nargs=4, metavar=("ARCH", "SIZE", "N", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        arch, size, n, threads = args.child
        child(arch, int(size), int(n), int(threads))
        return 0
    rows = []
    for arch, size in MODELS:
        for threads in (int(t) for t in args.threads.split(",")):
            m = run_median([python(), __file__, "--child", arch, str(size), str(args.patches), str(threads)],
                           args.repeats, own_seconds=True)
            rows.append([arch, size, threads, args.patches, m.seconds, args.patches / m.seconds, m.peak_rss_mb])
    print(f"Machine: {machine()}\n")
    print(table(["encoder", "input px", "threads", "patches", "seconds", "patches/s", "peak RSS MB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
