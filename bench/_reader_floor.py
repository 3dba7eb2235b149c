"""Anchor: wsi-screen's patch reader alone, the tiler's reader threads over given level-0 coordinates (no
thumbnail, tissue mask, normalisation or store): the floor under `wsi-screen tile` on this machine.

    python bench/_reader_floor.py SLIDE COORDS.npy TILE_L0 SIZE WORKERS
Prints the loop's own seconds (start-up and opening the slide excluded).
"""

import sys
import time

import numpy as np

from wsi_screen.slide.slide import Slide
from wsi_screen.tiling.pipeline import read_patches

slide_path, coords_path = sys.argv[1], sys.argv[2]
tile_l0, size, workers = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
coords = np.load(coords_path)
with Slide(slide_path) as slide:
    t0 = time.perf_counter()
    n = sum(len(batch) for _, batch in read_patches(slide, coords, tile_l0, size, workers))
    seconds = time.perf_counter() - t0
assert n == len(coords), (n, len(coords))
print(f"{seconds:.4f}")
