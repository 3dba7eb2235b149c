"""Baseline: tiatoolbox's patch extraction over the same patches (run with tiatoolbox's own venv).

    /work/tiatoolbox-venv/bin/python bench/_tiatoolbox_extract.py SLIDE COORDS.npy TILE_L0 SIZE MPP
Reads every patch with tiatoolbox's PointsPatchExtractor at MPP (centres of our grid) and prints the seconds.
"""

import sys
import time

import numpy as np
from tiatoolbox.tools.patchextraction import get_patch_extractor
from tiatoolbox.wsicore.wsireader import WSIReader

slide, coords_path = sys.argv[1], sys.argv[2]
tile_l0, size, mpp = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
coords = np.load(coords_path)
reader = WSIReader.open(slide)
slide_mpp = float(reader.info.mpp[0])
centres = (coords + tile_l0 / 2) * slide_mpp / mpp  # at the requested resolution
t0 = time.perf_counter()
extractor = get_patch_extractor("point", input_img=reader, locations_list=centres, patch_size=(size, size),
                                resolution=mpp, units="mpp")
n = 0
for patch in extractor:
    n += patch.shape[0] > 0
print(f"{time.perf_counter() - t0:.4f} {n}")
