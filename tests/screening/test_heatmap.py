"""Heatmap rasterisation (exact cells, orientation, overlap) and PNG rendering."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from wsi_screen.errors import ConfigError
from wsi_screen.screening.heatmap import heatmap_array, render_overlay


def test_exact_cells_on_a_tiny_slide() -> None:
    # slide 400 x 300 level-0 px, patches of 100, thumbnail at 1/10: each patch is a 10 x 10 block
    coords = np.array([[0, 0], [100, 0], [200, 100], [300, 200]], dtype=np.int64)
    values = np.array([0.25, 0.5, 0.75, 1.0])
    heat = heatmap_array(coords, values, 100, 100, (400, 300), (30, 40))
    assert heat.dtype == np.float32 and heat.shape == (30, 40)
    expected = np.full((30, 40), np.nan, dtype=np.float32)
    expected[0:10, 0:10] = 0.25
    expected[0:10, 10:20] = 0.5
    expected[10:20, 20:30] = 0.75
    expected[20:30, 30:40] = 1.0
    np.testing.assert_array_equal(heat, expected)  # NaN positions and values, exactly


def test_coarse_thumbnail_keeps_every_patch() -> None:
    # patches of 10 px on a 1000-px slide drawn at 20 px: each patch is half a pixel wide
    coords = np.array([[0, 0], [10, 0], [500, 500]], dtype=np.int64)
    heat = heatmap_array(coords, np.array([0.2, 0.4, 0.9]), 10, 10, (1000, 1000), (20, 20))
    assert heat[0, 0] == pytest.approx(0.3)  # both small patches land in pixel (0, 0): averaged
    assert heat[10, 10] == pytest.approx(0.9)
    assert np.isfinite(heat).sum() == 2


def test_orientation_top_right_and_bottom_left() -> None:
    W, H, T = 5000, 3000, 500
    coords = np.array([[W - T, 0], [0, H - T]], dtype=np.int64)  # top-right, bottom-left
    heat = heatmap_array(coords, np.array([1.0, 0.0]), T, T, (W, H), (300, 500))  # 50 x 50 px blocks
    assert heat[0, -1] == 1.0 and heat[:50, 450:].min() == 1.0
    assert heat[-1, 0] == 0.0 and heat[250:, :50].max() == 0.0
    assert np.isnan(heat[0, 0]) and np.isnan(heat[-1, -1])
    assert np.isfinite(heat).sum() == 2 * 50 * 50


def test_overlap_is_averaged() -> None:
    # stride half the tile: the middle strip is covered by both patches
    coords = np.array([[0, 0], [50, 0]], dtype=np.int64)
    heat = heatmap_array(coords, np.array([0.2, 0.6]), 100, 50, (150, 100), (10, 15))
    np.testing.assert_allclose(heat[:, 0:5], 0.2)
    np.testing.assert_allclose(heat[:, 5:10], 0.4, rtol=1e-6)
    np.testing.assert_allclose(heat[:, 10:15], 0.6)


def test_patches_outside_the_slide_are_clipped() -> None:
    coords = np.array([[900, 900], [5000, 5000]], dtype=np.int64)
    heat = heatmap_array(coords, np.array([0.5, 0.7]), 200, 200, (1000, 1000), (10, 10))
    assert heat[9, 9] == 0.5 and np.isfinite(heat).sum() == 1
    empty = heatmap_array(np.zeros((0, 2), np.int64), np.zeros(0), 10, 10, (100, 100), (5, 5))
    assert np.isnan(empty).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(0, 3), st.data())
def test_matches_a_naive_rasteriser(cols: int, rows: int, scale: int, extra: int,
                                    data: st.DataObject) -> None:
    """Grid slides whose thumbnail pixels are whole level-0 blocks: compare with a per-pixel loop."""
    T = 4 * scale
    stride = data.draw(st.sampled_from([T, T // 2, T // 4]))
    W, H = cols * T + extra * scale, rows * T + extra * scale
    xs, ys = np.arange(0, W - T + 1, stride), np.arange(0, H - T + 1, stride)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(coords), max_size=len(coords))), bool)
    coords = coords[keep]
    vals = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(coords), max_size=len(coords))))
    heat = heatmap_array(coords, vals, T, stride, (W, H), (H // scale, W // scale))
    naive = np.full((H // scale, W // scale), np.nan)
    for i in range(H // scale):
        for j in range(W // scale):
            cx, cy = (j + 0.5) * scale, (i + 0.5) * scale
            x, y = coords[:, 0], coords[:, 1]
            hit = (x <= cx) & (cx < x + T) & (y <= cy) & (cy < y + T)
            if hit.any():
                naive[i, j] = vals[hit].mean()
    np.testing.assert_allclose(heat, naive, rtol=1e-6, atol=1e-7)


def test_invalid_input() -> None:
    with pytest.raises(ConfigError, match="coords_l0"):
        heatmap_array(np.zeros((3, 2)), np.zeros(3), 10, 10, (100, 100), (10, 10))
    with pytest.raises(ConfigError, match="values"):
        heatmap_array(np.zeros((3, 2), np.int64), np.zeros(2), 10, 10, (100, 100), (10, 10))
    with pytest.raises(ConfigError, match="NaN"):
        heatmap_array(np.zeros((1, 2), np.int64), np.array([np.nan]), 10, 10, (100, 100), (10, 10))
    with pytest.raises(ConfigError, match="tile_size_l0"):
        heatmap_array(np.zeros((1, 2), np.int64), np.zeros(1), 0, 10, (100, 100), (10, 10))


def _big_case() -> tuple[np.ndarray, np.ndarray, int, tuple[int, int], tuple[int, int]]:
    """100k patches of 224 px at 0.5 um/px on a 0.25 um/px slide; thumbnail at 8 um/px (as the tiler)."""
    n, T = 317, 448
    gx, gy = np.meshgrid(np.arange(n), np.arange(n))
    coords = (np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64) * T)[:100_000]
    W = H = n * T + 600
    rng = np.random.default_rng(0)
    # a smooth "tumour" bump plus noise, like real scores
    cx, cy = coords[:, 0] / W, coords[:, 1] / H
    bump = np.exp(-((cx - 0.6) ** 2 + (cy - 0.3) ** 2) / 0.01)
    values = np.clip(bump + 0.1 * rng.random(len(coords)), 0, 1)
    return coords, values, T, (W, H), (round(H / 32), round(W / 32))


def test_100k_patches_timing(tmp_path: Path) -> None:
    coords, values, T, dims, shape = _big_case()
    t0 = time.perf_counter()
    heat = heatmap_array(coords, values, T, T, dims, shape)
    t_array = time.perf_counter() - t0
    assert heat.shape == shape and np.isfinite(heat).any()
    h, w = shape
    thumb = np.full((h, w, 3), 242, dtype=np.uint8)
    thumb[np.isfinite(heat)] = (200, 140, 190)  # tissue where there are patches
    t0 = time.perf_counter()
    out = render_overlay(thumb, heat, title="100k patches", out_path=tmp_path / "big.png", threshold=0.5,
                         dimensions_l0=dims, mpp=0.25)
    t_render = time.perf_counter() - t0
    assert out.is_file()
    print(f"\nheatmap 100k patches -> {w}x{h}: array {t_array:.3f} s, render {t_render:.3f} s")


def test_render_png(tmp_path: Path) -> None:
    W, H, T = 4000, 2000, 250
    gx, gy = np.meshgrid(np.arange(2, 14), np.arange(1, 7))
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64) * T
    values = coords[:, 0] / W
    shape = (200, 400)
    heat = heatmap_array(coords, values, T, T, (W, H), shape)
    thumb = np.full((*shape, 3), 242, dtype=np.uint8)
    thumb[30:170, 40:360] = (190, 120, 180)
    title = 'slide "$\\alpha$" <b>&</b> {0} 100%'  # names are drawn literally, never parsed
    out = render_overlay(thumb, heat, title=title, out_path=tmp_path / "sub" / "h.png", threshold=0.5,
                         dimensions_l0=(W, H), legend_label="P(tumour) $x$")
    assert out == tmp_path / "sub" / "h.png"
    assert [p.name for p in out.parent.iterdir()] == ["h.png"]  # no temporary left behind
    with Image.open(out) as im:
        assert im.format == "PNG"
        px = np.asarray(im.convert("RGB"))
    assert px.shape[0] > 200 and px.shape[1] > 400
    assert px.std() > 10  # not blank
    colours = {tuple(c) for c in px[::7, ::7].reshape(-1, 3)}
    assert len(colours) > 50  # the colour map is there


def test_titles_are_fitted_to_the_figure() -> None:
    from wsi_screen.screening.heatmap import fit_title

    title = ("CMU-1-Small-Region: normal | no focus counted\nscore 0.0435 mm² < 0.0479 mm² (rule: largest region at "
             "P(tumour) >= 0.8) | OUT OF DOMAIN (35 % of patches in domain): call unreliable")
    assert fit_title(title, 200) == title
    fitted = fit_title(title, 60).split("\n")
    assert fitted == ["CMU-1-Small-Region: normal | no focus counted", "score 0.0435 mm² < 0.0479 mm² (rule: largest "
                      "region at", "P(tumour) >= 0.8)", "OUT OF DOMAIN (35 % of patches in domain): call unreliable"]
    assert fit_title("a_very_long_slide_name_without_spaces", 10) == "a_very_long_slide_name_without_spaces"


def test_render_refuses_mismatched_shapes(tmp_path: Path) -> None:
    thumb = np.zeros((10, 20, 3), np.uint8)
    with pytest.raises(ConfigError, match="does not match"):
        render_overlay(thumb, np.zeros((20, 10)), title="x", out_path=tmp_path / "x.png")
    with pytest.raises(ConfigError, match="colour map"):
        render_overlay(thumb, np.zeros((10, 20)), title="x", out_path=tmp_path / "x.png", cmap="nope")
    assert not list(tmp_path.iterdir())


def test_the_legend_covers_no_part_of_the_slide() -> None:
    from wsi_screen.screening.heatmap import Outline, overlay_figure

    W, H, T = 4000, 2000, 250
    coords = np.array([[3500, 0], [3750, 250], [0, 1750]], dtype=np.int64)  # top-right corner: where it used to sit
    shape = (100, 200)
    heat = heatmap_array(coords, np.array([0.9, 0.95, 0.1]), T, T, (W, H), shape)
    thumb = np.full((*shape, 3), 200, dtype=np.uint8)
    square = {"type": "Polygon", "coordinates": [[[3500, 0], [3750, 0], [3750, 250], [3500, 250], [3500, 0]]]}
    fig = overlay_figure(thumb, heat, title="s", threshold=0.5, dimensions_l0=(W, H), mpp=0.5,
                         outlines=[Outline(square, "1: 0.12 mm (itc)")], outline_legend="1 focus counted",
                         evidence=Outline(square, "call evidence: highest patch, P(tumour) 0.950 >= 0.9"))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    labels = [t.get_text() for t in legend.get_texts()]
    assert "call evidence: highest patch, P(tumour) 0.950 >= 0.9" in labels and "1 focus counted" in labels
    for ax in fig.axes[:2]:  # the slide and the overlay
        assert not box.overlaps(ax.get_window_extent(renderer))
    assert box.y1 < min(ax.get_window_extent(renderer).y0 for ax in fig.axes[:2])  # below both panels
    assert not fig.axes[1].get_legend()  # nothing drawn over the overlay itself
    # the label of a focus at the right edge ends over the image, not over the colour bar
    (label,) = [t for t in fig.axes[1].texts if t.get_text() == "1: 0.12 mm (itc)"]
    overlay = fig.axes[1].get_window_extent(renderer)
    assert overlay.x0 <= label.get_window_extent(renderer).x0 < label.get_window_extent(renderer).x1 <= overlay.x1


def test_save_png_draws_the_figure_once_and_as_savefig_does(tmp_path: Path) -> None:
    from wsi_screen.screening.heatmap import Outline, overlay_figure, save_png

    W, H, T = 4000, 2000, 250
    coords = np.array([[3500, 0], [3750, 250], [0, 1750]], dtype=np.int64)
    shape = (100, 200)
    heat = heatmap_array(coords, np.array([0.9, 0.95, 0.1]), T, T, (W, H), shape)
    thumb = np.full((*shape, 3), 200, dtype=np.uint8)
    square = {"type": "Polygon", "coordinates": [[[3500, 0], [3750, 0], [3750, 250], [3500, 250], [3500, 0]]]}

    def figure() -> object:
        return overlay_figure(thumb, heat, title="s", threshold=0.5, dimensions_l0=(W, H), mpp=0.5,
                              outlines=[Outline(square, "1: 0.12 mm (itc)")], outline_legend="1 focus counted",
                              evidence=Outline(square, "call evidence"))

    fig = figure()
    draws: list[object] = []
    fig.canvas.mpl_connect("draw_event", draws.append)  # type: ignore[attr-defined]
    save_png(fig, tmp_path / "h.png", key="k")
    assert len(draws) == 1  # savefig with a layout engine draws twice: once to lay out, once to write
    reference = figure()
    reference.savefig(tmp_path / "ref.png", format="png")  # type: ignore[attr-defined]
    with Image.open(tmp_path / "h.png") as a, Image.open(tmp_path / "ref.png") as b:
        assert a.text["wsi-screen"] == "k"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same picture, pixel for pixel


def test_a_heatmap_with_labelled_outlines_is_drawn_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Placing the outlines' labels measures the laid-out figure without drawing it (a draw resamples every image):
    the only draw is the one that writes the PNG."""
    from matplotlib.figure import Figure

    from wsi_screen.screening.heatmap import Outline

    draws: list[Figure] = []
    draw = Figure.draw

    def counted(self: Figure, renderer: object) -> None:
        draws.append(self)
        draw(self, renderer)  # type: ignore[arg-type]

    monkeypatch.setattr(Figure, "draw", counted)
    W, H, T = 4000, 2000, 250
    coords = np.array([[3500, 0], [3750, 250], [0, 1750]], dtype=np.int64)
    shape = (100, 200)
    heat = heatmap_array(coords, np.array([0.9, 0.95, 0.1]), T, T, (W, H), shape)
    square = {"type": "Polygon", "coordinates": [[[3500, 0], [3750, 0], [3750, 250], [3500, 250], [3500, 0]]]}
    out = render_overlay(np.full((*shape, 3), 200, dtype=np.uint8), heat, title="s", out_path=tmp_path / "h.png",
                         threshold=0.5, dimensions_l0=(W, H), mpp=0.5, outlines=[Outline(square, "1: 0.12 mm")])
    assert len(draws) == 1 and out.stat().st_size > 0


def _zlib_level(png: bytes) -> int:
    """The compression level class (FLEVEL: 0 fastest, 1 fast, 2 default, 3 best) in the zlib header of a PNG's
    first IDAT chunk."""
    pos = 8
    while png[pos + 4:pos + 8] != b"IDAT":
        pos += 12 + int.from_bytes(png[pos:pos + 4], "big")
    return png[pos + 9] >> 6


def test_heatmaps_are_written_with_fast_compression(tmp_path: Path) -> None:
    """The PNG is written at zlib level 3 (FLEVEL 1, "fast"), not PIL's default 6: about half the encoding time for
    9 % more bytes; the picture is the same."""
    from wsi_screen.screening.heatmap import PNG_COMPRESS_LEVEL

    W, H, T = 4000, 2000, 250
    coords = np.array([[3500, 0], [3750, 250], [0, 1750]], dtype=np.int64)
    shape = (100, 200)
    heat = heatmap_array(coords, np.array([0.9, 0.95, 0.1]), T, T, (W, H), shape)
    out = render_overlay(np.full((*shape, 3), 200, dtype=np.uint8), heat, title="s", out_path=tmp_path / "h.png",
                         threshold=0.5, dimensions_l0=(W, H), mpp=0.5)
    assert PNG_COMPRESS_LEVEL == 3 and _zlib_level(out.read_bytes()) == 1
    with Image.open(out) as im:
        default = tmp_path / "default.png"
        im.save(default, format="png")  # PIL's default level, same pixels
        assert _zlib_level(default.read_bytes()) == 2
        with Image.open(default) as again:
            np.testing.assert_array_equal(np.asarray(im), np.asarray(again))


def _shaped_case(shape: tuple[int, int], width_l0: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int], Any]:
    """A thumbnail of ``shape`` of a slide ``width_l0`` level-0 px wide, a heatmap of patches on its middle part and a
    focus square at the top, with its label."""
    from wsi_screen.screening.heatmap import Outline

    h, w = shape
    height_l0, T = round(width_l0 * h / w), width_l0 // 20
    gx, gy = np.meshgrid(np.arange(3, 17), np.arange(0, height_l0 // T))
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64) * T
    heat = heatmap_array(coords, coords[:, 0] / width_l0, T, T, (width_l0, height_l0), shape)
    thumb = np.full((h, w, 3), 242, np.uint8)
    thumb[h // 4:, w // 5:] = (200, 120, 180)
    square = {"type": "Polygon", "coordinates": [[[5 * T, 0], [7 * T, 0], [7 * T, 2 * T], [5 * T, 2 * T], [5 * T, 0]]]}
    return thumb, heat, (width_l0, height_l0), Outline(square, "1: 0.12 mm (itc)")


LONG_CLASS = "P(lymph node metastasis of breast carcinoma)"


@pytest.mark.parametrize(("shape", "width_l0", "mpp", "label", "written"), [
    ((1024, 766), 2220, 0.5, "P(tumour)", False), ((90, 300), 12000, 0.5, "P(tumour)", False),
    ((300, 420), 90000, None, "P(tumour)", False), ((90, 300), 12000, 0.25, "P(adenocarcinoma metastasis)", True),
    ((90, 300), 12000, 0.25, LONG_CLASS, True), ((300, 90), 12000, 0.25, LONG_CLASS, True),
    ((1000, 40), 200000, 0.25, LONG_CLASS, False)])
def test_a_heatmap_is_laid_out_once_and_everything_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        shape: tuple[int, int], width_l0: int,
                                                        mpp: float | None, label: str, written: bool) -> None:
    """The panels, titles, axis labels and colour bar are placed once, from the sizes of their texts: matplotlib's
    constrained layout measured every axis (making and measuring each tick label) twice at each draw, and placed the
    titles and axis labels by measuring them again. Tall, wide and level-0-pixel (wide tick labels) slides: the two
    panels with their tick labels and labels, the title and the legend overlap nothing and stay inside the figure.
    Long class names too: the overlay's title and the colour bar's label (which runs along the bar: on a wide slide
    longer than it) are fitted to their room, clear of the other title, the legend and the figure's edges, in the
    written figure (its panels on whole pixels) as in the API's."""
    from matplotlib.axis import Axis

    from wsi_screen.screening.heatmap import overlay_figure, save_png

    thumb, heat, dims, focus = _shaped_case(shape, width_l0)
    measured: list[Axis] = []
    tight = Axis.get_tightbbox

    def counted(self: Axis, *args: Any, **kwargs: Any) -> Any:
        measured.append(self)
        return tight(self, *args, **kwargs)

    monkeypatch.setattr(Axis, "get_tightbbox", counted)
    fig = overlay_figure(thumb, heat, title="a slide\nits call | its score", threshold=0.5, dimensions_l0=dims,
                         mpp=mpp, outlines=[focus], outline_legend="1 focus counted", evidence=focus,
                         legend_label=label, exact_pixels=written)
    save_png(fig, tmp_path / "h.png")
    assert measured == []  # no axis measured, for the layout or at the draw
    monkeypatch.undo()
    renderer = fig.canvas.get_renderer()
    ax0, ax1 = fig.axes[:2]
    figure = fig.bbox
    panels = [ax.get_tightbbox(renderer) for ax in (ax0, ax1)]  # with ticks and labels (the overlay: its colour bar)
    title, legend = fig.texts[0].get_window_extent(renderer), fig.legends[0].get_window_extent(renderer)
    titles = [ax.title.get_window_extent(renderer) for ax in (ax0, ax1)]
    bar_label = ax1.child_axes[0].yaxis.label
    bar_box = bar_label.get_window_extent(renderer)
    boxes = [*panels, title, legend, *titles, bar_box]
    for box in boxes:
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1, box
    assert not panels[0].overlaps(panels[1])
    assert not titles[0].overlaps(titles[1])
    assert not any(bar_box.overlaps(b) for b in (title, legend, *titles))
    # the texts say what they said (broken at spaces at most), at a readable size
    assert ax1.title.get_text().split() == f"{label} overlay".split()
    assert bar_label.get_text().split() == f"{label}; cyan line: threshold 0.5".split()
    assert min(ax1.title.get_fontsize(), bar_label.get_fontsize()) >= 8
    for panel in panels:
        assert legend.y1 < panel.y0 and panel.y1 < title.y0
    assert ax0.get_window_extent().height == pytest.approx(ax1.get_window_extent().height)
    # each panel keeps the slide's aspect
    box = ax1.get_window_extent()
    assert box.height / box.width == pytest.approx(dims[1] / dims[0], rel=0.01)


def test_a_written_heatmaps_images_are_resampled_once_before_the_draw(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The written figure's thumbnail and heatmap are resampled once, to exactly the pixels of their panels, so the draw
    copies them (matplotlib resampled a 1024 x 766 thumbnail twice and the heatmap once at each draw). The same
    picture: the slide's colours in the slide panel, each patch's colour blended over them in the overlay."""
    import matplotlib.image as mimage
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    from wsi_screen.screening.heatmap import overlay_figure, save_png

    thumb, heat, dims, _ = _shaped_case((1024, 766), 2220)
    drawn: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    resample = mimage._resample

    def recorded(image: Any, data: np.ndarray, out_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        drawn.append((data.shape[:2], tuple(out_shape)))
        return resample(image, data, out_shape, *args, **kwargs)

    monkeypatch.setattr(mimage, "_resample", recorded)
    given: list[tuple[int, ...]] = []
    set_data = mimage.AxesImage.set_data

    def kept(image: Any, data: Any) -> None:
        given.append(np.shape(data)[:2])
        set_data(image, data)

    monkeypatch.setattr(mimage.AxesImage, "set_data", kept)
    fig = overlay_figure(thumb, heat, title="s", threshold=0.5, dimensions_l0=dims, mpp=0.5, exact_pixels=True)
    save_png(fig, tmp_path / "h.png")
    assert len(drawn) >= 3 and all(data == out for data, out in drawn), drawn  # copies, pixel for pixel
    # the images are given to matplotlib at their panels' size only (each one checked and masked on its way in)
    assert given == [drawn[0][1]] * 3, given
    with Image.open(tmp_path / "h.png") as im:
        png = np.asarray(im.convert("RGB")).astype(int)
    rows = png.shape[0]

    def at(ax: Any, fx: float, fy: float) -> np.ndarray:
        """The PNG's pixel at (fx, fy) of a panel (fractions of its width and height, from its top-left corner)."""
        box = ax.get_window_extent()
        return png[rows - int(box.y1) + int(fy * box.height), int(box.x0) + int(fx * box.width)]

    slide, overlay = fig.axes[:2]
    assert at(slide, 0.1, 0.1).tolist() == [242, 242, 242] and at(slide, 0.6, 0.6).tolist() == [200, 120, 180]
    assert at(overlay, 0.1, 0.1).tolist() == [242, 242, 242]  # no patch there: the slide as it is
    # the patch column at 0.6 of the width has P = 0.6: its colour at alpha 0.55 over the slide
    value = heat[int(0.6 * heat.shape[0]), int(0.6 * heat.shape[1])]
    colour = np.array(colormaps["RdYlBu_r"](TwoSlopeNorm(0.5, 0.0, 1.0)(value))[:3]) * 255
    expected = 0.55 * colour + 0.45 * np.array([200, 120, 180])
    assert np.abs(at(overlay, 0.6, 0.6) - expected).max() <= 2, (at(overlay, 0.6, 0.6), expected)
