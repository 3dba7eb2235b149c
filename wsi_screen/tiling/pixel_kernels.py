"""Compiled per-pixel loops (numba) for stain normalisation: one pass over the pixels instead of a dozen.

Every numpy operation over a slide's pixels is a pass through memory: the Macenko/Vahadane map written with
numpy (float conversion, log, a 3x3 product, exp, rounding, clipping) made a dozen of them, ~11 ns per pixel,
as much as decoding the JPEG tiles (bench/RESULTS.md). Here the same map is one compiled loop that keeps each
pixel in registers.

The map is ``out_c = 255 exp(sum_j T[c, j] ln(max(I_j, 1) / 255))`` (optical density is linear, so a slide's
stain maps to the target's by a 3x3 matrix ``T`` in OD space, :class:`~wsi_screen.tiling.stain.Normalizer`).
The exponential of a sum is a product of exponentials, and each factor depends on one 8-bit channel value: so
``out_c = E[c, 0, r] E[c, 1, g] E[c, 2, b]`` with ``E`` nine tables of 256 float64 entries (18 KB, in L1
cache), built once per slide (:func:`wsi_screen.tiling.stain.od_map_tables`). Rounding is half up and clipped
to 0-255, as before; against the float32 numpy pipeline this replaced, a few values in a million (8 on the
bench slide) differ, by one grey level (float rounding at a .5 boundary); tests/tiling/test_stain.py holds it to
a float64 reference.

Reinhard's map (a CIE L*a*b* round trip, three cube roots a pixel) has no such structure: a slide's map is
tabulated over all 2**24 colours by the numpy code itself (:meth:`~wsi_screen.tiling.stain.Normalizer._reinhard_table`)
and :func:`colour_table_map` looks pixels up in it, so its bytes are the numpy code's.

``nogil``: the tiler's stain threads run the loop in parallel. ``cache``: compiled once per installation (next
to this file, or numba's user cache directory when that is read-only), then loaded in ~0.1 s.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def od_map(flat: np.ndarray, tables: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i, c] = round_half_up(min(E[c,0,r] E[c,1,g] E[c,2,b], 255))`` for uint8 pixels ``flat`` (n, 3)."""
    for i in range(flat.shape[0]):
        r = flat[i, 0]
        g = flat[i, 1]
        b = flat[i, 2]
        for c in range(3):
            v = tables[c, 0, r] * tables[c, 1, g] * tables[c, 2, b] + 0.5
            if not v < 255.0:  # also NaN (inf * 0 from a degenerate map)
                v = 255.0
            out[i, c] = np.uint8(v)


# --- pixel classes (the rule is :func:`wsi_screen.tiling.stain._pixel_classes`'s docstring) ----------------
#: bits of :func:`pixel_classes`' codes, and of the pen table's entries (pen colour, unambiguous ink)
STAINED, PEN, FIT = 1, 2, 4
LUT_PEN, LUT_INK = 1, 2


@numba.njit(inline="always")
def _classify(r: int, g: int, b: int, pen_lut: np.ndarray, max_product: int) -> int:  # pragma: no cover
    """STAINED | PEN | FIT bits of one pixel: dense (``max(r,1) max(g,1) max(b,1) <= max_product``, mean OD
    over the threshold) and not pen is stained; pen per the 6-bit table; dense and not ink is a fit pixel."""
    dense = max(r, 1) * max(g, 1) * max(b, 1) <= max_product
    code = pen_lut[((r >> 2) << 12) | ((g >> 2) << 6) | (b >> 2)]
    pen = (code & LUT_PEN) != 0
    out = 0
    if dense and not pen:
        out |= STAINED
    if pen:
        out |= PEN
    if dense and (code & LUT_INK) == 0:
        out |= FIT
    return out


@numba.njit(nogil=True, cache=True)
def pixel_classes(flat: np.ndarray, pen_lut: np.ndarray, max_product: int,
                  out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Class bits (uint8 ``(B, n)``) of uint8 pixels ``flat`` ``(B, n, 3)``."""
    for i in range(flat.shape[0]):
        for j in range(flat.shape[1]):
            out[i, j] = _classify(int(flat[i, j, 0]), int(flat[i, j, 1]), int(flat[i, j, 2]),
                                  pen_lut, max_product)


@numba.njit(nogil=True, cache=True)
def patch_stats(flat: np.ndarray, step: int, pen_lut: np.ndarray, max_product: int,
                out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per patch of ``flat`` ``(B, n, 3)``, over every ``step``-th pixel: the number of pixels sampled, of stained
    ones and of pen ones, and the sum and the sum of squares of R+G+B over the stained ones (float64 ``(B, 5)``
    in ``out``; the sums are exact)."""
    for i in range(flat.shape[0]):
        n = n_stained = n_pen = s1 = s2 = 0
        for j in range(0, flat.shape[1], step):
            r = int(flat[i, j, 0])
            g = int(flat[i, j, 1])
            b = int(flat[i, j, 2])
            bits = _classify(r, g, b, pen_lut, max_product)
            n += 1
            if bits & PEN:
                n_pen += 1
            if bits & STAINED:
                n_stained += 1
                total = r + g + b
                s1 += total
                s2 += total * total
        out[i, 0] = n
        out[i, 1] = n_stained
        out[i, 2] = n_pen
        out[i, 3] = s1
        out[i, 4] = s2


# --- a colour table ----------------------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def colour_table_map(flat: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out[i] = table[r << 16 | g << 8 | b]`` for uint8 pixels ``flat`` (n, 3) and a (2**24, 3) uint8 table."""
    for i in range(flat.shape[0]):
        k = (int(flat[i, 0]) << 16) | (int(flat[i, 1]) << 8) | int(flat[i, 2])
        out[i, 0] = table[k, 0]
        out[i, 1] = table[k, 1]
        out[i, 2] = table[k, 2]
