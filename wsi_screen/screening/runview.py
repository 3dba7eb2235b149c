"""Looking at a finished run: small functions the notebook and the HTML report share.

Everything here reads a run folder (see :mod:`wsi_screen.screening.runfolder`) and the patch stores it points to, and
returns arrays or matplotlib ``Figure`` objects (object API, no pyplot state), so the notebook stays a
thin view and the report embeds the same pictures.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen.errors import RunError, WsiScreenError
from wsi_screen.screening import runfolder
from wsi_screen.screening.aggregate import NO_RESULT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopPatch:
    """One high-scoring patch: its pixels (if the store is still there), position and probability."""

    index: int
    x: int
    y: int
    probability: float
    image: np.ndarray | None


@dataclass(frozen=True)
class RunView:
    """A run folder, opened: results rows and provenance."""

    path: Path
    results: list[dict[str, str]]
    info: dict[str, Any]

    @property
    def slides(self) -> list[str]:
        """Names of the slides that have a result folder (status ok or no tissue)."""
        return [r["slide"] for r in self.results if r["status"] not in NO_RESULT]

    @property
    def positive_class(self) -> str:
        return str(self.info.get("model", {}).get("positive_class") or "positive")

    @functools.cached_property
    def _slide_records(self) -> dict[str, dict[str, Any]]:
        """run.json's ``slides``, by name."""
        return {str(s.get("slide")): s for s in self.info.get("slides") or () if isinstance(s, dict)}

    def unrounded(self, row: Mapping[str, str], key: str) -> float | str:
        """``row``'s ``key`` of results.csv (``largest_focus_mm``, ``tumour_area_mm2``) as measured: run.json's value
        for the slide where it rounds to the table's text (the same call), else the table's text (a run.json from
        before it recorded them). results.csv rounds the sizes (3 and 4 decimals); a page that rounded that text
        again would differ from the heatmap, which rounds the measurement once (1.2349 mm: 1.235, then 1.24; the
        heatmap's 1.23)."""
        text = row.get(key) or ""
        value = self._slide_records.get(row.get("slide", ""), {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and text \
                and f"{value:.{len(text.partition('.')[2])}f}" == text:
            return float(value)
        return text

    def slide_json(self, slide: str) -> dict[str, Any]:
        return runfolder.read_slide(self.path, slide)

    def scores(self, slide: str) -> runfolder.SlideScores:
        return runfolder.read_scores(runfolder.slide_dir(self.path, slide) / runfolder.SCORES_CSV)

    def positive_probs(self, slide: str) -> np.ndarray:
        s = self.scores(slide)
        return s.probs[:, s.classes.index(self.positive_class)] if self.positive_class in s.classes else s.probs[:, -1]


#: where the README demo writes its run (relative to the repository root)
DEMO_RUN = Path("runs") / "demo"


def default_run() -> Path:
    """The run to show: ``$WSI_SCREEN_RUN``, else the README demo's ``runs/demo`` (from here or a parent)."""
    import os

    env = os.environ.get("WSI_SCREEN_RUN")
    wanted = Path(env) if env else DEMO_RUN
    if wanted.is_absolute():
        return wanted
    # a relative path names a folder here or in a parent: the README starts Jupyter in the repository and
    # the kernel runs in notebooks/
    for base in (Path.cwd(), *Path.cwd().parents):
        if (base / wanted / runfolder.RESULTS_CSV).exists():
            return base / wanted
    return Path.cwd() / wanted


def open_run(path: str | Path) -> RunView:
    """Open a run folder written by ``wsi-screen infer``."""
    run = Path(path)
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    results = runfolder.read_results(run)
    info = runfolder.read_json(run / runfolder.RUN_JSON) if (run / runfolder.RUN_JSON).exists() else {}
    return RunView(run, results, info)


def _store(view: RunView, slide: str) -> Any:
    """The slide's store, reading a coordinates-only store's patches from the slide file the run scored (which
    may have moved since the store was tiled; the store checks its fingerprint)."""
    from wsi_screen.tiling.store import PatchStore

    info = view.slide_json(slide)
    source = info.get("source")
    return PatchStore.open(runfolder.resolve_path(info["store"], view.path),
                           slide=source if source and Path(source).exists() else None)


def top_patches(view: RunView, slide: str, n: int = 8) -> list[TopPatch]:
    """The ``n`` highest-scoring patches of a slide, with pixels read from its store when available (from the slide
    when the store is coordinates-only, infer's default)."""
    scores = view.scores(slide)
    p = view.positive_probs(slide)
    order = np.argsort(-p, kind="stable")[:n]
    images: list[np.ndarray | None] = [None] * len(order)
    try:
        with _store(view, slide) as store:  # a coordinates-only store reads them from the slide
            if len(order):
                pixels = store.read(np.sort(order))
                lookup = {int(i): pixels[k] for k, i in enumerate(np.sort(order))}
                images = [lookup[int(i)] for i in order]
    except (WsiScreenError, KeyError, OSError) as exc:
        log.warning("%s: patch pixels unavailable (%s); showing coordinates only", slide, exc)
    return [TopPatch(int(i), int(scores.coords[i, 0]), int(scores.coords[i, 1]), float(p[i]), img)
            for i, img in zip(order, images, strict=True)]


def heatmap(view: RunView, slide: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(thumbnail, heat array aligned with it, slide.json) for a scored slide."""
    from wsi_screen.screening.heatmap import heatmap_array

    info = view.slide_json(slide)
    store = _store(view, slide)
    thumb = store.thumbnail
    dims = tuple(int(v) for v in store.attrs["slide"]["dimensions"])
    scores = view.scores(slide)
    heat = heatmap_array(scores.coords, view.positive_probs(slide), store.tile_size_l0,
                         int(store.attrs["stride_l0"]), (dims[0], dims[1]), thumb.shape[:2])
    return thumb, heat, info


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def rule_summary(view: RunView) -> str:
    """The run's slide rule in one line, numbers rounded: ``slide call: region score >= 0.0479 mm² (largest region
    at p >= 0.8); pictures and foci at p >= 0.8 (the call's patch threshold)``."""
    from wsi_screen.screening.aggregate import (
        call_comparison,
        call_patch_threshold,
        call_patch_threshold_name,
        recorded_rule_label,
    )

    agg = view.info.get("aggregate") or {}
    if not agg:
        return "slide call: (no rule recorded in run.json)"
    rule = agg.get("rule")
    text = f"slide call: {recorded_rule_label(agg)} score {call_comparison(rule, float(agg['slide_threshold']))}"
    if rule == "region":
        text += f" mm² (largest region at p >= {float(agg['region_threshold']):.3g})"
    patch = call_patch_threshold(agg)
    if patch is not None:
        text += f"; pictures and foci at p >= {patch:.3g} ({call_patch_threshold_name(rule)})"
    return text


def slide_call(view: RunView, slide: str) -> Any:
    """The slide's call as the run made it (its rule in run.json on its scores.csv): a
    :class:`~wsi_screen.screening.callview.CallContext` whose ``result`` holds the score, the diagnosis and the
    foci (largest first, each with its patches, size and outline) that results.csv, heatmap.png and
    patches.geojson show."""
    from dataclasses import fields

    from wsi_screen.screening.aggregate import AggregateConfig, diagnose
    from wsi_screen.screening.callview import CallContext, slide_grid

    model = view.info.get("model", {})
    scores = view.scores(slide)
    classes = tuple(scores.classes)
    positive = view.positive_class
    pos = classes.index(positive) if positive in classes else len(classes) - 1
    agg = view.info.get("aggregate") or {}
    names = {f.name for f in fields(AggregateConfig)}
    aggregate = AggregateConfig(**{k: v for k, v in agg.items() if k in names}) if agg else None
    result = None
    if aggregate is not None:
        grid = slide_grid(view.slide_json(slide), scores.coords, scores.probs[:, pos])
        negative = next((c for c in classes if c != positive), "")
        result = diagnose(scores.probs[:, pos], aggregate, positive=positive, negative=negative, grid=grid)
    row = next((r for r in view.results if r["slide"] == slide), {})
    domain: dict[str, Any] = {}
    if row.get("in_domain_fraction"):
        domain = {"in_domain_fraction": float(row["in_domain_fraction"]),
                  "out_of_domain": row.get("out_of_domain") == "true"}
    return CallContext(name=slide, classes=classes, positive_index=pos, model_threshold=model.get("patch_threshold"),
                       aggregate=aggregate, result=result, domain=domain)


def slide_figure(view: RunView, slide: str, *, alpha: float = 0.55) -> Any:
    """The slide's heatmap figure, as in its heatmap.png (:func:`wsi_screen.screening.callview.heatmap_figure`):
    thumbnail beside the overlay, colour bar in probability units, the contour at the call's patch threshold, the
    foci the call counted outlined with their sizes, the call in the title, axes in mm."""
    from wsi_screen.screening.callview import heatmap_figure

    ctx = slide_call(view, slide)
    return heatmap_figure(_store(view, slide), view.scores(slide).coords, view.positive_probs(slide), ctx,
                          alpha=alpha)


def gallery_figure(view: RunView, slide: str, n: int = 8) -> Any:
    """The highest-scoring patches of a slide with their level-0 coordinates and probabilities."""
    patches = top_patches(view, slide, n)
    cols = max(1, min(4, len(patches)))
    rows = max(1, -(-len(patches) // cols))
    fig = _figure(2.6 * cols, 2.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, p in zip(axes, patches, strict=False):
        if p.image is not None:
            ax.imshow(p.image)
        ax.set_title(f"#{p.index} ({p.x}, {p.y})\nP = {p.probability:.3f}", fontsize=9, parse_math=False)
    if not patches:
        axes[0].text(0.5, 0.5, "no patches", ha="center", va="center")
    fig.suptitle(f"{slide}: top patches (level-0 x, y)", parse_math=False)
    return fig


def distribution_figure(view: RunView) -> Any:
    """Slide scores by diagnosis with the slide threshold (left) and each slide's patch-probability distribution
    with the patch threshold the call read (right). Every patch beyond the box's whiskers is drawn as a dot: on a
    slide of thousands of patches those at the call's patch threshold are such outliers, and a plot without them
    would show none of the patches the foci and the call are made of."""
    from wsi_screen.screening.aggregate import call_patch_threshold, call_patch_threshold_name

    fig = _figure(11, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    scored = [r for r in view.results if r.get("score")]
    threshold = float(scored[0]["threshold"]) if scored else None
    agg = view.info.get("aggregate") or {}
    unit = " (mm²)" if agg.get("rule") == "region" else ""
    by_dx: dict[str, list[float]] = {}
    for r in scored:
        by_dx.setdefault(r["diagnosis"], []).append(float(r["score"]))
    top = max([1.0, *(v for values in by_dx.values() for v in values)]) if unit else 1.0
    bins = np.linspace(0, top, 21)
    if threshold is not None and 0 < threshold < top:  # a bin edge: no bar straddles the line, as no call does
        bins = np.union1d(bins, [threshold])
    for dx, values in sorted(by_dx.items()):
        ax0.hist(values, bins=bins, alpha=0.7, label=f"{dx} ({len(values)})")
    if threshold is not None:
        ax0.axvline(threshold, color="crimson", linestyle="--", label=f"slide threshold {threshold:.3g}{unit}")
    ax0.set(xlabel=f"slide score{unit}", ylabel="slides", title="slide scores")
    ax0.legend(fontsize="small")
    names = [r["slide"] for r in scored]
    data = [view.positive_probs(n) for n in names]
    if data:
        ax1.boxplot(data, orientation="horizontal", tick_labels=names,
                    flierprops={"marker": ".", "markersize": 3, "alpha": 0.5})
    patch = call_patch_threshold(agg)
    if patch is not None:
        who = call_patch_threshold_name(agg.get("rule"))
        ax1.axvline(patch, color="cyan", linewidth=2, label=f"{who} {patch:.3g}")
        ax1.legend(fontsize="small", loc="lower right")
    ax1.set(xlabel=f"patch P({view.positive_class})", xlim=(0, 1), title="patch probabilities per slide")
    return fig


def figure_png(fig: Any) -> bytes:
    """A figure as PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
