"""The patch codecs table of docs/store.md: store size, speed, PSNR and the bundled model's AUC per codec.

    python bench/codecs.py [--slide bench/data/mosaic-1x.tif] [--pcam PCAM_DIR] [--valid 3000]

Per codec (and quality): the store ``tile`` writes of the bench slide (224 px at 0.5 um/px, ``--stain none``
and ``--stain macenko``) against the slide file's size; encode and decode speed of one patch chunk on one
thread (MB/s of raw pixels); PSNR of every patch against the lz4 store's (lossless, the reference); and the
change in the bundled model's PCam valid AUC when the valid patches make the round trip through the codec.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, OUT, header, table

#: (codec, quality) rows of the table; None: the codec's default quality
ROWS = [("lz4", None), ("jpeg", 80), ("jpeg", 90), ("jpeg", 95), ("jpegxl", 90), ("jpegxl", 95)]


def round_trip(codec: object, images: np.ndarray) -> np.ndarray:
    """``images`` after encoding and decoding each one with the codec's numcodecs codec."""
    c = codec.numcodec()  # type: ignore[attr-defined]
    out = np.empty_like(images)
    for i, im in enumerate(images):
        c.decode(bytes(c.encode(np.ascontiguousarray(im))), out=out[i])
    return out


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR over all patches, a patch at a time (bounded temporaries)."""
    sq = sum(float(np.sum((x.astype(np.int32) - y) ** 2)) for x, y in zip(a, b, strict=True))
    mse = sq / a.size
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def tile(slide: Path, out: Path, codec: object, stain: str) -> tuple[Path, float]:
    from wsi_screen.slide.discovery import SlideSource
    from wsi_screen.tiling.grid import TileSpec
    from wsi_screen.tiling.pipeline import TileConfig, tile_slide

    shutil.rmtree(out, ignore_errors=True)
    config = TileConfig(spec=TileSpec(mpp=0.5, size_px=224), stain=stain, codec=codec)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    result = tile_slide(SlideSource(slide, slide.stem), str(out), config)
    return Path(result.store), time.perf_counter() - t0


def speed(codec: object, patches: np.ndarray) -> tuple[float, float]:
    """Encode and decode MB/s (raw pixels) of one chunk at a time on this thread."""
    enc = codec.numcodec()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    parts = [bytes(enc.encode(np.ascontiguousarray(p))) for p in patches]
    t_enc = time.perf_counter() - t0
    out = np.empty_like(patches[0])
    t0 = time.perf_counter()
    for part in parts:
        enc.decode(part, out=out)
    t_dec = time.perf_counter() - t0
    return patches.nbytes / t_enc / 1e6, patches.nbytes / t_dec / 1e6


def stratified(rows: list[dict[str, str]], n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` of ``rows`` (all of them if ``n`` is as many or more), each label in its share of the whole and at
    least once, chosen with a fixed seed, in their order. The valid split is sorted by label: its first 1,500 rows
    are all normal, so the first ``n`` gave an AUC of nan for ``n`` <= 1,500."""
    if n >= len(rows):
        return rows
    if n < 2:
        raise SystemExit(f"--valid {n}: an AUC needs at least 2 patches, one of each class")
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_label.setdefault(r["label"], []).append(i)
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for _label, group in sorted(by_label.items()):
        k = min(len(group), max(1, round(n * len(group) / len(rows))))
        picked.extend(int(i) for i in rng.choice(group, size=k, replace=False))
    return [rows[i] for i in sorted(picked)]


def pcam_auc(pcam: Path, n: int, codecs: list[object]) -> list[float]:
    import csv

    import torch
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    import wsi_screen

    torch.set_num_threads(1)
    with (pcam / "labels.csv").open() as f:
        rows = stratified([r for r in csv.DictReader(f) if r["split"] == "valid"], n)
    images = np.stack([np.asarray(Image.open(pcam / r["path"]).convert("RGB")) for r in rows])
    labels = np.array([r["label"] == "tumour" for r in rows])
    model = wsi_screen.load_model(precision="fp32")
    pos = model.spec.classes.index(model.spec.positive_class)
    aucs = []
    for codec in codecs:
        if codec is None:
            batch = images
        else:
            batch = round_trip(codec, images)
        aucs.append(float(roc_auc_score(labels, model.predict(batch)[:, pos])))
    return aucs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DATA / "mosaic-1x.tif")
    parser.add_argument("--pcam", type=Path, default=Path(os.environ.get("WSI_SCREEN_DATA", "/work/shared/data"))
                        / "patches" / "pcam")
    parser.add_argument("--valid", type=int, default=3000,
                        help="PCam valid patches scored (default 3000, all; fewer: a fixed sample, each class in "
                             "its share)")
    parser.add_argument("--speed-patches", type=int, default=512)
    args = parser.parse_args(argv)

    from wsi_screen.tiling.codecs import PatchCodec
    from wsi_screen.tiling.store import PatchStore

    codecs = [PatchCodec(name, q) for name, q in ROWS]
    slide_bytes = args.slide.stat().st_size
    work = OUT / "codecs"
    results: dict[str, dict[str, float]] = {}
    ref: np.ndarray | None = None
    for codec in codecs:  # the stores tile writes (stain none): their size, and PSNR against lz4's
        key = str(codec)
        store, seconds = tile(args.slide, work / key, codec, "none")
        pixels = PatchStore.open(store).read(slice(None))
        if ref is None:
            ref = pixels
        results[key] = {"bytes": tree_bytes(store), "tile_s": seconds, "psnr": psnr(ref, pixels), "n": len(pixels)}
        shutil.rmtree(work / key, ignore_errors=True)
        del pixels
    assert ref is not None
    sample = ref[:: max(1, len(ref) // args.speed_patches)][: args.speed_patches].copy()
    del ref
    # stain-normalised patches are what a --stain macenko store encodes: their PSNR after the codec's round trip
    store, macenko_s = tile(args.slide, work / "macenko", PatchCodec("lz4"), "macenko")
    normalised = PatchStore.open(store).read(slice(None))
    for codec in codecs:
        results[str(codec)]["psnr_macenko"] = psnr(normalised, round_trip(codec, normalised))
    del normalised
    shutil.rmtree(work / "macenko", ignore_errors=True)
    speeds = [speed(c, sample) for c in codecs]
    aucs = pcam_auc(args.pcam, args.valid, [None, *codecs])
    base_auc, aucs = aucs[0], aucs[1:]
    n = int(results["lz4"]["n"])
    print(header(f"Patch codecs: {args.slide.name} ({slide_bytes / 1e6:.0f} MB), {n} patches of 224 px at 0.5 um/px"))
    print(f"PCam valid: {args.valid} patches, bundled model float32, AUC of the original patches {base_auc:.4f}\n")
    rows = []
    lz4_bytes = results["lz4"]["bytes"]
    for codec, (enc, dec), auc in zip(codecs, speeds, aucs, strict=True):
        r = results[str(codec)]
        rows.append([str(codec), f"{r['bytes'] / 1e6:.0f} MB", f"{r['bytes'] / slide_bytes:.2f}x",
                     f"{r['bytes'] / lz4_bytes:.3f}", f"{enc:.0f}", f"{dec:.0f}", f"{r['tile_s']:.1f} s",
                     f"{r['psnr']:.1f}", f"{r['psnr_macenko']:.1f}", f"{auc - base_auc:+.4f}"])
    print(table(["codec", "store", "vs slide", "vs lz4", "encode MB/s", "decode MB/s", "tile (whole slide)",
                 "PSNR dB", "PSNR dB macenko", "PCam AUC change"], rows))
    print(f"\n`tile --stain macenko --codec lz4` of the same slide: {macenko_s:.1f} s. Encode/decode: one patch "
          f"chunk at a time, one thread, {len(sample)} patches; MB/s of raw pixels.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
