"""Stage 2, tiling: tissue and pen-ink masks, the mpp-exact patch grid, stain normalisation, the patch store and
the per-slide pipeline that ties them together.
"""
