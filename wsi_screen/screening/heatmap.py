"""Heatmaps: patch values + level-0 coordinates -> an array aligned with the slide thumbnail (pure), and a
PNG rendering of it over the thumbnail (at the edge, with matplotlib's object API: no pyplot, no global
backend switch, so importing this module never changes a notebook's backend).

Geometry of :func:`heatmap_array`: the output (h, w) covers the whole slide of ``dimensions_l0`` (W, H) in
the thumbnail's orientation (row 0 at the top, y down), so output pixel (i, j) spans level-0
``[j * W / w, (j + 1) * W / w) x [i * H / h, (i + 1) * H / h)``. A patch at ``(x, y)`` of ``tile_size_l0``
covers the output pixels whose centres fall inside its footprint ``[x, x + T) x [y, y + T)`` (computed in
exact integer arithmetic); a patch too small to contain any pixel centre still covers the pixel holding its
own centre, so no patch is lost on a coarse thumbnail. Where footprints overlap, the values are averaged;
pixels no patch covers are NaN.

Rasterisation is a summed-area construction on the grid of distinct patch edges (at most the output size,
and for patch grids about two cells per patch), expanded to pixels by one gather: O(N + h * w) time, and
memory for one float32 output plus small arrays.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from wsi_screen._safe_write import atomic_path
from wsi_screen.errors import ConfigError

logger = logging.getLogger(__name__)

#: largest side of one panel in the rendered PNG, in inches (at ``dpi``)
PANEL_IN = 6.0


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -((-a) // b)


def _spans(start: np.ndarray, size: int, out_px: int, extent_l0: int) -> tuple[np.ndarray, np.ndarray]:
    """First and end (exclusive) output pixel whose centre lies in ``[start, start + size)``, per patch.

    Pixel k's centre is at level-0 ``(k + 0.5) * extent / out``; in integers, k is covered when
    ``2 * start * out - extent <= 2 * k * extent < 2 * (start + size) * out - extent``.
    """
    two_e = 2 * extent_l0
    k0 = _ceil_div(2 * start * out_px - extent_l0, two_e)
    k1 = _ceil_div(2 * (start + size) * out_px - extent_l0, two_e)
    empty = k1 <= k0
    if empty.any():  # no pixel centre inside: take the pixel holding the patch centre
        k0 = np.where(empty, ((2 * start + size) * out_px) // two_e, k0)
        k1 = np.where(empty, k0 + 1, k1)
    return np.clip(k0, 0, out_px), np.clip(k1, 0, out_px)


def heatmap_array(coords_l0: np.ndarray, values: np.ndarray, tile_size_l0: int, stride_l0: int,
                  dimensions_l0: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Rasterise per-patch ``values`` onto an (h, w) = ``out_shape`` grid over the whole slide.

    ``coords_l0`` (N, 2) are the patches' level-0 top-left corners (x, y); ``dimensions_l0`` is the slide's
    (W, H). Returns float32 (h, w): the mean value of the patches covering each pixel, NaN where none does.
    ``stride_l0`` is the tiling step; it is checked but does not change the result, since each patch
    paints its full ``tile_size_l0`` footprint and overlaps are averaged.
    """
    xy = np.asarray(coords_l0)
    v = np.asarray(values, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.issubdtype(xy.dtype, np.integer):
        raise ConfigError(f"coords_l0 must be integer (N, 2), got {xy.dtype} {xy.shape}")
    if v.shape != (xy.shape[0],):
        raise ConfigError(f"values must have shape ({xy.shape[0]},) to match coords_l0, got {v.shape}")
    if not np.isfinite(v).all():
        raise ConfigError("heatmap values contain NaN or infinity")
    if int(tile_size_l0) < 1 or int(stride_l0) < 1:
        raise ConfigError(f"tile_size_l0 and stride_l0 must be >= 1, got {tile_size_l0} and {stride_l0}")
    W, H = (int(d) for d in dimensions_l0)
    h, w = (int(d) for d in out_shape)
    if min(W, H, h, w) < 1:
        raise ConfigError(f"slide dimensions {dimensions_l0} and heatmap shape {out_shape} must be positive")
    T = int(tile_size_l0)
    xy = xy.astype(np.int64)
    j0, j1 = _spans(xy[:, 0], T, w, W)
    i0, i1 = _spans(xy[:, 1], T, h, H)

    # summed-area table on the compressed grid of distinct edges
    xb = np.unique(np.concatenate([j0, j1, np.array([0, w], dtype=np.int64)]))
    yb = np.unique(np.concatenate([i0, i1, np.array([0, h], dtype=np.int64)]))
    nx, ny = xb.size, yb.size
    cj0, cj1 = np.searchsorted(xb, j0), np.searchsorted(xb, j1)
    ci0, ci1 = np.searchsorted(yb, i0), np.searchsorted(yb, i1)
    idx = np.concatenate([ci0 * nx + cj0, ci0 * nx + cj1, ci1 * nx + cj0, ci1 * nx + cj1])
    sign = np.concatenate([np.ones_like(v), -np.ones_like(v), -np.ones_like(v), np.ones_like(v)])
    sums = np.bincount(idx, weights=sign * np.tile(v, 4), minlength=nx * ny).reshape(ny, nx)
    counts = np.bincount(idx, weights=sign, minlength=nx * ny).reshape(ny, nx)
    for a in (sums, counts):
        np.cumsum(a, axis=0, out=a)
        np.cumsum(a, axis=1, out=a)
    covered = counts[:-1, :-1] > 0.5
    cells = np.full((ny - 1, nx - 1), np.nan, dtype=np.float32)
    cells[covered] = sums[:-1, :-1][covered] / np.rint(counts[:-1, :-1][covered])

    # expand cells to pixels: pixel k lies in cell searchsorted(edges, k, "right") - 1
    ri = np.searchsorted(yb, np.arange(h), side="right") - 1
    ci = np.searchsorted(xb, np.arange(w), side="right") - 1
    return cells[np.ix_(ri, ci)]


def _reduce_rgb(a: np.ndarray, f: int) -> np.ndarray:
    """Box-filter an RGB uint8 image by an integer factor (PIL's C ``reduce``; edge blocks included)."""
    from PIL import Image

    return np.asarray(Image.fromarray(a).reduce(f)) if f > 1 else a


def _reduce_heat(a: np.ndarray, f: int) -> np.ndarray:
    """Box-filter a float heatmap by an integer factor, ignoring NaN; NaN where a block is all NaN."""
    from PIL import Image

    x = np.ascontiguousarray(a, dtype=np.float32)
    if f <= 1:
        return x
    valid = np.isfinite(x)
    s = np.asarray(Image.fromarray(np.where(valid, x, np.float32(0.0))).reduce(f))
    n = np.asarray(Image.fromarray(valid.astype(np.float32)).reduce(f))
    out = np.full(s.shape, np.nan, dtype=np.float32)
    np.divide(s, n, out=out, where=n > 1e-6)
    return out


def _resample_rgb(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """An RGB uint8 image resampled to exactly (``height``, ``width``) pixels as matplotlib's default interpolation
    ("antialiased") draws it into that many: nearest when magnified by 1 or 2 or over 3 times, else smoothed (PIL's
    Hamming filter, close to matplotlib's Hanning)."""
    from PIL import Image

    h, w = a.shape[:2]
    if (w, h) == (width, height):
        return a
    nearest = all(n > 3 * m or n in (m, 2 * m) for n, m in ((width, w), (height, h)))
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.HAMMING
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((width, height), method))


def _resample_nearest(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """``a`` (2-D, masked or not) resampled to exactly (``height``, ``width``) pixels by the nearest pixel centre."""
    rows = np.minimum(((np.arange(height) + 0.5) * (a.shape[0] / height)).astype(np.intp), a.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (a.shape[1] / width)).astype(np.intp), a.shape[1] - 1)
    return a[np.ix_(rows, cols)]


def drawn_with(path: str | os.PathLike[str]) -> str | None:
    """The ``key`` a heatmap PNG was drawn with (None if it has none or cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            value = getattr(im, "text", {}).get("wsi-screen")
    except OSError:
        return None
    return str(value) if value is not None else None


#: the narrowest figure (inches) whose legend has two columns (each holds ~60 characters of the "small" font)
LEGEND_TWO_COLUMNS_IN = 10.0
#: characters of the title's font ("large") that fit in one inch of figure width, with a margin
TITLE_CHARS_PER_INCH = 9.5


def fit_title(title: str, width: int) -> str:
    """``title`` with every line longer than ``width`` characters broken: at its `` | `` separators first, then
    at spaces (a long slide name stays whole on its own line)."""
    import textwrap

    chunks: list[str] = []
    for line in title.split("\n"):
        current = ""
        for part in line.split(" | "):
            joined = f"{current} | {part}" if current else part
            if len(joined) <= width or not current:
                current = joined
            else:
                chunks.append(current)
                current = part
        chunks.append(current)
    return "\n".join(wrapped for chunk in chunks
                     for wrapped in textwrap.wrap(chunk, width, break_long_words=False, break_on_hyphens=False) or [""])


class Outline(NamedTuple):
    """A shape to outline on the heatmap: a GeoJSON ``Polygon``/``MultiPolygon`` in level-0 pixels and its label."""

    geometry_l0: dict[str, Any]
    label: str


def _rings(geometry: dict[str, Any]) -> list[np.ndarray]:
    """Every ring (exterior and holes) of a GeoJSON Polygon or MultiPolygon, as (n, 2) arrays."""
    coords = geometry.get("coordinates") or []
    polygons = [coords] if geometry.get("type") == "Polygon" else coords
    return [np.asarray(r, dtype=np.float64) for poly in polygons for r in poly if len(r)]


def _draw_outlines(ax: Any, outlines: Sequence[Outline], scale: float) -> list[list[np.ndarray]]:
    """Outline each shape (the first, the largest, emphasised); return each one's rings in data coordinates (for
    :func:`_label_outlines`, once the figure's layout is done)."""
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=4.0, foreground="white")]
    drawn: list[list[np.ndarray]] = []
    for k, o in enumerate(outlines):
        rings = [r * scale for r in _rings(o.geometry_l0)]
        drawn.append(rings)
        first = k == 0
        for r in rings:
            ax.plot(r[:, 0], r[:, 1], color="black", linewidth=2.4 if first else 1.3,
                    solid_joinstyle="miter", path_effects=halo if first else None, zorder=4 if first else 3)
    return drawn


class _Box(NamedTuple):
    """An axis-aligned box in display pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: _Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def inside(self, other: _Box) -> bool:
        return other.x0 <= self.x0 and self.x1 <= other.x1 and other.y0 <= self.y0 and self.y1 <= other.y1


def label_position(focus: _Box, size: tuple[float, float], gap: float, free: Any) -> tuple[_Box, bool]:
    """Where a label of ``size`` (w, h pixels) goes by its ``focus`` (display box, y up): the first of the places
    around the focus (above its top-right corner, above its top-left, beside it, below it) where ``free(box)``,
    else the nearest free place on growing rings around it (the bool: it needs a leader line), else the first
    place."""
    w, h = size
    right, left = focus.x1 + gap, focus.x0 - gap - w
    above, below = focus.y1 + gap, focus.y0 - gap - h
    corners = [(right, above), (left, above), (focus.x0, above), (focus.x1 - w, above), (right, focus.y1 - h),
               (left, focus.y1 - h), (right, below), (left, below), (focus.x0, below), (focus.x1 - w, below)]
    for x, y in corners:
        box = _Box(x, y, x + w, y + h)
        if free(box):
            return box, False
    cx, cy = (focus.x0 + focus.x1) / 2, (focus.y0 + focus.y1) / 2
    step = max(h, 4.0)
    for ring in range(1, 41):
        radius = ring * step + max(focus.x1 - focus.x0, focus.y1 - focus.y0) / 2
        for a in np.linspace(0.0, 2 * np.pi, 24, endpoint=False):
            x, y = cx + radius * np.cos(a) - w / 2, cy + radius * np.sin(a) - h / 2
            box = _Box(float(x), float(y), float(x) + w, float(y) + h)
            if free(box):
                return box, True
    x, y = corners[0]
    return _Box(x, y, x + w, y + h), False


def _label_outlines(fig: Any, ax: Any, outlines: Sequence[Outline], rings: Sequence[Sequence[np.ndarray]],
                    label_size: str, keep_clear: Sequence[np.ndarray] = ()) -> list[Any]:
    """Write each outline's label by its shape, clear of every other shape's outline, of the ``keep_clear`` rings
    (data coordinates: the call's evidence squares) and of the labels already written, within the axes (clear of
    the colour bar): :func:`label_position`, with a leader line when no place right beside it is free. Call once
    the figure is complete: places are measured on its finished layout (the labels are kept out of the layout, so
    they do not move it)."""
    from matplotlib.path import Path as MplPath
    from matplotlib.transforms import Bbox

    # the finished layout without a draw (a draw would resample every image, only to be drawn again when saved):
    # the overlay's aspect-fitted box in its laid-out place, as a draw would fit it
    renderer = fig.canvas.get_renderer()
    ax.apply_aspect()
    to_px = ax.transData
    area = ax.get_window_extent(renderer)
    bounds = _Box(area.x0, area.y0, area.x1, area.y1)
    paths = [[MplPath(to_px.transform(r)) for r in focus] for focus in rings]
    clear = [MplPath(to_px.transform(r)) for r in keep_clear]
    taken: list[_Box] = []
    texts = []
    for k, (o, focus_rings) in enumerate(zip(outlines, rings, strict=True)):
        if not focus_rings:
            continue
        first = k == 0
        px = np.concatenate([to_px.transform(r) for r in focus_rings])
        box = _Box(float(px[:, 0].min()), float(px[:, 1].min()), float(px[:, 0].max()), float(px[:, 1].max()))
        text = ax.text(0, 0, o.label, fontsize=label_size, fontweight="bold" if first else "normal",
                       parse_math=False)
        size = text.get_window_extent(renderer)
        text.remove()
        pad = 0.2 * text.get_fontsize() * fig.dpi / 72.0  # the label box's pad (boxstyle round,pad=0.2)
        w, h = size.width + 2 * pad + 2, size.height + 2 * pad + 2
        others = [p for j, focus in enumerate(paths) if j != k for p in focus] + clear

        def free(b: _Box, others: list[Any] = others, own: _Box = box) -> bool:
            bb = Bbox.from_extents(*b)
            return (b.inside(bounds) and not b.overlaps(own) and not any(b.overlaps(t) for t in taken)
                    and not any(p.intersects_bbox(bb, filled=True) for p in others))

        gap = 3.0 * fig.dpi / 72.0
        placed, leader = label_position(box, (w, h), gap, free)
        taken.append(placed)
        # anchor: the focus's box corner nearest the label; the label's lower-left corner as an offset from it
        at_x = min(max((placed.x0 + placed.x1) / 2, box.x0), box.x1)
        at_y = min(max((placed.y0 + placed.y1) / 2, box.y0), box.y1)
        anchor = to_px.inverted().transform((at_x, at_y))
        offset = ((placed.x0 + pad + 1 - at_x) * 72.0 / fig.dpi, (placed.y0 + pad + 1 - at_y) * 72.0 / fig.dpi)
        texts.append(ax.annotate(
            o.label, xy=(float(anchor[0]), float(anchor[1])), xytext=offset, textcoords="offset points",
            fontsize=label_size, fontweight="bold" if first else "normal", ha="left", va="bottom", zorder=5,
            annotation_clip=False, in_layout=False, parse_math=False,
            arrowprops={"arrowstyle": "-", "color": "black", "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0}
            if leader else None,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "black" if first else "0.6",
                  "alpha": 0.85}))
    return texts


#: the colour bar beside the overlay: its gap and width as fractions of the overlay's width
COLOUR_BAR = (0.03, 0.04)


def _tick_labels_size(axis: Any, renderer: Any) -> tuple[float, float]:
    """The widest and the tallest of ``axis``'s major tick labels inside its view, in display pixels, as a draw would
    write them (the same locator and formatter; no tick is made)."""
    import matplotlib as mpl
    from matplotlib.text import Text

    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * (hi - lo)
    locs = [v for v in axis.get_majorticklocs() if lo - tol <= v <= hi + tol]
    size = mpl.rcParams["xtick.labelsize" if axis.axis_name == "x" else "ytick.labelsize"]
    text = Text(0, 0, "", fontsize=size, parse_math=False, figure=axis.get_figure(root=True))
    w = h = 0.0
    for label in axis.get_major_formatter().format_ticks(locs):
        if label:
            text.set_text(label)
            box = text.get_window_extent(renderer)
            w, h = max(w, box.width), max(h, box.height)
    return w, h


def _fit_text(text: Any, string: str, points: float, room_px: float, renderer: Any) -> None:
    """Set ``text`` to ``string`` at ``points`` where it fits ``room_px`` along its lines (rotated or not), else broken
    at spaces so that each line fits, and a word longer than the room shrinks the font until it fits."""
    from matplotlib.text import Text

    probe = Text(0, 0, "", fontproperties=text.get_fontproperties(), parse_math=False,
                 figure=text.get_figure(root=True))
    probe.set_fontsize(points)

    def length(line: str) -> float:
        probe.set_text(line)
        return float(probe.get_window_extent(renderer).width)

    room_px = max(room_px, 1.0)
    lines = string.split("\n")
    if max(length(line) for line in lines) > room_px:
        broken: list[str] = []
        for line in lines:
            current = ""
            for word in line.split(" "):
                joined = f"{current} {word}" if current else word
                if current and length(joined) > room_px:
                    broken.append(current)
                    current = word
                else:
                    current = joined
            broken.append(current)
        lines = broken
    widest = max(length(line) for line in lines)
    text.set_text("\n".join(lines))
    text.set_fontsize(points * min(1.0, room_px / widest) if widest > room_px else points)


def _lay_out(fig: Any, panels: tuple[Any, Any], cax: Any, legend: Any, suptitle: Any,
             size: tuple[float, float], *, whole_pixels: bool = False) -> tuple[float, float]:
    """Place the two panels (aspect-fitted to the slide's ``size``, equal, side by side, centred in the room left),
    the colour bar's room, the title (top) and the legend (bottom) by the sizes of the texts around them.

    What matplotlib's constrained layout did at every draw, making and measuring every tick label twice over, and
    its automatic places of the titles and axis labels once more; here the few texts are measured once (the tick
    labels' strings, without making ticks), with the pads of that layout (3 pt). Twice over: how many ticks an axis
    has depends on its length. The panel titles and the colour bar's label are fitted to their room (broken at
    spaces, a font shrunk only for a word longer than the room: long class names) and the panels placed again,
    until they fit the room they were fitted to. The layout is the figure's at its size: one resized afterwards is
    not laid out again. ``whole_pixels``: each panel's box starts and ends on whole pixels (at the figure's dpi), its
    aspect the slide's to within a pixel. Returns a panel's (width, height) in pixels."""
    import matplotlib as mpl

    renderer = fig.canvas.get_renderer()
    fig_w, fig_h = fig.bbox.width, fig.bbox.height
    pt = fig.dpi / 72.0
    pad = 3.0 * pt
    rc = mpl.rcParams
    ax0 = panels[0]

    def extent(artist: Any) -> Any:
        return artist.get_window_extent(renderer)

    suptitle.set_y(1.0 - pad / fig_h)
    x_ticks = (rc["xtick.major.size"] + rc["xtick.major.pad"]) * pt
    y_ticks = (rc["ytick.major.size"] + rc["ytick.major.pad"]) * pt
    below_legend = extent(legend).y1 + pad
    below_title = fig_h - pad - extent(suptitle).height - pad
    x_below = below_legend + x_ticks + extent(ax0.xaxis.label).height + ax0.xaxis.labelpad * pt
    y_label = extent(ax0.yaxis.label).width + ax0.yaxis.labelpad * pt
    bar = cax.yaxis.label
    # texts whose room depends on the layout, as given: (text, its string, its size); each is fitted to its room
    fitted = [(t, t.get_text(), t.get_fontsize()) for t in (*(ax.title for ax in panels), bar)]
    sx, sy = size

    def place() -> tuple[list[float], float, float, float, tuple[float, float, float]]:
        top = pad + extent(suptitle).height + pad + max(extent(ax.title).height for ax in panels) + \
            rc["axes.titlepad"] * pt
        x_tick_w, x_tick_h = _tick_labels_size(ax0.xaxis, renderer)
        y_tick_w, bar_tick_w = _tick_labels_size(ax0.yaxis, renderer)[0], _tick_labels_size(cax.yaxis, renderer)[0]
        left = pad + y_label + y_tick_w + y_ticks
        gap = pad + x_tick_w  # room for the halves of two tick labels at the panels' facing edges
        right = y_ticks + bar_tick_w + extent(bar).width + cax.yaxis.labelpad * pt + pad  # the label runs upwards
        bottom = x_below + x_tick_h
        cell_w = (fig_w - left - gap - right) / (2 + sum(COLOUR_BAR))
        cell_h = fig_h - top - bottom
        box_w = min(cell_w, cell_h * sx / sy)
        box_h = box_w * sy / sx
        x0, y0 = left + (cell_w - box_w) / 2, bottom + (cell_h - box_h) / 2
        xs = [x0, x0 + cell_w + gap]
        if whole_pixels:
            xs, y0, box_w, box_h = [round(x) for x in xs], round(y0), max(1, round(box_w)), max(1, round(box_h))
        for ax, x in zip(panels, xs, strict=True):
            ax.set_position((x / fig_w, y0 / fig_h, box_w / fig_w, box_h / fig_h))
        return xs, y0, box_w, box_h, (x_tick_h, y_tick_w, bar_tick_w)

    def bar_top(xs: list[float], y0: float, box_w: float, box_h: float, bar_tick_w: float) -> float:
        """How high the colour bar's label may reach: to the title, or to the panels' top where the overlay's title
        reaches over the label."""
        bar_label_x = xs[1] + box_w * (1 + sum(COLOUR_BAR)) + y_ticks + bar_tick_w
        over_bar = xs[1] + (box_w + extent(panels[1].title).width) / 2 + pad > bar_label_x
        return y0 + box_h if over_bar else below_title

    def fit(xs: list[float], y0: float, box_w: float, box_h: float, bar_tick_w: float) -> bool:
        """Fit the panel titles to their widths (centred over their panels, clear of each other and of the figure's
        edges) and the colour bar's label to the height from the legend to the title (to the panels' top where the
        overlay's title reaches over it); True if any changed."""
        centres = [x + box_w / 2 for x in xs]
        apart = centres[1] - centres[0] - pad
        before = [(t.get_text(), t.get_fontsize()) for t, _, _ in fitted]
        for (t, text, points), room in zip(fitted, [min(2 * (centres[0] - pad), apart),
                                                    min(2 * (fig_w - pad - centres[1]), apart)], strict=False):
            _fit_text(t, text, points, room, renderer)
        _fit_text(bar, *fitted[2][1:], bar_top(xs, y0, box_w, box_h, bar_tick_w) - below_legend, renderer)
        return before != [(t.get_text(), t.get_fontsize()) for t, _, _ in fitted]

    xs, y0, box_w, box_h, ticks = place()  # twice at least: how many ticks an axis has depends on its length
    for _ in range(4):  # then until the texts fit the room they were fitted to (each fit starts from the given texts)
        changed = fit(xs, y0, box_w, box_h, ticks[2])
        xs, y0, box_w, box_h, ticks = place()
        if not changed:
            break
    x_tick_h, y_tick_w, bar_tick_w = ticks
    # the axis labels beyond their tick labels, where matplotlib would put them (measuring every tick label again)
    for ax in panels:
        ax.xaxis.set_label_coords(0.5, -(x_ticks + x_tick_h + ax.xaxis.labelpad * pt) / box_h)
    ax0.yaxis.set_label_coords(-(y_ticks + y_tick_w + ax0.yaxis.labelpad * pt) / box_w, 0.5)
    # the colour bar's label centred on the bar, or as near as its room (see fit) allows
    length = extent(bar).height
    centre = min(max(y0 + box_h / 2, below_legend + length / 2), bar_top(xs, y0, box_w, box_h, bar_tick_w) - length / 2)
    cax.yaxis.set_label_coords(1.0 + (y_ticks + bar_tick_w + cax.yaxis.labelpad * pt) / (COLOUR_BAR[1] * box_w),
                               (centre - y0) / box_h)
    return box_w, box_h


def overlay_figure(thumbnail: np.ndarray, heat: np.ndarray, *, title: str,
                   cmap: str = "RdYlBu_r", vmin: float = 0.0, vmax: float = 1.0, alpha: float = 0.55,
                   legend_label: str = "P(tumour)", threshold: float | None = None,
                   threshold_name: str = "threshold",
                   dimensions_l0: tuple[int, int] | None = None, mpp: float | None = None,
                   dpi: int = 100, outlines: Sequence[Outline] = (), outline_legend: str = "",
                   evidence: Outline | None = None, exact_pixels: bool = False) -> Any:
    """The figure: the thumbnail (left) and the heatmap over it (right), a labelled colour bar and a legend.

    ``heat`` (h, w) must match ``thumbnail`` (h, w, 3) (see :func:`heatmap_array`); NaN is drawn as
    unscored (thumbnail only). Axes are in millimetres when ``mpp`` and ``dimensions_l0`` are given, in
    level-0 pixels with ``dimensions_l0`` alone, else in thumbnail pixels; y runs down as on the slide.

    The colour map runs from blue (low) to red (high), so low scores never look like the unscored slide. With a
    ``threshold`` strictly inside ``(vmin, vmax)`` its two halves meet there: blue below it, orange to red at or
    above it, so red means "counted at this threshold" and a slide of sub-threshold scores reads blue; the colour
    bar marks the threshold and the region at or above it is outlined in cyan. The legend and the colour bar
    name the threshold (``threshold_name``: which operating point it is).

    ``outlines`` (level-0 geometry, label) are drawn in black with their labels, the first (the largest focus)
    emphasised; ``outline_legend`` is their legend entry. ``evidence`` (level-0 geometry, label: the patches the slide
    call was read from) is drawn as magenta squares, its label the legend entry; the outlines' labels are placed
    clear of those squares where there is room. The legend sits below the two
    panels, so it never covers the slide. Text is drawn literally (no mathtext).

    ``exact_pixels``: for writing the figure at ``dpi`` (as :func:`render_overlay` does): the panels start and end
    on whole pixels and the thumbnail and heatmap are resampled here, once, to exactly the pixels they cover, so a
    draw copies them instead of resampling them (about half the images' drawing time); the same picture to the
    eye. Without it the figure keeps the thumbnail at up to twice the panel's pixels, for display or saving at any
    resolution.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    thumb = np.asarray(thumbnail)
    hm = np.asarray(heat)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8:
        raise ConfigError(f"thumbnail must be RGB uint8 (h, w, 3), got {thumb.dtype} {thumb.shape}")
    if hm.shape != thumb.shape[:2]:
        raise ConfigError(f"heatmap shape {hm.shape} does not match the thumbnail's {thumb.shape[:2]}")
    if not (vmin < vmax) or not (0.0 <= alpha <= 1.0):
        raise ConfigError(f"need vmin < vmax and alpha in [0, 1], got {vmin}, {vmax}, {alpha}")
    try:
        cm = colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    except KeyError:
        raise ConfigError(f"unknown colour map {cmap!r} (see matplotlib.colormaps)") from None
    if (outlines or evidence is not None) and dimensions_l0 is None:
        raise ConfigError("outlines are in level-0 pixels: pass dimensions_l0")

    h, w = hm.shape
    scale = 1.0
    if dimensions_l0 is not None and mpp is not None:
        scale, unit = mpp / 1000.0, "mm"
    elif dimensions_l0 is not None:
        unit = "level-0 px"
    else:
        unit = "thumbnail px"
    sx, sy = (dimensions_l0[0] * scale, dimensions_l0[1] * scale) if dimensions_l0 is not None else (w, h)
    extent = (0.0, float(sx), float(sy), 0.0)  # left, right, bottom, top: row 0 at the top

    aspect = h / w
    panel_w = PANEL_IN if aspect <= 1 else max(2.0, PANEL_IN / aspect)
    panel_h = max(2.0, min(PANEL_IN, PANEL_IN * aspect))
    # no point drawing more pixels than the panel shows: box-filter down to about one per screen pixel
    f = max(1, math.floor(max(w / (panel_w * dpi), h / (panel_h * dpi))))
    thumb_d = _reduce_rgb(np.ascontiguousarray(thumb), f)
    heat_d = np.ma.masked_invalid(_reduce_heat(hm, f))

    fig_w = 2 * panel_w + 1.6
    title = fit_title(title, int(fig_w * TITLE_CHARS_PER_INCH))
    n_title = title.count("\n") + 1
    # the legend goes below the panels: two columns where the figure is wide enough, one row per 0.2 in
    n_entries = 1 + (threshold is not None) + bool(outlines) + (evidence is not None)
    legend_cols = 2 if fig_w >= LEGEND_TWO_COLUMNS_IN and n_entries > 2 else 1
    legend_h = 0.25 + 0.2 * math.ceil(n_entries / legend_cols)
    fig = Figure(figsize=(fig_w, panel_h + 1.2 + 0.25 * n_title + legend_h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2, sharex=True, sharey=True)
    centred = threshold is not None and vmin < threshold < vmax
    norm: Normalize = Normalize(vmin=vmin, vmax=vmax)
    if threshold is not None and centred:
        norm = TwoSlopeNorm(vcenter=threshold, vmin=vmin, vmax=vmax)
    ax0.set_xlim(0.0, float(sx))  # the images' extent (shared by both panels); they are drawn once laid out
    ax0.set_ylim(float(sy), 0.0)
    # titles just above the panels (y=1: where matplotlib would put them, without measuring every axis at each draw)
    ax0.set_title("slide", parse_math=False, y=1.0)
    ax1.set_title(f"{legend_label} overlay", parse_math=False, y=1.0)
    for ax in (ax0, ax1):
        ax.set_xlabel(f"x ({unit})")
    ax0.set_ylabel(f"y ({unit})")
    cax = ax1.inset_axes((1.0 + COLOUR_BAR[0], 0.0, COLOUR_BAR[1], 1.0))  # follows the image's aspect-fitted box
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cm), cax=cax)
    handles: list[Patch | Line2D] = [Patch(facecolor="none", edgecolor="0.5", label="no patch scored (slide as is)")]
    if threshold is not None:
        finite = np.isfinite(heat_d.filled(np.nan))
        if finite.any() and float(heat_d.min()) < threshold <= float(heat_d.max()):
            ax1.contour(heat_d.filled(-1.0), levels=[threshold], colors=["cyan"], linewidths=0.8, extent=extent,
                        origin="upper")
        cbar.ax.axhline(threshold, color="cyan", linewidth=2.0)
        if centred:  # the colour bar's halves are equal: tick both evenly
            ticks = sorted({*np.linspace(vmin, threshold, 5)[:-1].tolist(), threshold,
                            *np.linspace(threshold, vmax, 3)[1:].tolist()})
            cbar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
        cbar.set_label(f"{legend_label}; cyan line: {threshold_name} {threshold:.3g}", parse_math=False)
        handles.append(Line2D([], [], color="cyan", label=f"inside cyan: {legend_label} >= {threshold:.3g} "
                                                          f"({threshold_name})"))
    else:
        cbar.set_label(legend_label, parse_math=False)
    rings = _draw_outlines(ax1, outlines, scale) if outlines else []
    if outlines:
        handles.append(Line2D([], [], color="black", linewidth=2.0, label=outline_legend or "outlined"))
    evidence_rings = [r * scale for r in _rings(evidence.geometry_l0)] if evidence is not None else []
    if evidence is not None:
        for r in evidence_rings:
            ax1.plot(r[:, 0], r[:, 1], color="magenta", linewidth=1.6, zorder=6)
        handles.append(Patch(facecolor="none", edgecolor="magenta", linewidth=1.6,
                             label=evidence.label or "call evidence"))
    legend = fig.legend(handles=handles, loc="lower center", ncols=legend_cols, fontsize="small", framealpha=0.85)
    for text in legend.get_texts():
        text.set_parse_math(False)
    suptitle = fig.suptitle(title, parse_math=False, fontsize="large", va="top")
    box_w, box_h = _lay_out(fig, (ax0, ax1), cax, legend, suptitle, (float(sx), float(sy)), whole_pixels=exact_pixels)
    thumb_img, heat_img, smooth, aspect = thumb_d, np.ma.asarray(heat_d), "antialiased", "equal"
    if exact_pixels:  # what a draw at dpi would resample, resampled once (the contour keeps heat_d's precision)
        w_px, h_px = int(box_w), int(box_h)
        thumb_img, heat_img = _resample_rgb(thumb_d, w_px, h_px), np.ma.asarray(_resample_nearest(heat_d, w_px, h_px))
        smooth, aspect = "nearest", "auto"  # the box has the slide's aspect to within a pixel: keep it on whole pixels
    for ax in (ax0, ax1):
        ax.imshow(thumb_img, extent=extent, origin="upper", interpolation=smooth, aspect=aspect)
    ax1.imshow(heat_img, extent=extent, origin="upper", cmap=cm, norm=norm, alpha=alpha, interpolation="nearest",
               aspect=aspect)
    if outlines:
        _label_outlines(fig, ax1, outlines, rings, "small", keep_clear=evidence_rings)
    return fig


def render_overlay(thumbnail: np.ndarray, heat: np.ndarray, *, title: str, out_path: str | os.PathLike[str],
                   cmap: str = "RdYlBu_r", vmin: float = 0.0, vmax: float = 1.0, alpha: float = 0.55,
                   legend_label: str = "P(tumour)", threshold: float | None = None,
                   threshold_name: str = "threshold",
                   dimensions_l0: tuple[int, int] | None = None, mpp: float | None = None,
                   dpi: int = 100, outlines: Sequence[Outline] = (), outline_legend: str = "",
                   evidence: Outline | None = None, key: str | None = None) -> Path:
    """Write :func:`overlay_figure` (its images on exact pixels) as a PNG (see :func:`save_png`) and return its
    path."""
    fig = overlay_figure(thumbnail, heat, title=title, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha,
                         legend_label=legend_label, threshold=threshold, threshold_name=threshold_name,
                         dimensions_l0=dimensions_l0, mpp=mpp, dpi=dpi, outlines=outlines,
                         outline_legend=outline_legend, evidence=evidence, exact_pixels=True)
    return save_png(fig, out_path, key=key)


#: zlib level of the heatmap PNGs: 3 takes about half the time of PIL's default 6 for 9 % more bytes (level 1 saves
#: little more time for 17 % more bytes; bench/RESULTS.md)
PNG_COMPRESS_LEVEL = 3


def save_png(fig: Any, out_path: str | os.PathLike[str], *, dpi: int | None = None, key: str | None = None) -> Path:
    """Write a heatmap figure as a PNG, atomically (at ``dpi``, by default the figure's); ``key`` is stored in the
    PNG's text chunk ``wsi-screen`` (what the picture was drawn with, see :func:`drawn_with`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out_path)
    with atomic_path(out, " the heatmap") as tmp, warnings.catch_warnings():
        # slide names in scripts the default font lacks (CJK, ...) draw as boxes; say nothing about it
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font", category=UserWarning)
        metadata = {"wsi-screen": key} if key else None
        pil_kwargs = {"compress_level": PNG_COMPRESS_LEVEL}
        if isinstance(fig.canvas, FigureCanvasAgg) and dpi in (None, fig.dpi):
            # one draw, which runs the figure's layout first; savefig would draw the whole figure once more
            # beforehand (resampling every image) only to run that layout
            fig.canvas.print_png(tmp, metadata=metadata, pil_kwargs=pil_kwargs)
        else:
            fig.savefig(tmp, format="png", dpi=dpi or fig.dpi, metadata=metadata, pil_kwargs=pil_kwargs)
    logger.debug("heatmap written to %s", out)
    return out
