"""Baseline: tiatoolbox's patch extraction over the same patches (run with tiatoolbox's own venv).

    /work/tiatoolbox-venv/bin/python bench/_tiatoolbox_extract.py SLIDE COORDS.npy TILE_L0 SIZE MPP [STAIN TARGET N]
Reads every patch with tiatoolbox's PointsPatchExtractor at MPP (centres of our grid) and prints the seconds and
the patch count. With STAIN (macenko, reinhard or vahadane), each patch is also normalised to the TARGET image
by tiatoolbox's normaliser of that name (fitted on TARGET once; ``transform`` fits each patch's own stain, as
tiatoolbox does), for the first N patches only (its Vahadane takes ~35 ms a patch here).
"""

import logging
import sys
import time

import numpy as np
from tiatoolbox.tools.patchextraction import get_patch_extractor
from tiatoolbox.wsicore.wsireader import WSIReader

slide, coords_path = sys.argv[1], sys.argv[2]
tile_l0, size, mpp = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
stain = sys.argv[6] if len(sys.argv) > 6 else None
coords = np.load(coords_path)
normalizer = None
if stain:
    from PIL import Image
    from tiatoolbox.tools import stainnorm

    logging.getLogger("tiatoolbox").setLevel(logging.ERROR)  # its Vahadane warns on every construction
    normalizer = stainnorm.get_normalizer(stain)
    normalizer.fit(np.array(Image.open(sys.argv[7]).convert("RGB")))
    coords = coords[: int(sys.argv[8])]
reader = WSIReader.open(slide)
slide_mpp = float(reader.info.mpp[0])
centres = (coords + tile_l0 / 2) * slide_mpp / mpp  # at the requested resolution
t0 = time.perf_counter()
extractor = get_patch_extractor("point", input_img=reader, locations_list=centres, patch_size=(size, size),
                                resolution=mpp, units="mpp")
n = 0
for patch in extractor:
    if normalizer is not None:
        normalizer.transform(np.array(patch))
    n += patch.shape[0] > 0
print(f"{time.perf_counter() - t0:.4f} {n}")
