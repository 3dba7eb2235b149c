"""Anchor: a single-thread libvips loop reading the same patches (pyvips with the pyvips-binary wheel).

    PYTHON bench/_vips_loop.py SLIDE COORDS.npy TILE_L0
Fetches every patch at level 0 with ``pyvips.Region.fetch`` in the store's order, as uint8 RGB arrays, on one
libvips thread; prints the loop's own seconds (start-up excluded) and the number of patches.
"""

import os
import sys
import time

os.environ.setdefault("VIPS_CONCURRENCY", "1")

import numpy as np
import pyvips

slide, coords_path, tile_l0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
coords = np.load(coords_path)
image = pyvips.Image.new_from_file(slide, access="random")
if image.bands == 4:
    image = image.extract_band(0, n=3)
region = pyvips.Region.new(image)
t0 = time.perf_counter()
for x, y in coords:
    data = region.fetch(int(x), int(y), tile_l0, tile_l0)
    np.frombuffer(data, dtype=np.uint8).reshape(tile_l0, tile_l0, 3)
print(f"{time.perf_counter() - t0:.4f} {len(coords)}")
