"""What a slide's call looks like: its ``heatmap.png`` and ``patches.geojson``, drawn from one
:class:`~wsi_screen.screening.aggregate.SlideResult`.

Both show one operating point, whatever the rule
(:attr:`~wsi_screen.screening.aggregate.AggregateConfig.call_patch_threshold`, the focus threshold): the heatmap's
contour and colour bar, the GeoJSON's tile classes and ``wsi_screen.threshold``, and the foci. Both show the foci the
call counted (``SlideResult.foci``, computed once by :func:`~wsi_screen.screening.aggregate.diagnose`): outlined with
their size on the heatmap, annotations in the GeoJSON. Both mark the call's evidence (``SlideResult.evidence_indices``:
the patches a max, top-k or smoothmax score was read from) with the score against the slide threshold: magenta
squares on the heatmap, an annotation and ``call_evidence`` tiles in the GeoJSON. The heatmap's title says the call,
its score against the slide threshold, the rule, the metastasis category, the largest focus and the domain flag.

:func:`views_key` is what the two files were drawn with (stored in the PNG, see
:func:`wsi_screen.screening.heatmap.drawn_with`): a rerun whose call draws differently redraws them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen.screening.aggregate import (
    AREA_UNIT,
    NO_TISSUE,
    AggregateConfig,
    SlideResult,
    call_patch_threshold_name,
    foci_count,
    score_against,
)
from wsi_screen.screening.spatial import ScoreGrid, mm_words, patch_grid

#: version of what the pictures show; bump it when the drawing changes, so reruns redraw
VIEWS_VERSION = "v9"


@dataclass(frozen=True, kw_only=True)
class CallContext:
    """What a slide's pictures say besides its scores: the model's classes and threshold, the rule, the call and
    the domain flag (``in_domain_fraction`` / ``out_of_domain`` as :func:`wsi_screen.screening.outputs.slide_domain`
    gives them; empty without a domain model)."""

    name: str
    classes: tuple[str, ...]
    positive_index: int | None
    model_threshold: float | None
    aggregate: AggregateConfig | None
    result: SlideResult | None
    domain: dict[str, Any]

    @property
    def positive_class(self) -> str:
        return self.classes[self.positive_index] if self.positive_index is not None else self.classes[-1]

    @property
    def threshold(self) -> float | None:
        """The patch threshold these pictures show: the call's, else (no rule) the model's."""
        return self.aggregate.call_patch_threshold if self.aggregate is not None else self.model_threshold

    @property
    def threshold_name(self) -> str:
        """What :attr:`threshold` is: ``the call's patch threshold`` (region rule), ``the focus threshold`` (the
        other rules) or, without a rule, ``the model's patch threshold``."""
        if self.aggregate is None:
            return "the model's patch threshold"
        return call_patch_threshold_name(self.aggregate.rule)

    @property
    def threshold_source(self) -> str:
        """Which operating point :attr:`threshold` is, for the GeoJSON's ``wsi_screen.threshold_source`` (saying the
        call's evidence is marked only where there is some: mean and fraction pool every patch)."""
        agg = self.aggregate
        if agg is None:
            return "the model's patch threshold"
        if agg.rule == "region":
            return "the slide call's patch threshold (region rule), which also defines the foci"
        reads = (f"counts patches at the model's patch threshold {_g(agg.patch_threshold)} in its score"
                 if agg.rule == "fraction" else "reads no patch threshold")
        marked = "; its evidence is marked" if self.result is not None and self.result.evidence_indices else ""
        return f"the focus threshold (the {agg.rule} rule {reads}{marked})"

    @property
    def focus_rule(self) -> str:
        """How a focus is defined, in words: ``P(tumour) >= 0.8, >= 6 patches``."""
        agg = self.aggregate
        if agg is None:
            return ""
        size = f", >= {agg.min_focus_patches} patches" if agg.min_focus_patches > 1 else ""
        return f"P({self.positive_class}) >= {_g(agg.call_patch_threshold)}{size}"

    @property
    def foci(self) -> tuple[Any, ...]:
        return self.result.foci if self.result is not None else ()


def _g(value: float) -> str:
    return f"{value:.3g}"


def domain_text(domain: dict[str, Any]) -> str:
    """The domain flag in words."""
    if "in_domain_fraction" not in domain:
        return "domain not checked"
    share = f"{100 * float(domain['in_domain_fraction']):.0f} % of patches in domain"
    return f"OUT OF DOMAIN ({share}): call unreliable" if domain.get("out_of_domain") else f"in domain ({share})"


def score_text(result: SlideResult, aggregate: AggregateConfig, positive_class: str) -> str:
    """``score 0.6530 mm² >= 0.0479 mm² (rule: largest region at P(tumour) >= 0.8)``: the score against its threshold
    (:func:`~wsi_screen.screening.aggregate.score_against`)."""
    if result.score is None:
        return "no patch scored"
    if aggregate.rule == "region":
        if result.score >= aggregate.slide_threshold and not aggregate.calls(result.score):  # a call needs a region
            return (f"score 0 {AREA_UNIT}: no region at P({positive_class}) >= {_g(aggregate.region_threshold)} "
                    "to call on")
        return (f"score {score_against(aggregate, result.score)} (rule: largest region at "
                f"P({positive_class}) >= {_g(aggregate.region_threshold)})")
    return f"score {score_against(aggregate, result.score)} (rule: {aggregate.label})"


def focus_label(focus: Any) -> str:
    """A focus's label on the heatmap: rank, longest axis and, for the largest, its category."""
    text = f"{focus.rank}: {mm_words(focus.longest_axis_mm)} mm"
    return f"{text} ({focus.category})" if focus.rank == 1 else text


def title(ctx: CallContext) -> str:
    """Two lines: the slide, its call, metastasis and largest focus; its score against the threshold, the rule
    and the domain flag."""
    res, agg = ctx.result, ctx.aggregate
    if res is None or agg is None:
        return ctx.name
    if res.score is None or res.diagnosis == NO_TISSUE:
        return f"{ctx.name}: no tissue\n{domain_text(ctx.domain)}"
    positive = res.diagnosis == ctx.positive_class
    line1 = f"{ctx.name}: {res.diagnosis.upper() if positive else res.diagnosis}"
    if res.foci:
        line1 += (f" | metastasis {res.metastasis}, largest focus {mm_words(res.foci[0].longest_axis_mm)} mm "
                  f"({foci_count(len(res.foci))} outlined)")
    elif positive:
        line1 += f" | no focus ({ctx.focus_rule})"
    else:
        line1 += " | no focus counted"
    return f"{line1}\n{score_text(res, agg, ctx.positive_class)} | {domain_text(ctx.domain)}"


def evidence_label(ctx: CallContext) -> str:
    """The call's evidence in words, e.g. ``call evidence: highest patch, P(tumour) 0.966 >= 0.950`` ("" without
    any): which patches, the score read from them and the slide threshold it was compared with."""
    res, agg = ctx.result, ctx.aggregate
    if res is None or agg is None or res.score is None or not res.evidence_indices:
        return ""
    n = len(res.evidence_indices)
    if agg.rule == "max":
        what = f"highest patch, P({ctx.positive_class})"
    elif agg.rule == "topk":
        what = f"{n} highest patches, mean P({ctx.positive_class})"
    else:
        side = 2 * agg.radius + 1
        what = f"highest {side} x {side} neighbourhood ({n} patches), mean P({ctx.positive_class})"
    return f"call evidence: {what} {score_against(agg, res.score)}"


def outline_legend(ctx: CallContext) -> str:
    """The heatmap's legend of the outlined foci ("" without any), e.g. ``2 foci counted (largest bold): P(tumour) >=
    0.8, >= 6 patches``; under the region rule a largest region smaller than that counts too (it is the call's score),
    and the legend says so: ``..., >= 6 patches, and the largest region (5 patches)``."""
    agg = ctx.aggregate
    if not ctx.foci or agg is None:
        return ""
    text = f"{foci_count(len(ctx.foci))} counted (largest bold): {ctx.focus_rule}"
    largest = ctx.foci[0]
    if largest.n_patches < agg.min_focus_patches:
        text += f", and the largest region ({largest.n_patches} {'patch' if largest.n_patches == 1 else 'patches'})"
    return text


def views_key(ctx: CallContext) -> str:
    """What the heatmap and GeoJSON were drawn with: the rule and threshold in words, then a digest of everything
    drawn (title, threshold, foci, classes): equal keys, equal pictures."""
    foci = [f.indices for f in ctx.foci]
    evidence = list(ctx.result.evidence_indices) if ctx.result is not None else []
    digest = hashlib.sha256(json.dumps([title(ctx), ctx.threshold, foci, list(ctx.classes), evidence,
                                        evidence_label(ctx)]).encode())
    rule = ctx.aggregate.label if ctx.aggregate is not None else "no rule"
    return f"{VIEWS_VERSION}|{rule}|{ctx.threshold}|{digest.hexdigest()[:24]}"


def slide_grid(done: dict[str, Any], coords: np.ndarray, probs: np.ndarray) -> ScoreGrid | None:
    """The slide's patch probabilities on their grid (stride, tile size and level-0 mpp from its slide.json
    ``done``); None for a slide.json without them."""
    try:
        stride = int(done.get("stride_l0") or done["tile_size_l0"])
        mpp = float(done["slide_info"]["mpp"])
    except (KeyError, TypeError, ValueError):
        return None
    return patch_grid(coords, probs, stride, mpp, done.get("tile_size_l0"))


def heatmap_figure(store: Any, coords: np.ndarray, probs: np.ndarray, ctx: CallContext, *,
                   alpha: float = 0.55, thumbnail: np.ndarray | None = None, exact_pixels: bool = False) -> Any:
    """The heatmap of a slide's call (a matplotlib Figure): P(positive) ``probs`` (N,) over the thumbnail (the
    store's, or ``thumbnail`` of the whole slide at any resolution), contour at the call's patch threshold, every
    counted focus outlined with its size (the largest emphasised), the call in the title. ``exact_pixels``: drawn
    for writing at its dpi (:func:`wsi_screen.screening.heatmap.overlay_figure`)."""
    from wsi_screen.screening.geojson import tiles_geometry
    from wsi_screen.screening.heatmap import Outline, heatmap_array, overlay_figure

    thumb = np.asarray(thumbnail) if thumbnail is not None else store.thumbnail
    dims = tuple(store.attrs["slide"]["dimensions"])
    size = (int(dims[0]), int(dims[1]))
    heat = heatmap_array(coords, probs, store.tile_size_l0, int(store.attrs["stride_l0"]), size, thumb.shape[:2])
    outlines = [Outline(f.outline_l0, focus_label(f)) for f in ctx.foci]
    legend = outline_legend(ctx)
    evidence = None
    if ctx.result is not None and ctx.result.evidence_indices:
        evidence = Outline(tiles_geometry(coords, store.tile_size_l0, ctx.result.evidence_indices),
                           evidence_label(ctx))
    return overlay_figure(thumb, heat, title=title(ctx), legend_label=f"P({ctx.positive_class})", alpha=alpha,
                          threshold=ctx.threshold, threshold_name=ctx.threshold_name, dimensions_l0=size,
                          mpp=float(store.attrs["slide"]["mpp"]), outlines=outlines, outline_legend=legend,
                          evidence=evidence, exact_pixels=exact_pixels)


def draw_heatmap(path: Path, store: Any, coords: np.ndarray, probs: np.ndarray, ctx: CallContext) -> Path:
    """heatmap.png: :func:`heatmap_figure`, written atomically with :func:`views_key` in it."""
    from wsi_screen.screening.heatmap import save_png

    return save_png(heatmap_figure(store, coords, probs, ctx, exact_pixels=True), path, key=views_key(ctx))


def write_geojson(path: Path, coords: np.ndarray, tile_size_l0: int, probs: np.ndarray, ctx: CallContext) -> Path:
    """patches.geojson: the counted foci as annotations (largest first) and the call's evidence, then one tile per
    patch classed at the threshold the pictures show."""
    from wsi_screen.screening import geojson

    fc = geojson.patches_to_geojson(coords, tile_size_l0, probs, list(ctx.classes), slide_name=ctx.name,
                                    positive_index=ctx.positive_index, threshold=ctx.threshold,
                                    threshold_source=ctx.threshold_source, foci=ctx.foci,
                                    evidence=ctx.result.evidence_indices if ctx.result is not None else (),
                                    evidence_label=evidence_label(ctx),
                                    evidence_called=ctx.result is not None and ctx.result.score is not None
                                    and ctx.aggregate is not None and ctx.aggregate.calls(ctx.result.score))
    return geojson.write_geojson(fc, path)


def write_views(heatmap_path: Path, geojson_path: Path, store: Any, coords: np.ndarray, probs: np.ndarray,
                ctx: CallContext) -> None:
    """Write both pictures of a slide's call (each atomically); ``probs`` (N, C) all classes."""
    pos = ctx.positive_index if ctx.positive_index is not None else probs.shape[1] - 1
    draw_heatmap(heatmap_path, store, coords, probs[:, pos], ctx)
    write_geojson(geojson_path, coords, store.tile_size_l0, probs, ctx)
