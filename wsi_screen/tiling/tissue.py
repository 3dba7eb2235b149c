"""Tissue detection on a low-resolution thumbnail (pure: arrays in, arrays out).

The mask is a label map at the thumbnail's resolution: ``GLASS`` (0), ``TISSUE`` (1), ``PEN`` (2, ink marks
of any colour) and ``ARTIFACT`` (3, dark debris, bubble rims, specks and folds too small to be tissue).
Rules, all in physical units so a slide looks the same at any thumbnail resolution:

0. The thumbnail is smoothed (Gaussian, 8 um) so JPEG noise and the pyramid level it was read from do not
   move the thresholds (the SVS, tiled-TIFF and DICOM copies of one scan give the same grid).

1. *Pen ink* is a colour no H&E stain produces: saturated red/maroon, green/teal, pure blue, or near-black
   grey. Candidate pixels are cleaned (small specks dropped) and dilated to cover the pale halo of a stroke.
2. *Tissue candidates* are pixels with chroma (max-min RGB) clearly above glass, or dark pixels with at
   least some chroma (colourless dark pixels are dust, shadows or ink).
3. Candidates that are pen are removed; thin structures (bubble rims, hairline scratches) are opened away;
   connected pieces smaller than ``min_object_um2`` are specks; holes smaller than ``max_hole_um2`` are
   filled (nuclei gaps, small lumina) while bubbles and large lumina stay holes.

The thresholds were chosen on the histolab QC tiles in ``shared/data/patches/qc-tiles`` and are checked by
``tests/tiling/test_tissue.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from wsi_screen.errors import ConfigError, plain_number
from wsi_screen.slide.threads import run_each

GLASS, TISSUE, PEN, ARTIFACT = 0, 1, 2, 3
LABELS = {"glass": GLASS, "tissue": TISSUE, "pen": PEN, "artifact": ARTIFACT}


#: the largest value of the settings that have one (all are >= 0): chroma is 0-255, saturation and value 0-1
_SETTING_MAX = {"min_chroma": 255.0, "pen_min_saturation": 1.0, "black_max_value": 1.0}


@dataclass(frozen=True, kw_only=True)
class TissueSettings:
    """Parameters of :func:`detect_tissue` (recorded in every store)."""

    #: minimum chroma (max - min of RGB, 0-255) for a pixel to count as stained
    min_chroma: float = 14.0
    #: minimum mean optical density for an unsaturated pixel to count as tissue (glass is ~0.03)
    min_od: float = 0.20
    #: pen ink must be at least this saturated (HSV saturation)
    pen_min_saturation: float = 0.45
    #: near-black ink: HSV value below this
    black_max_value: float = 0.25
    #: radius of the opening that removes thin structures, microns
    opening_um: float = 16.0
    #: tissue pieces smaller than this are specks, square microns
    min_object_um2: float = 10_000.0
    #: holes smaller than this are filled, square microns
    max_hole_um2: float = 10_000.0
    #: pen strokes are grown by this margin, microns
    pen_margin_um: float = 24.0
    #: pen pieces smaller than this are not pen (stained debris), square microns
    pen_min_um2: float = 5_000.0
    #: Gaussian smoothing of the thumbnail before any threshold, microns (sigma). It makes the mask
    #: independent of JPEG noise and of which pyramid level the thumbnail came from.
    smooth_um: float = 8.0

    def __post_init__(self) -> None:
        """Refuse settings no mask can be made with (a negative density or size, a fraction beyond 1); keep numpy's
        numbers as Python's (a store records them as JSON)."""
        for f in fields(self):
            value = plain_number(getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            top = _SETTING_MAX.get(f.name, math.inf)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or not 0 <= value <= top:
                within = "a number >= 0" if math.isinf(top) else f"a number from 0 to {top:g}"
                raise ConfigError(f"tissue setting `{f.name}` must be {within}, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, value: TissueSettings | Mapping[str, Any] | None) -> TissueSettings:
        """``value`` as settings: itself, the defaults for None, or a dict of some of the fields (the others keep
        their defaults), as :func:`wsi_screen.tissue_mask` and :func:`wsi_screen.tile` take them."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = [f.name for f in fields(cls)]
            unknown = sorted(str(k) for k in value if k not in names)
            if unknown:
                raise ConfigError(f"no tissue setting is called {', '.join(map(repr, unknown))}; they are "
                                  f"{', '.join(names)}")
            return cls(**value)
        raise ConfigError(f"tissue settings are a TissueSettings or a dict of its fields ({{'min_od': 0.15}}), not "
                          f"{value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class TissueMask:
    """A label map (see module constants) and the microns per pixel it was computed at."""

    labels: np.ndarray  # uint8 (h, w)
    mpp: float

    @property
    def tissue(self) -> np.ndarray:
        """Boolean tissue mask."""
        return self.labels == TISSUE

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the thumbnail that is tissue."""
        return float(self.tissue.mean()) if self.labels.size else 0.0

    def __repr__(self) -> str:  # not the label map's pixels
        return (f"TissueMask(shape={tuple(self.labels.shape)}, mpp={self.mpp:g}, "
                f"tissue_fraction={self.tissue_fraction:.3f})")


def _px(um: float, mpp: float) -> int:
    return max(0, round(um / mpp))


def _area_px(um2: float, mpp: float) -> int:
    return max(1, round(um2 / (mpp * mpp)))


def _ink_bits(rgb: np.ndarray, settings: TissueSettings) -> np.ndarray:
    """Per-pixel pen evidence as bits of a uint8 map: bit ``i`` weak and bit ``4 + i`` strong ink of family
    ``i`` (red, green, blue, black). Purely per pixel, so it can be computed strip by strip."""
    img = rgb.astype(np.float32)
    img /= np.float32(255.0)
    mx, mn = _max_min(img)
    chroma = mx - mn
    sat = np.where(mx > 0, chroma / np.maximum(mx, 1e-6), 0.0)
    hue = _hue(img, mx, chroma)
    s_strong = settings.pen_min_saturation
    red_hue = (hue >= 0.93) | (hue <= 0.06)
    # the pale halo of a red stroke is desaturated but keeps ink's hue (eosin is bluer, hue < 0.96)
    halo_hue = (hue >= 0.962) | (hue <= 0.04)
    green_hue = (hue >= 0.20) & (hue <= 0.55)
    blue_hue = (hue > 0.55) & (hue <= 0.70)
    families = [
        # (weak, strong)
        ((red_hue & (sat >= 0.5) & (mx >= 0.15)) | (halo_hue & (sat >= 0.1)),
         red_hue & (sat >= max(s_strong, 0.75)) & (mx >= 0.15)),
        (green_hue & (sat >= 0.15) & (chroma >= 0.06), green_hue & (sat >= s_strong * 0.75)),
        (blue_hue & (sat >= 0.15), blue_hue & (sat >= max(s_strong, 0.5))),
        ((mx < settings.black_max_value + 0.15) & (sat < 0.55), (mx < settings.black_max_value) & (sat < 0.55)),
    ]
    bits = np.zeros(rgb.shape[:2], dtype=np.uint8)
    for i, (weak, strong) in enumerate(families):
        bits |= (weak | strong).astype(np.uint8) << i
        bits |= strong.astype(np.uint8) << (4 + i)
    return bits


def _pen_from_bits(bits: np.ndarray, mpp: float, settings: TissueSettings) -> np.ndarray:
    """Pen strokes from :func:`_ink_bits`: hysteresis per family, specks dropped, grown by the margin."""
    ink = np.zeros(bits.shape, dtype=bool)
    for i in range(4):
        strong = (bits & (1 << (4 + i))) != 0
        if strong.any():
            ink |= _grow((bits & (1 << i)) != 0, strong)
    ink = remove_small(ink, _area_px(settings.pen_min_um2, mpp))
    margin = _px(settings.pen_margin_um, mpp)
    if margin > 0 and ink.any():
        ink = dilate(ink, margin)
    return np.asarray(ink, dtype=bool)


def pen_mask(rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings()) -> np.ndarray:
    """Boolean mask of pen ink (red, green, blue, black) on an RGB uint8 image at ``mpp``.

    Each ink family is found by hysteresis: strongly inked pixels seed a stroke, which then takes in the
    connected, more faintly inked pixels of the same colour family (the pale edge of a stroke).
    """
    return _pen_from_bits(_ink_bits(rgb, settings), mpp, settings)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a Euclidean disk of ``radius`` px: shifted views of the mask up to ``_SMALL_RADIUS``
    (:func:`_disk_morphology`), a distance transform beyond (its time hardly depends on the radius).

    Outside the image counts as foreground, like scipy's ``binary_erosion(border_value=1)`` would not
    erode from the frame: tissue touching the slide's edge stays tissue.
    """
    if radius <= 0 or not mask.any():
        return mask.copy()
    if radius <= _SMALL_RADIUS:
        return _disk_morphology(mask, radius, erode=True)
    padded = np.pad(mask, radius + 1, constant_values=True)
    inside = ndi.distance_transform_edt(padded) > radius
    return np.asarray(inside[radius + 1:-radius - 1, radius + 1:-radius - 1], dtype=bool)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a Euclidean disk of ``radius`` px: shifted views of the mask up to ``_SMALL_RADIUS``
    (:func:`_disk_morphology`), a distance transform beyond."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    if radius <= _SMALL_RADIUS:
        return _disk_morphology(mask, radius, erode=False)
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius, dtype=bool)


#: up to this radius :func:`_disk_morphology` is faster than a distance transform and gives the same pixels (both
#: use the exact Euclidean disk). On a 2967 x 2220 mask (a level-0 mask of the example slide), 2-core Xeon: radius 12
#: 140 ms against 851, 16 193 against 538, 24 361 against 637, 32 557 against 583 (the transform's time hardly
#: depends on the radius); radius 2, the tiler's opening at 8 um/px, ~6 ms a megapixel. A mask at 1 um/px opens
#: with radius 16 and grows pen by 24.
_SMALL_RADIUS = 24


def _disk(radius: int) -> np.ndarray:
    """The Euclidean disk of ``radius`` px: offsets with dx^2 + dy^2 <= radius^2."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return np.asarray(xx * xx + yy * yy <= radius * radius, dtype=bool)


def _disk_rectangles(radius: int) -> list[tuple[int, int]]:
    """:func:`_disk` of ``radius`` px as a union of centred rectangles (half height ``dy``, half width ``dx``):
    row ``dy`` of the disk reaches ``dx`` (half its pixels but the centre's), which shrinks as ``dy`` grows, so the
    rectangle of each ``dy`` covers every row nearer the centre; only those wider than the next are needed."""
    dx = [int(n) // 2 for n in _disk(radius)[radius:].sum(axis=1)]
    return [(dy, dx[dy]) for dy in range(radius + 1) if dy == radius or dx[dy + 1] < dx[dy]]


def _disk_morphology(mask: np.ndarray, radius: int, *, erode: bool) -> np.ndarray:
    """Binary erosion (outside the image counts as foreground) or dilation by the Euclidean disk of ``radius``
    px: the same pixels as scipy's ``binary_erosion(structure=_disk(radius), border_value=1)`` and
    ``binary_dilation(structure=_disk(radius))``, 3-5x faster. The disk is a union of rectangles
    (:func:`_disk_rectangles`); erosion by a union is the AND of the erosions by each (dilation: the OR), and a
    rectangle is a row window then a column window, each an AND (OR) of shifted views of the padded mask."""
    combine = np.logical_and if erode else np.logical_or
    h, w = mask.shape
    padded = np.pad(mask.astype(bool, copy=False), radius, constant_values=erode)
    rects = _disk_rectangles(radius)
    widths = {dx for _, dx in rects}
    row_runs: dict[int, np.ndarray] = {}
    run = padded[:, radius:radius + w].copy()  # rows of the padded mask, each pixel ANDed over its row window
    for dx in range(max(widths) + 1):
        if dx:
            combine(run, padded[:, radius + dx:radius + dx + w], out=run)
            combine(run, padded[:, radius - dx:radius - dx + w], out=run)
        if dx in widths:
            row_runs[dx] = run.copy() if dx < max(widths) else run

    def rectangle(dy: int, dx: int) -> np.ndarray:
        rows = row_runs[dx]
        rect = rows[radius:radius + h].copy()
        for k in range(1, dy + 1):
            combine(rect, rows[radius + k:radius + k + h], out=rect)
            combine(rect, rows[radius - k:radius - k + h], out=rect)
        return rect

    out = rectangle(*rects[0])
    for dy, dx in rects[1:]:
        combine(out, rectangle(dy, dx), out=out)
    return out


def remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop 4-connected components of fewer than ``min_px`` pixels."""
    labels, n = _label(mask)
    if n == 0:
        return mask.copy()
    keep = _component_sizes(labels, n) >= min_px
    keep[0] = False
    return keep[labels]


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` (``ndi.label``), in uint16 when they number fewer than 65,536 (half
    the memory of int32; the same labels), else int32."""
    try:
        labels, n = ndi.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # "insufficient bit-depth": too many components for uint16
        labels, n = ndi.label(mask, structure=structure)
    return labels, int(n)


def _component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels per label of a label map, counted strip by strip (``np.bincount`` would first copy the whole
    map to int64: 8 bytes per pixel)."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    rows = _strip_rows(labels.shape[1])
    for y0 in range(0, labels.shape[0], rows):
        sizes += np.bincount(labels[y0:y0 + rows].ravel(), minlength=n + 1)
    return sizes


def _grow(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Connected components of ``weak`` that contain at least one ``strong`` pixel."""
    labels, n = _label(weak, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(weak)
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    return keep[labels]


def _max_min(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over the three channels (channel-wise ufuncs: much faster than axis=-1)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _hue(img: np.ndarray, mx: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) (0 = red, 1/3 = green, 2/3 = blue), vectorised, float32 like ``img``.

    Each pixel's sextant numerator is chosen first and divided once: ``(g - b) / c mod 6`` where red is the
    largest channel (the quotient is within [-1, 1], so the modulo adds 6 to a negative one), ``(b - r) / c + 2``
    where green is, ``(r - g) / c + 4`` else; the same float32 numbers as computing all three everywhere and
    choosing (every 8-bit colour checked, tests/tiling/test_tissue.py), in ~60 % of the time."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    c = np.maximum(chroma, np.float32(1e-6))
    is_r, is_g = mx == r, mx == g
    h = np.where(is_r, g - b, np.where(is_g, b - r, r - g))
    h /= c
    h += np.where(is_r, np.where(h < 0, np.float32(6.0), np.float32(0.0)),
                  np.where(is_g, np.float32(2.0), np.float32(4.0)))
    h /= np.float32(6.0)
    h[chroma <= 0] = 0.0
    return h


def smooth(rgb: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of an RGB uint8 image (per channel), rounded back to uint8."""
    if sigma_px < 0.3:
        return rgb
    out = ndi.gaussian_filter(rgb.astype(np.float32), sigma=(sigma_px, sigma_px, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: thumbnail pixels processed at once by the per-pixel steps (bounds their float32 temporaries to ~16 MB
#: whatever the thumbnail's width)
STRIP_PIXELS = 256 * 1024


def _strip_rows(width: int) -> int:
    """Rows per strip for an image ``width`` pixels wide."""
    return max(8, STRIP_PIXELS // max(1, width))


def _candidates(rgb: np.ndarray, settings: TissueSettings) -> np.ndarray:
    """Pixels stained enough to be tissue (per pixel, on the smoothed thumbnail)."""
    img = rgb.astype(np.float32)
    mx, mn = _max_min(img)
    chroma = mx - mn
    # mean optical density; a 256-entry lookup table instead of a log per pixel
    od_lut = -np.log10(np.clip(np.arange(256, dtype=np.float32), 1.0, 255.0) / 255.0)
    od = (od_lut[rgb[..., 0]] + od_lut[rgb[..., 1]] + od_lut[rgb[..., 2]]) / 3.0
    # dark but colourless pixels (chroma near 0) are ink, dust or shadows, never stained tissue
    return np.asarray((chroma >= settings.min_chroma) | ((od >= settings.min_od) & (chroma >= settings.min_chroma / 2)),
                      dtype=bool)


def _pixel_maps(rgb: np.ndarray, mpp: float, settings: TissueSettings,
                workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Tissue candidates and ink bits of the whole thumbnail, computed strip by strip.

    Each strip is smoothed with a halo of rows as wide as the Gaussian's support, so the result is exactly
    that of smoothing the whole thumbnail at once, while memory stays a few bytes per thumbnail pixel.
    Strips are independent: ``workers`` threads take them in turn (numpy and scipy release the GIL), each
    with a proportionally smaller strip, so the temporaries' total and the result do not change.
    """
    h = rgb.shape[0]
    workers = max(1, workers)
    sigma = settings.smooth_um / mpp
    halo = int(4.0 * sigma + 0.5) + 1 if sigma >= 0.3 else 0  # scipy's default truncate is 4 sigma
    candidate = np.zeros(rgb.shape[:2], dtype=bool)
    bits = np.zeros(rgb.shape[:2], dtype=np.uint8)
    rows = max(8, _strip_rows(rgb.shape[1]) // workers)

    def strip(y0: int) -> None:
        y1 = min(h, y0 + rows)
        lo, hi = max(0, y0 - halo), min(h, y1 + halo)
        smoothed = smooth(rgb[lo:hi], sigma)[y0 - lo:y1 - lo]
        candidate[y0:y1] = _candidates(smoothed, settings)
        bits[y0:y1] = _ink_bits(smoothed, settings)

    run_each(strip, range(0, h, rows), workers=workers, name="tissue")
    return candidate, bits


def detect_tissue(rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings(), *,
                  workers: int = 1) -> TissueMask:
    """Label map of glass, tissue, pen and artifacts for an RGB uint8 thumbnail at ``mpp`` um/px
    (``workers`` threads for the per-pixel steps; the result does not depend on it)."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {rgb.shape}")
    if rgb.size == 0:
        return TissueMask(np.zeros(rgb.shape[:2], dtype=np.uint8), mpp)
    # Peak memory is ~10 bytes per thumbnail pixel besides the thumbnail: the label map is built as soon as
    # each input is known, and intermediates are dropped as soon as they are used.
    candidate, bits = _pixel_maps(rgb, mpp, settings, workers)
    pen = _pen_from_bits(bits, mpp, settings)
    del bits
    candidate &= ~pen
    labels = np.where(candidate, np.uint8(ARTIFACT), np.uint8(GLASS))  # the tissue pixels are relabelled below
    labels[pen] = PEN

    tissue = candidate
    del candidate
    radius = _px(settings.opening_um, mpp)
    if radius > 0:
        tissue = dilate(erode(tissue, radius), radius)  # opening with a Euclidean disk
    tissue = remove_small(tissue, _area_px(settings.min_object_um2, mpp))
    np.logical_not(tissue, out=tissue)
    tissue = remove_small(tissue, _area_px(settings.max_hole_um2, mpp))  # fill small holes
    np.logical_not(tissue, out=tissue)
    tissue &= ~pen
    labels[tissue] = TISSUE
    return TissueMask(labels, mpp)
