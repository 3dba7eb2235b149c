"""Build large benchmark slides from real tissue (generated, never committed).

    python bench/make_slide.py [--side 24576] [--scales 1,4,16] [--out bench/data]

A slide is a mosaic of the CMU-1-Small-Region scan (CC0, 0.499 um/px) mirror-tiled across the canvas (every
other copy flipped, so edges are seamless and tissue islands sit in glass as on a real slide), written as a
tiled pyramidal TIFF with 256-px JPEG tiles (quality 85) and a real resolution tag, which OpenSlide reads as
``generic-tiff`` at 0.499 um/px. ``--scales 1,4,16`` writes slides of 1x, 4x and 16x the area of
``side x side`` (side x2 and x4). Level 0 is generated tile by tile, so memory stays flat at any size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_screen._safe_write import atomic_path
from wsi_screen.synthetic.tiff import Level, write_pyramid

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "CMU-1-Small-Region.svs"
MPP = 0.499
TILE = 256


def load_source() -> np.ndarray:
    """The CMU scan's level 0 as RGB (2967 x 2220)."""
    import openslide

    with openslide.OpenSlide(str(SOURCE)) as osr:
        rgba = np.asarray(osr.read_region((0, 0), 0, osr.level_dimensions[0]))
    return np.ascontiguousarray(rgba[..., :3])


def mirror_block(src: np.ndarray) -> np.ndarray:
    """2x2 mirror tiling of ``src``: tiling this block periodically is seamless."""
    top = np.concatenate([src, src[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def tiles(period: np.ndarray, side: int) -> Iterator[np.ndarray]:
    """256-px tiles of a ``side`` x ``side`` canvas filled periodically with ``period``, row-major."""
    ph, pw = period.shape[:2]
    # wrap-padded copy so every tile is one contiguous slice (``wrap`` repeats the period as often as needed:
    # on coarse levels the period is smaller than a tile)
    padded = np.pad(period, ((0, TILE), (0, TILE), (0, 0)), mode="wrap")
    for y in range(0, side, TILE):
        for x in range(0, side, TILE):
            sy, sx = y % ph, x % pw
            yield padded[sy:sy + TILE, sx:sx + TILE]


def write_slide(path: Path, src: np.ndarray, side: int) -> None:
    period = mirror_block(src)
    levels = [side]
    while levels[-1] // 2 >= 2048:
        levels.append(levels[-1] // 2)

    def pyramid() -> Iterator[Level]:
        for lside in levels:
            f = side // lside
            if f == 1:
                per = period
            else:  # the period downsampled by f (sizes rounded; a benchmark does not need exact pyramids)
                ph, pw = period.shape[0] // f, period.shape[1] // f
                per = np.asarray(Image.fromarray(period).resize((pw, ph), Image.Resampling.BOX))
            yield (lside, lside, 3), tiles(per, lside)

    with atomic_path(path) as tmp:
        write_pyramid(tmp, pyramid(), mpp=MPP, tile=TILE, bigtiff=True, compressionargs={"level": 85})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=24576, help="edge of the 1x slide in pixels (multiple of 256)")
    parser.add_argument("--scales", default="1,4,16", help="area multiples to write (1, 4, 16, 64)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "data")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    src = load_source()
    for scale in (int(s) for s in args.scales.split(",")):
        side = args.side * round(scale ** 0.5)
        path = args.out / f"mosaic-{scale}x.tif"
        if path.exists():
            print(f"{path} exists ({path.stat().st_size / 1e9:.2f} GB)")
            continue
        t0 = time.perf_counter()
        write_slide(path, src, side)
        print(f"{path}: {side} x {side} px, {path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
