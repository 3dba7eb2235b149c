"""Binary erosion/dilation by a Euclidean disk: wsi_screen.tiling.tissue's shifted views (_disk_morphology) against
what it replaced in the same run (scipy's binary_erosion/dilation with the disk up to radius 4, the distance
transform beyond), on the example slide's tissue mask resampled to a given size. Checks the pixels are equal.

    PYTHONPATH=. python bench/tissue_morphology.py [--side 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from wsi_screen.tiling import tissue


def _old(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    if radius <= 4:  # the old _SMALL_RADIUS: scipy with the disk
        if erode:
            return np.asarray(ndi.binary_erosion(mask, structure=tissue._disk(radius), border_value=1), dtype=bool)
        return np.asarray(ndi.binary_dilation(mask, structure=tissue._disk(radius)), dtype=bool)
    if erode:
        padded = np.pad(mask, radius + 1, constant_values=True)
        inside = ndi.distance_transform_edt(padded) > radius
        return np.asarray(inside[radius + 1:-radius - 1, radius + 1:-radius - 1], dtype=bool)
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius, dtype=bool)


def _best(fn, args: tuple, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import openslide

    with openslide.OpenSlide("examples/CMU-1-Small-Region.svs") as s:
        rgb = np.asarray(s.get_thumbnail((512, 512)).convert("RGB"))
    small = rgb.mean(axis=2) < 215  # tissue-ish: darker than glass
    mask = np.asarray(Image.fromarray(small).resize((args.side, args.side), Image.Resampling.NEAREST), dtype=bool)
    print(f"CPU: {platform.processor() or platform.machine()}; mask {mask.shape}, {mask.mean():.0%} foreground")
    print("| op | radius | before (ms) | after (ms) | ratio |\n|---|---|---|---|---|")
    for erode in (True, False):
        for radius in (2, 3, 8, 16, 24):
            new = tissue._disk_morphology(mask, radius, erode=erode)
            assert np.array_equal(new, _old(mask, radius, erode))
            before = _best(_old, (mask, radius, erode), args.repeats)
            after = _best(lambda m, r, e: tissue._disk_morphology(m, r, erode=e), (mask, radius, erode), args.repeats)
            print(f"| {'erode' if erode else 'dilate'} | {radius} | {before * 1e3:.1f} | {after * 1e3:.1f} | "
                  f"{after / before:.2f}x |")


if __name__ == "__main__":
    main()
