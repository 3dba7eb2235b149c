"""Baseline: a single-thread OpenSlide read_region loop over given level-0 coordinates.

    python bench/_openslide_loop.py SLIDE COORDS.npy TILE_L0 LEVEL
Prints the loop's own seconds (startup excluded).
"""

import sys
import time

import numpy as np
import openslide

slide, coords_path, tile_l0, level = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
coords = np.load(coords_path)
osr = openslide.OpenSlide(slide)
size = round(tile_l0 / osr.level_downsamples[level])
t0 = time.perf_counter()
for x, y in coords:
    np.asarray(osr.read_region((int(x), int(y)), level, (size, size)))
print(f"{time.perf_counter() - t0:.4f}")
