"""QuPath-importable GeoJSON: the foci a slide's call counted as annotations, then one square Polygon per patch,
in level-0 pixels (pure, plus an atomic writer).

Each tile is ``{"type": "Feature", "geometry": Polygon, "properties": {...}}`` with

* ``geometry.coordinates``: one closed ring ``[[x, y], [x+T, y], [x+T, y+T], [x, y+T], [x, y]]`` of
  integers. With x to the right and y up (GeoJSON's frame) this ring is counter-clockwise, as RFC 7946
  asks for exterior rings; on the image (y down) it runs clockwise, which QuPath does not mind.
* ``properties.objectType``: ``"tile"`` (QuPath also knows ``"detection"`` and ``"annotation"``);
* ``properties.classification``: ``{"name": predicted class, "color": [r, g, b]}`` (QuPath 0.4+), plus the
  older packed ``colorRGB`` integer for QuPath 0.2/0.3. The predicted class is
  :func:`wsi_screen.metrics.decide` at ``threshold`` on the probabilities as written: the positive class where
  its measurement is >= ``threshold``, so a file's classes always agree with its numbers. ``infer`` passes the
  patch threshold its pictures show whatever the rule (the focus threshold:
  :attr:`wsi_screen.screening.aggregate.AggregateConfig.call_patch_threshold`), the one its heatmap and foci use;
* ``properties.measurements``: ``{class name: probability}`` for every class (QuPath 0.4+ reads a dict);
* ``properties.name`` (``"tile <i>"``) and ``properties.index`` (``i``, the patch's row in the store);
* ``properties.call_evidence``: ``true`` on the patches the slide score was read from (``evidence``), absent elsewhere.

Each focus the call counted (``foci``, largest first; none on a slide called negative) comes first, as

* ``properties.objectType``: ``"annotation"``, ``classification`` the positive class, ``name``
  ``"focus <rank>: <category>, <longest axis> mm"``, ``category`` ``itc`` / ``micro`` / ``macro``, ``rank``;
* ``geometry``: the outline of its connected patches (:func:`wsi_screen.screening.spatial.outline_l0`: Polygon or
  MultiPolygon, holes kept, valid, exterior rings counter-clockwise as above);
* ``properties.measurements``: longest axis (mm), area (mm^2), patches, mean and max P(positive class).

The call's evidence (``evidence``: the patches a max, top-k or smoothmax score was read from, see
:func:`wsi_screen.screening.aggregate.call_evidence`) follows the foci as one more annotation, ``name``
``evidence_label`` (the score against the slide threshold), ``category`` ``"call evidence"``, ``geometry`` a
MultiPolygon of its tiles, ``measurements`` its patch count and max P(positive class). Its ``classification`` is
the positive class when the score reached the slide threshold (a positive call), else the neutral class ``call
evidence`` in grey (:data:`NEUTRAL_EVIDENCE`): a slide called negative gets no tumour annotation.

The collection carries a foreign member ``wsi_screen`` (slide name, classes, tile size, positive class,
``threshold`` and what it is, the number of foci, the evidence's patch indices), which GeoJSON readers ignore;
each tile's properties repeat the ``threshold``. Names are data throughout: they pass through :mod:`json`
escaping, never into code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_screen._safe_write import atomic_write_text
from wsi_screen.errors import ConfigError, DatasetError
from wsi_screen.metrics import decide
from wsi_screen.screening.spatial import mm_words

if TYPE_CHECKING:
    from wsi_screen.screening.spatial import Focus

logger = logging.getLogger(__name__)

OBJECT_TYPE = "tile"
FOCUS_TYPE = "annotation"
#: default class colours, by class index (tab10-like; QuPath needs some colour for each class)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
#: probabilities are rounded to this many decimals (keeps files small; far below any decision's precision)
DECIMALS = 6


def packed_rgb(rgb: Sequence[int]) -> int:
    """QuPath's legacy ``colorRGB``: opaque ARGB packed into a signed 32-bit integer."""
    r, g, b = (int(c) for c in rgb)
    value = (0xFF << 24) | (r << 16) | (g << 8) | b
    return value - (1 << 32) if value >= 1 << 31 else value


#: the class of call evidence that did not reach the slide threshold (a slide called negative): grey, not the
#: positive class's colour, so QuPath does not show a negative call's highest patch as a tumour annotation
NEUTRAL_EVIDENCE: dict[str, Any] = {"name": "call evidence", "color": [160, 160, 160],
                                    "colorRGB": packed_rgb((160, 160, 160))}


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = list(classes)
    if not names or any(not isinstance(c, str) or not c for c in names):
        raise ConfigError("classes must be a non-empty list of non-empty names")
    if len(set(names)) != len(names):
        raise ConfigError(f"class names must be unique, got {names}")
    return names


def tile_ring(x: int, y: int, tile_size_l0: int) -> list[list[int]]:
    """The closed ring of the tile at level-0 top-left (x, y): counter-clockwise with y up (see the module
    docstring)."""
    t = int(tile_size_l0)
    return [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]


def tiles_geometry(coords: np.ndarray, tile_size_l0: int, indices: Sequence[int]) -> dict[str, Any]:
    """The tiles ``indices`` of ``coords`` (N, 2) as one GeoJSON MultiPolygon in level-0 pixels (a square each)."""
    xy = np.asarray(coords)
    return {"type": "MultiPolygon",
            "coordinates": [[tile_ring(int(xy[i, 0]), int(xy[i, 1]), tile_size_l0)] for i in indices]}


def patches_to_geojson(coords: np.ndarray, tile_size_l0: int, probs: np.ndarray, classes: Sequence[str], *,
                       slide_name: str, colors: Mapping[str, Sequence[int]] | None = None,
                       decimals: int = DECIMALS, positive_index: int | None = None,
                       threshold: float | None = None, threshold_source: str | None = None,
                       foci: Sequence[Focus] = (), evidence: Sequence[int] = (),
                       evidence_label: str = "", evidence_called: bool = True) -> dict[str, Any]:
    """A FeatureCollection of the patches at level-0 top-left ``coords`` (N, 2) with class ``probs`` (N, C),
    after the ``foci`` (annotations, in the order given: largest first).

    The predicted class is the positive class (``positive_index``) where its probability, rounded to
    ``decimals`` as written, is >= ``threshold``, else the other; without them (or for more than two classes)
    the row's argmax (the first on ties). ``threshold_source`` says which operating point ``threshold`` is.
    ``colors`` maps class names to (r, g, b); unnamed classes take :data:`PALETTE` colours by index.
    ``evidence`` (patch indices) and ``evidence_label`` mark the call's evidence (see the module docstring);
    ``evidence_called``: whether it reached the slide threshold (classed as the positive class), else it is classed
    :data:`NEUTRAL_EVIDENCE`.
    """

    names = _check_classes(classes)
    xy = np.asarray(coords)
    p = np.asarray(probs, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.issubdtype(xy.dtype, np.integer):
        raise ConfigError(f"coords must be integer (N, 2), got {xy.dtype} {xy.shape}")
    if p.shape != (xy.shape[0], len(names)):
        raise ConfigError(f"probs must have shape ({xy.shape[0]}, {len(names)}) for {len(names)} classes, "
                          f"got {p.shape}")
    if p.size and (not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0):
        raise ConfigError("class probabilities must be finite and within [0, 1]")
    T = int(tile_size_l0)
    if T < 1:
        raise ConfigError(f"tile_size_l0 must be >= 1, got {tile_size_l0}")
    palette = {c: tuple(int(v) for v in PALETTE[i % len(PALETTE)]) for i, c in enumerate(names)}
    for c, rgb in (colors or {}).items():
        if c in palette:
            vals = tuple(int(v) for v in rgb)
            if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
                raise ConfigError(f"colour of class {c!r} must be three integers in [0, 255], got {rgb!r}")
            palette[c] = vals
    classification = [{"name": c, "color": list(palette[c]), "colorRGB": packed_rgb(palette[c])}
                      for c in names]

    written = np.round(p, decimals)
    pred = decide(written, positive_index, threshold) if p.size else np.zeros(0, dtype=np.int64)
    rounded = written.tolist()
    positive = names[positive_index] if positive_index is not None else names[-1]
    features = [focus_feature(f, classification[names.index(positive)], positive) for f in foci]
    marked = sorted({int(i) for i in evidence})
    if marked and (marked[0] < 0 or marked[-1] >= xy.shape[0]):
        raise ConfigError(f"evidence patch indices must lie in [0, {xy.shape[0]}), got {marked[0]}..{marked[-1]}")
    pos_col = names.index(positive)
    if marked:
        evidence_class = dict(classification[pos_col]) if evidence_called else dict(NEUTRAL_EVIDENCE)
        features.append({
            "type": "Feature", "geometry": tiles_geometry(xy, T, marked),
            "properties": {"objectType": FOCUS_TYPE, "name": evidence_label or "call evidence",
                           "category": "call evidence", "classification": evidence_class,
                           "measurements": {"patches": len(marked),
                                            f"max P({positive})": float(written[marked, pos_col].max())}}})
    n_notes = len(features)
    marked_set = set(marked)
    for i, ((x, y), k, row) in enumerate(zip(xy.tolist(), pred.tolist(), rounded, strict=True)):
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [tile_ring(x, y, T)]},
            "properties": {
                "objectType": OBJECT_TYPE,
                "name": f"tile {i}",
                "index": i,
                "classification": dict(classification[k]),
                "measurements": dict(zip(names, row, strict=True)),
                "threshold": threshold,
                **({"call_evidence": True} if i in marked_set else {}),
            },
        })
    return {
        "type": "FeatureCollection",
        "wsi_screen": {"slide": str(slide_name), "classes": names, "tile_size_l0": T,
                       "n_patches": len(features) - n_notes, "n_foci": len(foci), "evidence_indices": marked,
                       "positive_class": names[positive_index] if positive_index is not None else None,
                       "threshold": threshold, "threshold_source": threshold_source,
                       "decision": "positive class if its probability >= threshold" if threshold is not None
                       else "most probable class"},
        "features": features,
    }


def focus_feature(focus: Focus, classification: Mapping[str, Any], positive_class: str) -> dict[str, Any]:
    """A counted focus as a QuPath annotation (see the module docstring)."""
    p = f"P({positive_class})"
    return {
        "type": "Feature",
        "geometry": focus.outline_l0,
        "properties": {
            "objectType": FOCUS_TYPE,
            "name": f"focus {focus.rank}: {focus.category}, {mm_words(focus.longest_axis_mm)} mm",
            "rank": focus.rank,
            "category": focus.category,
            "classification": dict(classification),
            "measurements": {"longest axis (mm)": round(focus.longest_axis_mm, 4),
                             "area (mm^2)": round(focus.area_mm2, 5), "patches": focus.n_patches,
                             f"mean {p}": round(focus.mean_prob, DECIMALS),
                             f"max {p}": round(focus.max_prob, DECIMALS)},
        },
    }


def write_geojson(fc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``fc`` as UTF-8 JSON atomically (temporary file in the same folder, fsync, rename)."""
    out = Path(path)
    try:
        text = json.dumps(fc, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n"
    except ValueError as exc:  # NaN or infinity somewhere in fc
        raise ConfigError(f"{out}: cannot write GeoJSON: {exc}") from exc
    atomic_write_text(out, text, " GeoJSON")
    logger.debug("wrote %d features to %s", len(fc.get("features", ())), out)
    return out


def geojson_to_coords(fc: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left corners (N, 2) and side lengths (N,) of the square patch polygons in ``fc`` (its tiles:
    focus annotations are skipped).

    Raises :class:`~wsi_screen.errors.DatasetError` for anything but axis-aligned square Polygon features.
    """
    if fc.get("type") != "FeatureCollection" or not isinstance(fc.get("features"), list):
        raise DatasetError("not a GeoJSON FeatureCollection")
    tiles = [f for f in fc["features"]
             if not (isinstance(f, Mapping) and (f.get("properties") or {}).get("objectType") == FOCUS_TYPE)]
    n = len(tiles)
    coords = np.zeros((n, 2), dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    for i, feat in enumerate(tiles):
        try:
            geom = feat["geometry"]
            ring = np.asarray(geom["coordinates"][0], dtype=np.float64)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise DatasetError(f"feature {i}: no polygon geometry ({exc})") from exc
        if geom.get("type") != "Polygon" or ring.shape != (5, 2) or not (ring[0] == ring[-1]).all():
            raise DatasetError(f"feature {i}: expected a closed 5-point square Polygon ring")
        x0, y0 = ring[:, 0].min(), ring[:, 1].min()
        size = ring[:, 0].max() - x0
        corners = {(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size)}
        if size <= 0 or {(float(a), float(b)) for a, b in ring[:4]} != corners \
                or not float(x0).is_integer() or not float(y0).is_integer() or not float(size).is_integer():
            raise DatasetError(f"feature {i}: ring is not an integer axis-aligned square")
        coords[i] = (int(x0), int(y0))
        sizes[i] = int(size)
    return coords, sizes
