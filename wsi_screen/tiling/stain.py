"""Stain normalisation (pure, apart from reading the target image): Macenko, Reinhard and Vahadane.

A slide's stain is *fitted* once on the pooled stained-tissue pixels of many of its patches
(:func:`fit`), the target's on the bundled reference crop or a user image (:func:`target_params`), and a
:class:`Normalizer` then maps whole batches from one to the other with these fixed parameters: every patch
of a slide gets the same colour transform, whatever else is in its batch.

Methods (``values`` of :class:`StainParams` hold only floats, so they go into store attributes as JSON):

``macenko``
    Optical density ``OD = -ln(max(I, 1) / 255)``; stained pixels (mean OD >= 0.2, no green or
    grey-black ink); the plane of the two principal eigenvectors of their OD covariance; stain vectors
    at the 1st and 99th percentile of the angle in that plane (Macenko et al. 2009). ``stain_matrix`` is
    2x3 (haematoxylin first, unit rows); ``max_concentrations`` are the 99th percentiles of the
    least-squares concentrations.
``vahadane``
    The same pixels; the stain matrix by sparse non-negative dictionary learning (Vahadane et al. 2016:
    ``min 0.5 |OD - C W|^2 + 0.1 |C|_1`` with ``C, W >= 0``, rows of ``W`` in the unit ball) on an even
    subsample; concentrations and maxima as for Macenko, so applying it costs the same.
``reinhard``
    Mean and standard deviation of the stained pixels in CIE L*a*b* (sRGB, D65: what skimage's ``rgb2lab``
    and, before quantising to 8 bits, OpenCV's ``COLOR_RGB2LAB`` compute); every pixel is then mapped
    channel-wise ``(x - mean_src) * std_tgt / std_src + mean_tgt``.

Patches that :func:`stainable` rejects (little stained tissue, pen ink, black, one flat colour) pass
through unchanged with ``ok = False``; the arithmetic is guarded so that no input yields NaN.
``docs/stain.md`` describes the default target, the thresholds and the cross-check against tiatoolbox.
The per-pixel loops are compiled (:mod:`.pixel_kernels`, numba); the tiler imports this module only for a
slide it normalises, so a run with stain ``none`` never loads numba.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import logging
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen.errors import ConfigError, StainFitError
from wsi_screen.tiling import pixel_kernels

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("none", "macenko", "reinhard", "vahadane")

#: a stained pixel has a mean optical density of at least this (glass is ~0.03; ``tissue.py``'s ``min_od``)
MIN_MEAN_OD = 0.2
#: the same test on integers: ``max(r,1) * max(g,1) * max(b,1) <= 255**3 * exp(-3 * MIN_MEAN_OD)``
_STAINED_MAX_PRODUCT = math.floor(255.0**3 * math.exp(-3.0 * MIN_MEAN_OD))
#: a patch needs at least this fraction of stained pixels to be normalised
MIN_STAINED_FRACTION = 0.025
#: a patch whose pen-coloured pixels exceed this fraction of its stained + pen pixels is left alone
MAX_PEN_FRACTION = 0.1
#: a patch whose stained pixels vary less than this (std of R+G+B, 0-765) is a flat fill, not tissue
MIN_TEXTURE_STD = 8.0
#: :func:`stainable` judges a patch on about this many evenly spaced pixels
STAT_PIXELS = 8192
#: fewer pooled stained pixels than this and :func:`fit` refuses
MIN_FIT_PIXELS = 2000
#: pooled pixels beyond this are subsampled evenly (deterministically) before fitting
MAX_FIT_PIXELS = 1_000_000
#: pixels the Vahadane dictionary is learned on (an even subsample of the pooled pixels)
VAHADANE_PIXELS = 50_000
#: Vahadane's sparsity weight (lambda, as in the paper and StainTools) and alternating iterations
VAHADANE_LAMBDA = 0.1
VAHADANE_ITERATIONS = 100
#: Macenko's angle percentiles (1 and 99) and the percentile taken as a stain's maximum concentration
ANGLE_PERCENTILE = 1.0
MAX_CONC_PERCENTILE = 99.0
#: two stain vectors closer than this (degrees) cannot be separated
MIN_STAIN_ANGLE_DEG = 2.0
#: larger target images are refused (a target is a representative crop, not a slide)
MAX_TARGET_PIXELS = 64_000_000

BUNDLED_TARGET = "resources/stain_target.png"
BUNDLED_TARGET_NAME = "CMU-1-Small-Region.svs level 0, x=768 y=2048, 512x512 px (H&E skin, CC0)"

_F32 = np.float32
#: Reinhard: once a slide has used this many pixels, its map is tabulated over all 2**24 colours (48 MB; costs as
#: much as mapping 2**24 pixels) and looked up from then on: at most twice the best choice made in hindsight
REINHARD_TABLE_AFTER = 1 << 24
_CHUNK_PX = 1 << 14  # pixels per chunk of the float pipelines: temporaries stay in cache
# CIE L*a*b*, exactly as skimage.color (sRGB primaries, D65 2-degree white)
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
# left-multiplying matrices for planar (3, n) pixels: linear RGB -> XYZ / white, and back; f -> L*a*b*
_M_XYZ = (_XYZ_FROM_RGB / _WHITE_D65[:, None]).astype(_F32)
_M_RGB = (np.linalg.inv(_XYZ_FROM_RGB) * _WHITE_D65[None, :]).astype(_F32)
_M_LAB = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=_F32)
_LAB_OFFSET = np.array([[-16.0], [0.0], [0.0]], dtype=_F32)
_LAB_EPS = 0.008856
_LAB_KAPPA = 7.787
_LAB_F_EPS = 0.2068966  # f(_LAB_EPS)
_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)


@dataclass(frozen=True)
class StainParams:
    """Fitted parameters of one method; ``values`` holds only floats and lists of floats."""

    method: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready deep copy: ``{"method": ..., "values": {...}}``."""
        return {"method": self.method, "values": copy.deepcopy(self.values)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StainParams:
        """Rebuild parameters written by :meth:`to_json`; malformed input raises :class:`ConfigError`."""
        try:
            method = str(d["method"])
            values = dict(d.get("values", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"stain parameters are malformed (need 'method' and 'values'): {exc}") from None
        _check_method(method)
        params = cls(method, copy.deepcopy(values))
        _validate(params)
        return params

    def array(self, key: str) -> np.ndarray:
        """One entry of ``values`` as a float64 array."""
        return np.asarray(self.values[key], dtype=np.float64)


# --- public functions ---------------------------------------------------------------------------------
def stainable(batch: np.ndarray) -> np.ndarray:
    """Which patches of a uint8 ``(B, H, W, 3)`` batch hold enough stained tissue to normalise.

    A patch qualifies when at least :data:`MIN_STAINED_FRACTION` of its pixels are stained (mean optical
    density >= :data:`MIN_MEAN_OD`, not pen-coloured), pen colours
    (saturated scarlet, green, blue, or grey-black ink) make up at most :data:`MAX_PEN_FRACTION` of its
    stained and pen pixels, and its stained pixels are not one flat colour (std of R+G+B at least
    :data:`MIN_TEXTURE_STD`). White, empty, black and single-colour patches do not. The statistics use
    about :data:`STAT_PIXELS` evenly spaced pixels per patch.

    Returns
    -------
    numpy.ndarray
        bool ``(B,)``.
    """
    arr = _check_batch(batch)
    n_px = arr.shape[1] * arr.shape[2]
    if arr.shape[0] == 0 or n_px == 0:
        return np.zeros(arr.shape[0], dtype=bool)
    stats = np.zeros((arr.shape[0], 5))
    pixel_kernels.patch_stats(arr.reshape(arr.shape[0], n_px, 3), max(1, n_px // STAT_PIXELS), _pen_lut(),
                              _STAINED_MAX_PRODUCT, stats)
    n_sampled, n_stained, n_pen, s1, s2 = stats.T
    denom = np.maximum(n_stained, 1)
    std = np.sqrt(np.maximum(s2 / denom - (s1 / denom) ** 2, 0.0))
    return np.asarray((n_stained >= MIN_STAINED_FRACTION * n_sampled)
                      & (n_pen <= MAX_PEN_FRACTION * (n_stained + n_pen))
                      & (std >= MIN_TEXTURE_STD), dtype=bool)


def fit(images: np.ndarray | Sequence[np.ndarray], method: str) -> StainParams:
    """Fit ``method`` on the pooled stained-tissue pixels of ``images`` (one slide's tissue patches).

    ``images`` is a uint8 ``(N, H, W, 3)`` array, one ``(H, W, 3)`` image, or a sequence of ``(H, W, 3)``
    images of any sizes. Only images that :func:`stainable` accepts contribute, and of those only the
    stained pixels (mean optical density >= :data:`MIN_MEAN_OD`) that are not green or grey-black ink;
    beyond :data:`MAX_FIT_PIXELS` such pixels an even subsample is used.

    Raises
    ------
    ConfigError
        ``method`` is not one of :data:`METHODS`.
    StainFitError
        Fewer than :data:`MIN_FIT_PIXELS` stained pixels, or stains that cannot be told apart.
    """
    _check_method(method)
    if method == "none":
        return StainParams("none", {})
    pixels = _pooled_pixels(images)
    if method == "reinhard":
        lab = _rgb_to_lab(pixels).astype(np.float64)
        params = StainParams("reinhard", {"lab_mean": _floats(lab.mean(axis=0)),
                                          "lab_std": _floats(lab.std(axis=0))})
    else:
        od = _OD_LUT[pixels]
        matrix = _macenko_matrix(od) if method == "macenko" else _vahadane_matrix(od)
        _check_matrix(matrix, method)
        conc = od @ np.linalg.pinv(matrix)
        max_c = np.percentile(conc, MAX_CONC_PERCENTILE, axis=0)
        if not (np.all(np.isfinite(max_c)) and np.all(max_c > 1e-3)):
            raise StainFitError(f"{method}: one stain is missing from the sample (99th-percentile "
                                f"concentrations {np.round(max_c, 4).tolist()})")
        params = StainParams(method, {"stain_matrix": [_floats(row) for row in matrix],
                                      "max_concentrations": _floats(max_c)})
    _validate(params)
    log.debug("fitted %s on %d stained pixels: %s", method, len(pixels), params.values)
    return params


def target_params(method: str, target: str | os.PathLike[str] | None = None
                  ) -> tuple[StainParams, dict[str, Any]]:
    """Parameters of the target appearance, and where they came from.

    ``target`` None means the bundled reference crop (see ``docs/stain.md``); otherwise a PNG, JPEG or
    TIFF file (``stain_target``). The description is ``{"name", "sha256" (of the file's bytes),
    "source": "bundled" | "user", "path"}``. For ``method == "none"`` no image is read and the description
    is ``{"name": None, "sha256": None, "source": "none", "path": None}``. Fitted targets are cached by
    method and file hash, so asking once per slide is cheap.

    Raises
    ------
    ConfigError
        Unknown method; the target file cannot be read, or holds too little stained tissue.
    """
    _check_method(method)
    if method == "none":
        return StainParams("none", {}), {"name": None, "sha256": None, "source": "none", "path": None}
    if target is None:
        data = resources.files("wsi_screen").joinpath(BUNDLED_TARGET).read_bytes()
        desc = {"name": BUNDLED_TARGET_NAME, "sha256": hashlib.sha256(data).hexdigest(),
                "source": "bundled", "path": f"wsi_screen/{BUNDLED_TARGET}"}
        return _target_cached(method, data, "bundled stain target"), desc
    path = Path(target).expanduser().resolve()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"`stain_target` {target}: cannot read the file ({exc.strerror or exc})") from None
    desc = {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "source": "user",
            "path": str(path)}
    return _target_cached(method, data, f"`stain_target` {target}"), desc


class Normalizer:
    """Map patches from a slide's fitted stain (``source``) to the ``target``'s, a batch at a time."""

    def __init__(self, source: StainParams, target: StainParams) -> None:
        _check_method(source.method)
        if source.method != target.method:
            raise ConfigError(f"the stain source was fitted with {source.method!r} but the target with "
                              f"{target.method!r}; fit both with the same method")
        _validate(source)
        _validate(target)
        self.source = source
        self.target = target
        self.method = source.method
        self._matrix = np.eye(3, dtype=_F32)  # left-multiplies planar (3, n) pixels
        self._offset = np.zeros((3, 1), dtype=_F32)
        if self.method in ("macenko", "vahadane"):
            # OD_out = OD_in @ T with T = pinv(W_src) diag(maxC_tgt / maxC_src) W_tgt (linear in OD)
            scale = target.array("max_concentrations") / source.array("max_concentrations")
            t = np.linalg.pinv(source.array("stain_matrix")) @ np.diag(scale) @ target.array("stain_matrix")
            self._matrix = t.T.astype(_F32)
            self._tables = od_map_tables(t.T)
        elif self.method == "reinhard":
            self._matrix, self._offset = _reinhard_f_map(source, target)
        # Reinhard's per-pixel maths is slow (three cube roots a pixel); past REINHARD_TABLE_AFTER pixels the map is
        # tabulated once over every colour with the same code, so the bytes do not depend on when that happens
        self._colour_table: np.ndarray | None = None
        self._pixels_seen = 0
        self._table_lock = threading.Lock()
        if not np.all(np.abs(self._matrix) < 1e4):
            raise ConfigError(f"{self.method} stain parameters give a degenerate colour map; refit them")

    def apply(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalise a uint8 ``(B, H, W, 3)`` batch: ``(uint8 batch of the same shape, ok bool (B,))``.

        Patches with ``ok`` False (see :func:`stainable`, and every patch for method ``none``) are
        returned unchanged, byte for byte.
        """
        arr = _check_batch(batch)
        if self.method == "none" or arr.size == 0:
            return arr.copy(), np.zeros(arr.shape[0], dtype=bool)
        ok = stainable(arr)
        if ok.all():
            return self._transform(arr), ok
        out = arr.copy()
        if ok.any():
            out[ok] = self._transform(arr[ok])
        return out, ok

    def to_json(self) -> dict[str, Any]:
        """``{"source": ..., "target": ...}``, each as written by :meth:`StainParams.to_json`."""
        return {"source": self.source.to_json(), "target": self.target.to_json()}

    def _transform(self, rgb: np.ndarray) -> np.ndarray:
        """Map every pixel: Macenko and Vahadane in one compiled pass (:mod:`.pixel_kernels`); Reinhard through
        its colour table (:meth:`_reinhard_table`) once a slide has used enough pixels, in numpy before."""
        flat = rgb.reshape(-1, 3)
        out = np.empty_like(flat)
        if self.method != "reinhard":
            pixel_kernels.od_map(flat, self._tables, out)
            return out.reshape(rgb.shape)
        table = self._reinhard_table(len(flat))
        if table is None:
            self._reinhard(flat, out)
        else:
            pixel_kernels.colour_table_map(flat, table, out)
        return out.reshape(rgb.shape)

    def _reinhard(self, flat: np.ndarray, out: np.ndarray) -> None:
        """The Reinhard map of uint8 pixels ``(n, 3)`` into ``out``, in chunks that keep temporaries in cache, as
        planar ``(3, n)`` floats that keep them fast."""
        for start in range(0, len(flat), _CHUNK_PX):
            px = flat[start:start + _CHUNK_PX].T
            f = self._matrix @ _lab_f(_linearize(px))
            f += self._offset
            res = _encode(_M_RGB @ _lab_finv(f))
            chunk = out[start:start + px.shape[1]]
            for k in range(3):  # column by column: much faster than one transposed copy
                chunk[:, k] = res[k]

    def _reinhard_table(self, n_pixels: int) -> np.ndarray | None:
        """The (2**24, 3) table of :meth:`_reinhard` over every colour (``r << 16 | g << 8 | b``), built once
        :data:`REINHARD_TABLE_AFTER` pixels have been asked for (None before)."""
        with self._table_lock:  # the tiler's stain threads share one normaliser
            self._pixels_seen += n_pixels
            if self._colour_table is None and self._pixels_seen > REINHARD_TABLE_AFTER:
                table = np.empty((1 << 24, 3), dtype=np.uint8)
                step = 1 << 20
                for start in range(0, 1 << 24, step):
                    code = np.arange(start, start + step, dtype=np.uint32)
                    colours = np.stack([code >> 16, (code >> 8) & 255, code & 255], axis=1).astype(np.uint8)
                    self._reinhard(colours, table[start:start + step])
                self._colour_table = table
            return self._colour_table


# --- pixel classes ------------------------------------------------------------------------------------
def _check_batch(batch: np.ndarray) -> np.ndarray:
    arr = np.asarray(batch)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (B, H, W, 3) batch, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


@functools.cache
def _pen_lut() -> np.ndarray:
    """Ink colours on a 6-bit-per-channel RGB grid (uint8 codes, 2**18 cells, judged at each cell's centre).

    Bit 0 (:data:`.pixel_kernels.LUT_PEN`): any pen colour, after :func:`wsi_screen.tiling.tissue.pen_mask`'s
    families tightened for single patches: H&E runs from purple to pink (HSV hue ~0.67-0.96), ink is green/teal,
    pure blue, saturated scarlet, or unsaturated grey-black. Bit 1 (:data:`.pixel_kernels.LUT_INK`): the part no
    H&E pixel ever has (green/teal and grey-black), excluded from fits; dark navy and crimson pixels can be dense
    haematoxylin or eosin as well as ink, so they only count against a patch, never leave a fit.
    """
    levels = (np.arange(64, dtype=np.float64) * 4 + 1.5) / 255.0
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    mx = np.maximum(np.maximum(r, g), b)
    chroma = mx - np.minimum(np.minimum(r, g), b)
    sat = chroma / mx
    c = np.maximum(chroma, 1e-9)
    hue = np.where(mx == r, ((g - b) / c) % 6.0,
                   np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0)) / 6.0
    green = (hue >= 0.20) & (hue <= 0.55) & (sat >= 0.25) & (chroma >= 0.08)
    blue = (hue > 0.55) & (hue <= 0.67) & (sat >= 0.5)
    red = ((hue >= 0.96) | (hue <= 0.03)) & (sat >= 0.6) & (mx >= 0.3)
    black = (mx < 0.25) & (sat < 0.4)
    ink = green | black
    pen, unambiguous = (ink | blue | red).astype(np.uint8), ink.astype(np.uint8)
    codes = pen * pixel_kernels.LUT_PEN + unambiguous * pixel_kernels.LUT_INK
    return np.asarray(codes.reshape(-1), dtype=np.uint8)


def _pixel_classes(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks, bool ``(B, n)``, of uint8 pixels ``(B, n, 3)``: stained non-pen, pen, and fit pixels.

    Stained pixels have a mean optical density of at least :data:`MIN_MEAN_OD` (on integers:
    :data:`_STAINED_MAX_PRODUCT`) and no pen colour; fit pixels are the stained ones, pen or not, that are not
    unambiguous ink (see :func:`_pen_lut`). One compiled pass (:func:`.pixel_kernels.pixel_classes`).
    """
    codes = np.empty(flat.shape[:2], dtype=np.uint8)
    pixel_kernels.pixel_classes(np.ascontiguousarray(flat), _pen_lut(), _STAINED_MAX_PRODUCT, codes)
    return ((codes & pixel_kernels.STAINED) > 0, (codes & pixel_kernels.PEN) > 0,
            (codes & pixel_kernels.FIT) > 0)


def _pooled_pixels(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Fit pixels (uint8 ``(n, 3)``) of the stainable images, evenly capped at :data:`MAX_FIT_PIXELS`."""
    if isinstance(images, np.ndarray):
        batches = [images[None] if images.ndim == 3 else images]
    else:
        batches = [np.asarray(im)[None] for im in images]
    pools: list[np.ndarray] = []
    n_images = n_used = 0
    for batch in batches:
        arr = _check_batch(batch)
        n_images += arr.shape[0]
        if arr.shape[0] == 0 or arr.shape[1] * arr.shape[2] == 0:
            continue
        ok = stainable(arr)
        flat = arr[ok].reshape(-1, 3)
        _, _, fit_px = _pixel_classes(flat[None])
        n_used += int(ok.sum())
        pools.append(flat[fit_px[0]])
    pixels = np.concatenate(pools) if pools else np.zeros((0, 3), dtype=np.uint8)
    if len(pixels) < MIN_FIT_PIXELS:
        raise StainFitError(f"too little stained tissue to fit the stain: {len(pixels)} stained pixels in "
                            f"{n_used} usable of {n_images} image(s), need at least {MIN_FIT_PIXELS}")
    if len(pixels) > MAX_FIT_PIXELS:
        pixels = pixels[_even(len(pixels), MAX_FIT_PIXELS)]
    return pixels


def _even(n: int, k: int) -> np.ndarray:
    """``k`` evenly spread indices into ``range(n)`` (a deterministic subsample)."""
    return (np.arange(k, dtype=np.int64) * n) // k


# --- optical density methods --------------------------------------------------------------------------
def _h_first(matrix: np.ndarray) -> np.ndarray:
    """Order stain rows haematoxylin first (it absorbs more red) and scale them to unit length."""
    if matrix[0, 0] < matrix[1, 0]:
        matrix = matrix[[1, 0]]
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), dtype=np.float64)


def _macenko_matrix(od: np.ndarray) -> np.ndarray:
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, [2, 1]]
    plane[:, plane[0] < 0] *= -1  # orient both axes towards positive red OD, as tiatoolbox and StainTools
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100.0 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([math.cos(lo), math.sin(lo)])
    v2 = plane @ np.array([math.cos(hi), math.sin(hi)])
    return _h_first(np.stack([v1, v2]))


def _vahadane_matrix(od: np.ndarray) -> np.ndarray:
    """Two stains by sparse non-negative dictionary learning (deterministic, no random state).

    Solves Vahadane's ``min 0.5 |OD - C W|^2 + lambda |C|_1`` over ``C >= 0`` and non-negative ``W`` with
    rows in the unit ball (the problem SPAMS' ``trainDL`` solves for StainTools, and scikit-learn's
    ``dict_learning(positive_code=True, positive_dict=True)``) by alternating an exact non-negative lasso
    for every pixel's two concentrations (closed form for two atoms, vectorised) with scikit-learn's
    block-coordinate atom update, from the Macenko estimate of the same pixels. scikit-learn's own solver
    loops over pixels in Python (seconds for a few thousand pixels); this one learns on
    :data:`VAHADANE_PIXELS` pixels in well under a second.
    """
    x = od[_even(len(od), VAHADANE_PIXELS)] if len(od) > VAHADANE_PIXELS else od
    dic = np.clip(_macenko_matrix(x), 0.0, None)
    dic /= np.maximum(np.linalg.norm(dic, axis=1, keepdims=True), 1e-12)
    for _ in range(VAHADANE_ITERATIONS):
        code = _nn_lasso2(x, dic, VAHADANE_LAMBDA)
        gram = code.T @ code
        cross = x.T @ code  # (3, 2)
        for k in range(2):
            if gram[k, k] <= 1e-12:
                continue
            atom = np.clip(dic[k] + (cross[:, k] - dic.T @ gram[:, k]) / gram[k, k], 0.0, None)
            dic[k] = atom / max(float(np.linalg.norm(atom)), 1.0)
    return _h_first(dic)


def _nn_lasso2(x: np.ndarray, dic: np.ndarray, lam: float) -> np.ndarray:
    """Exact ``argmin_{c >= 0} 0.5 |x - c D|^2 + lam (c_1 + c_2)`` for every row of ``x``; ``D`` is 2x3.

    The problem is convex, so the solution is the one candidate support (both atoms, only the first, only
    the second, none) that satisfies the KKT conditions.
    """
    g = dic @ dic.T
    b = x @ dic.T - lam  # (n, 2): correlations minus the l1 weight
    out = np.zeros_like(b)
    det = g[0, 0] * g[1, 1] - g[0, 1] * g[1, 0]
    for k in (0, 1):
        if g[k, k] > 1e-12:
            ck = b[:, k] / g[k, k]
            only = (ck > 0) & (b[:, 1 - k] - g[1 - k, k] * ck <= 0)
            out[only, k] = ck[only]
    if det > 1e-12:
        c0 = (g[1, 1] * b[:, 0] - g[0, 1] * b[:, 1]) / det
        c1 = (g[0, 0] * b[:, 1] - g[1, 0] * b[:, 0]) / det
        both = (c0 > 0) & (c1 > 0)
        out[both, 0] = c0[both]
        out[both, 1] = c1[both]
    return out


def _check_matrix(matrix: np.ndarray, method: str) -> None:
    if not np.all(np.isfinite(matrix)):
        raise StainFitError(f"{method}: the stain vectors could not be estimated (non-finite result)")
    angle = math.degrees(math.acos(float(np.clip(matrix[0] @ matrix[1], -1.0, 1.0))))
    if angle < MIN_STAIN_ANGLE_DEG:
        raise StainFitError(f"{method}: the two stains could not be told apart (vectors {angle:.2f} degrees "
                            "apart); the sample shows a single stain colour")


def od_map_tables(matrix: np.ndarray) -> np.ndarray:
    """The (3, 3, 256) factor tables of an OD-space map (3x3, left-multiplying planar ``-OD``):
    ``255 exp(matrix @ -OD)`` is ``E[c, 0, r] E[c, 1, g] E[c, 2, b]`` (see :mod:`.pixel_kernels`)."""
    m = np.asarray(matrix, dtype=np.float64)
    with np.errstate(over="ignore"):  # a degenerate map overflows to inf; the kernel clips it to white
        tables = np.exp(m[:, :, None] * -_OD_LUT[None, None, :])
    tables[:, 0, :] *= 255.0
    return np.ascontiguousarray(tables)


# --- CIE L*a*b* (skimage-compatible, planar float32) ---------------------------------------------------
def _linearize(px: np.ndarray) -> np.ndarray:
    """uint8 planar sRGB ``(3, n)`` -> float32 linear light (``take`` is fastest with intp indices)."""
    return np.take(_LINEAR_LUT, px.astype(np.intp))


def _lab_f(lin: np.ndarray) -> np.ndarray:
    """Linear RGB ``(3, n)`` -> CIE ``f(X/Xn), f(Y/Yn), f(Z/Zn)`` (L*a*b* before its final linear mix)."""
    xyz = _M_XYZ @ lin
    f = np.cbrt(xyz)
    if xyz.min() <= _LAB_EPS:
        low = xyz * _F32(_LAB_KAPPA)
        low += _F32(16.0 / 116.0)
        np.copyto(f, low, where=xyz <= _LAB_EPS)
    return f


def _lab_finv(f: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_lab_f` (XYZ / white); negative values clip to 0 as in skimage."""
    np.maximum(f, _F32(0.0), out=f)
    cube = f * f
    cube *= f
    if f.min() <= _LAB_F_EPS:
        low = f - _F32(16.0 / 116.0)
        low *= _F32(1.0 / _LAB_KAPPA)
        np.copyto(cube, low, where=f <= _LAB_F_EPS)
    return cube


def _encode(lin: np.ndarray) -> np.ndarray:
    """Linear light (any float) -> uint8 sRGB, through a 16-bit table (error < 0.03 grey levels)."""
    lin *= _F32(1 << _ENCODE_BITS)
    np.clip(lin, _F32(0.0), _F32((1 << _ENCODE_BITS) - 1), out=lin)
    return np.take(_ENCODE_LUT, lin.astype(np.intp))


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB ``(..., 3)`` -> float32 CIE L*a*b* (D65), as ``skimage.color.rgb2lab``."""
    flat = rgb.reshape(-1, 3)
    out = np.empty(flat.shape, dtype=_F32)
    for start in range(0, len(flat), _CHUNK_PX):
        lab = _M_LAB @ _lab_f(_linearize(flat[start:start + _CHUNK_PX].T))
        lab += _LAB_OFFSET
        out[start:start + lab.shape[1]] = lab.T
    return out.reshape(rgb.shape)


def _reinhard_f_map(source: StainParams, target: StainParams) -> tuple[np.ndarray, np.ndarray]:
    """The Reinhard map on ``f = (fx, fy, fz)`` planes: ``f_out = A @ f_in + c`` (an exact rearrangement).

    ``L = 116 fy - 16``, ``a = 500 (fx - fy)``, ``b = 200 (fy - fz)``; mapping each of L, a, b affinely
    and converting back is affine in ``(fx, fy, fz)``, which saves two passes over every pixel.
    """
    s = target.array("lab_std") / source.array("lab_std")
    t = target.array("lab_mean") - source.array("lab_mean") * s  # lab_out = s * lab_in + t
    cy = (t[0] + 16.0 - 16.0 * s[0]) / 116.0
    a = np.array([[s[1], s[0] - s[1], 0.0],
                  [0.0, s[0], 0.0],
                  [0.0, s[0] - s[2], s[2]]])
    c = np.array([cy + t[1] / 500.0, cy, cy - t[2] / 200.0])
    return a.astype(_F32), c.astype(_F32)[:, None]


def _srgb_to_linear(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)


def _linear_to_srgb(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0.0031308, 1.055 * np.clip(v, 0.0, None) ** (1 / 2.4) - 0.055, 12.92 * v)


_LINEAR_LUT = _srgb_to_linear(np.arange(256) / 255.0).astype(_F32)
_ENCODE_BITS = 16
_ENCODE_LUT = np.floor(
    np.clip(_linear_to_srgb((np.arange(1 << _ENCODE_BITS) + 0.5) / (1 << _ENCODE_BITS)), 0.0, 1.0) * 255.0
    + 0.5).astype(np.uint8)


# --- validation, targets --------------------------------------------------------------------------------
def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown stain method {method!r}; choose one of {', '.join(METHODS)}")


def _floats(a: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "none": {},
    "macenko": {"stain_matrix": (2, 3), "max_concentrations": (2,)},
    "vahadane": {"stain_matrix": (2, 3), "max_concentrations": (2,)},
    "reinhard": {"lab_mean": (3,), "lab_std": (3,)},
}


def _validate(params: StainParams) -> None:
    """Raise :class:`ConfigError` unless ``params.values`` holds the method's keys with finite values."""
    for key, shape in _SHAPES[params.method].items():
        try:
            value = np.asarray(params.values[key], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{params.method} stain parameters lack a numeric {key!r}") from None
        if value.shape != shape or not np.all(np.isfinite(value)):
            raise ConfigError(f"{params.method} stain parameter {key!r} must be finite with shape {shape}, "
                              f"got shape {value.shape}")
        if key in ("max_concentrations", "lab_std") and not np.all(value > 0):
            raise ConfigError(f"{params.method} stain parameter {key!r} must be positive, "
                              f"got {value.tolist()}")


#: fitted targets by (method, sha256 of the file); the pipeline asks once per slide
_TARGET_CACHE: dict[tuple[str, str], StainParams] = {}
_TARGET_CACHE_SIZE = 16
_TARGET_LOCK = threading.Lock()


def _target_cached(method: str, data: bytes, label: str) -> StainParams:
    key = (method, hashlib.sha256(data).hexdigest())
    with _TARGET_LOCK:  # slides may be tiled from several threads
        params = _TARGET_CACHE.get(key)
        if params is None:
            params = _fit_target(method, data, label)
            if len(_TARGET_CACHE) >= _TARGET_CACHE_SIZE:
                _TARGET_CACHE.pop(next(iter(_TARGET_CACHE)))
            _TARGET_CACHE[key] = params
    return StainParams(params.method, copy.deepcopy(params.values))


def _fit_target(method: str, data: bytes, label: str) -> StainParams:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_TARGET_PIXELS:
                    raise ConfigError(f"{label}: image is {im.width}x{im.height} px; use a representative "
                                      f"crop of at most {MAX_TARGET_PIXELS} pixels")
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ConfigError:
        raise
    except UnidentifiedImageError:  # its message names an in-memory buffer, not the file
        raise ConfigError(f"{label}: not a readable PNG, JPEG or TIFF image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"{label}: not a readable PNG, JPEG or TIFF image ({exc})") from None
    try:
        return fit(rgb, method)
    except StainFitError as exc:
        raise ConfigError(f"{label}: cannot be used as the stain target: {exc}") from None
