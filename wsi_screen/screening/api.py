"""One slide in Python: score it, call it, draw its heatmap, or all of it at once (:func:`screen`).

The screening stage's public verbs, re-exported from :mod:`wsi_screen`. They are ``wsi-screen infer`` for one
slide, in memory, built from the same parts: the model's tiling settings
(:func:`~wsi_screen.screening.run.tile_config_for`), the scorer (:func:`~wsi_screen.screening.score.score_stores`),
the model folder's slide rule (:func:`~wsi_screen.screening.run.resolve_aggregate`) and the call
(:func:`~wsi_screen.screening.outputs.call_scores`). A slide's call is made from its probabilities as
``scores.csv`` keeps them (6 decimals), as ``infer`` makes it, so :func:`screen` gives results.csv's diagnosis
and score to the digit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import numpy as np

from wsi_screen.errors import ConfigError, ModelMismatchError, check_type, check_whole, speaks_api
from wsi_screen.models import PatchClassifier, load_model
from wsi_screen.screening import runfolder
from wsi_screen.screening.aggregate import (
    AggregateConfig,
    SlideResult,
    check_k_read,
    foci_count,
    score_against,
    top_indices,
)
from wsi_screen.screening.outputs import call_scores, positive_column, slide_domain
from wsi_screen.screening.run import InferConfig, decision_thresholds, fallback_rule, model_sha256, resolve_aggregate
from wsi_screen.screening.spatial import Focus, patch_grid
from wsi_screen.slide.slide import Slide, open_slide
from wsi_screen.tiling.store import PatchStore

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Scores:
    """A slide's patch scores, aligned with its store's patches: row ``i`` is ``store[i]`` at ``coords[i]``.

    ``probabilities`` float32 (N, C) in the order of ``classes``; ``coords`` int64 (N, 2) level-0 (x, y) of
    each patch's top-left corner; ``domain_distance`` float32 (N,), how far each patch is from the model's
    training data (None without a domain model); ``store`` the patches themselves. ``model_sha256`` identifies the
    model that made them (the sha256 of its folder's weights and config, as a run folder records it; None for a
    model built in memory) and ``model_dir`` is its folder: :func:`call_slide` refuses another model's rule.

    Examples
    --------
    >>> import wsi_screen
    >>> model = wsi_screen.load_model()
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     scores = wsi_screen.score(slide, model)
    >>> best = scores.top(1)[0]                     # the highest-scoring patch
    >>> scores.store[best].shape, bool(scores.positive[best] == scores.positive.max())
    ((96, 96, 3), True)
    """

    probabilities: np.ndarray
    coords: np.ndarray
    domain_distance: np.ndarray | None
    classes: tuple[str, ...]
    positive_class: str
    store: PatchStore = field(repr=False)
    model_sha256: str | None = None
    model_dir: Path | None = None

    @property
    def positive(self) -> np.ndarray:
        """Probability of the positive class, float32 (N,)."""
        return self.probabilities[:, self.classes.index(self.positive_class)]

    def top(self, n: int = 8) -> list[int]:
        """Indices of the ``n`` highest-scoring patches, highest first (``store[i]``, ``coords[i]``); ``n`` is a whole
        number >= 0 (:class:`~wsi_screen.errors.ConfigError` otherwise; more than there are gives them all)."""
        return top_indices(self.positive, check_whole(n, "n", at_least=0))

    def __len__(self) -> int:
        return int(self.probabilities.shape[0])

    def __repr__(self) -> str:
        return f"Scores({self.store.name!r}, {len(self)} patches, classes {list(self.classes)})"

    def as_slide_scores(self) -> runfolder.SlideScores:
        """As ``scores.csv`` holds them (see :mod:`wsi_screen.screening.runfolder`)."""
        return runfolder.SlideScores(coords=self.coords, tissue=self.store.tissue, probs=self.probabilities,
                                     classes=list(self.classes), domain_distance=self.domain_distance)


@dataclass(frozen=True, eq=False)
class SlideCall:
    """A slide's call: what ``wsi-screen infer`` writes in its row of results.csv.

    ``diagnosis`` is the positive class, the negative one or "no tissue"; ``score`` (None without tissue) is
    compared with ``threshold`` by ``rule``; ``metastasis`` (``none``, ``itc``, ``micro``, ``macro``) sizes the
    largest of the ``foci`` (connected regions of likely tumour, largest first, each with ``n_patches``,
    ``area_mm2``, ``longest_axis_mm``, ``centre_l0``: the mean of its patches' centres, which may lie outside an
    irregular focus, and ``outline_l0``); ``in_domain_fraction`` is the share of patches that
    resemble the model's training data (``out_of_domain``: too few, the call is unreliable). ``result`` and
    ``aggregate`` hold the rest (top patches, the rule's settings).

    Examples
    --------
    >>> import wsi_screen
    >>> call = wsi_screen.screen("examples/CMU-1-Small-Region.svs")
    >>> call
    SlideCall('CMU-1-Small-Region': normal, score 0.0435 mm² < 0.0479 mm² by region, 35% in domain)
    >>> call.metastasis, call.foci, call.out_of_domain
    ('none', (), True)
    """

    name: str
    result: SlideResult
    aggregate: AggregateConfig
    in_domain_fraction: float | None = None
    out_of_domain: bool | None = None

    @property
    def foci(self) -> tuple[Focus, ...]:
        """The foci the call counted, largest first (the ones heatmap.png outlines and patches.geojson lists)."""
        return self.result.foci

    @property
    def diagnosis(self) -> str:
        return self.result.diagnosis

    @property
    def score(self) -> float | None:
        return self.result.score

    @property
    def threshold(self) -> float:
        """The slide threshold ``score`` is compared with (``slide_threshold`` in :meth:`to_json`)."""
        return self.aggregate.slide_threshold

    @property
    def slide_threshold(self) -> float:
        """:attr:`threshold` by the name :meth:`to_json` and run.json's ``aggregate`` give it (results.csv's
        ``threshold``)."""
        return self.threshold

    @property
    def rule(self) -> str:
        """The rule as people read it, e.g. ``topk (k = 5)``."""
        return self.aggregate.label

    @property
    def metastasis(self) -> str:
        return self.result.metastasis

    @property
    def largest_focus_mm(self) -> float | None:
        return self.result.largest_focus_mm

    @property
    def tumour_area_mm2(self) -> float | None:
        return self.result.tumour_area_mm2

    @property
    def n_patches(self) -> int:
        return self.result.n_patches

    def to_json(self) -> dict[str, Any]:
        """The whole call as a dict that ``json.dumps`` accepts; not a string (``json.dumps(call.to_json())`` is).

        Some attributes are named otherwise: ``slide`` is :attr:`name`, ``slide_threshold`` is :attr:`threshold`
        (also ``aggregate.slide_threshold``), and ``rule`` is the rule's name, ``aggregate.rule`` (:attr:`rule` is
        its label, e.g. ``topk (k = 5)``). The other attributes are keys of the same name (``foci`` as a list of
        dicts, ``aggregate`` as a dict). A run of ``wsi-screen infer`` records this call in results.csv (the
        columns of the same name, and ``threshold`` for ``slide_threshold``), run.json's ``aggregate`` and
        patches.geojson (the foci, ``evidence_indices``); not in slide.json (docs/api.md, ``SlideCall``).
        """
        return {"slide": self.name, **self.result.to_json(), "aggregate": self.aggregate.to_json(),
                "foci": [f.to_json() for f in self.foci], "in_domain_fraction": self.in_domain_fraction,
                "out_of_domain": self.out_of_domain}

    def __repr__(self) -> str:
        # the score against the threshold as infer's table and the heatmap title show it (score_against): with the
        # decimals that keep them apart, never a normal call printed at or above its threshold
        score = "none" if self.score is None else score_against(self.aggregate, self.score)
        extra = f", {self.metastasis}, {foci_count(len(self.foci))}" if self.foci else ""
        domain = "" if self.in_domain_fraction is None else f", {self.in_domain_fraction:.0%} in domain"
        return f"SlideCall({self.name!r}: {self.diagnosis}, score {score} by {self.rule}{extra}{domain})"


def _rule(model: PatchClassifier, config: InferConfig | None = None) -> AggregateConfig:
    """The model folder's slide rule, with ``config``'s overrides; a model built in memory (no folder, no
    calibrated rule) gets the fallback rule at its own patch threshold."""
    config = config or InferConfig()
    if model.model_dir is None:
        given: dict[str, Any] = {"rule": config.rule, "slide_threshold": config.threshold, "k": config.k}
        fallback = fallback_rule(model.spec.threshold)
        check_k_read(config.rule or fallback.rule, config.k)
        return replace(fallback, **{key: value for key, value in given.items() if value is not None})
    return resolve_aggregate(model.model_dir, model, config)


#: each loaded model's :func:`~wsi_screen.screening.run.model_sha256`, hashed once (its weights can be large)
_sha256s: WeakKeyDictionary[PatchClassifier, str] = WeakKeyDictionary()


def _sha256(model: PatchClassifier) -> str | None:
    """The identity of the model's patch scores: its folder's sha256; None for a model built in memory."""
    if model.model_dir is None:
        return None
    if model not in _sha256s:
        _sha256s[model] = model_sha256(model.model_dir)
    return _sha256s[model]


def _check_scored_by(scores: Scores, model: PatchClassifier) -> None:
    """Refuse to call ``scores`` by another model's rule than the model that made them (a model built in memory
    cannot say, and is taken on trust)."""
    found = _sha256(model)
    if scores.model_sha256 and found and found != scores.model_sha256:
        raise ModelMismatchError(f"these scores of {scores.store.name} were made by the model {scores.model_dir} "
                                 f"(sha256 {scores.model_sha256[:12]}), not by {model.model_dir} (sha256 "
                                 f"{found[:12]}): pass `call_slide` the model that scored them, or score the slide "
                                 "again with this one")


#: what the verbs take as a model: a loaded one, a model folder or name (``"default"``), or None (the bundled one)
ModelLike = PatchClassifier | str | os.PathLike[str] | None


def _as_model(model: ModelLike) -> PatchClassifier:
    """``model`` loaded (:func:`wsi_screen.load_model`) unless it is."""
    return model if isinstance(model, PatchClassifier) else load_model(model)


@speaks_api
def score(store_or_slide: PatchStore | Slide, model: ModelLike = None, *, batch_size: int = 128,
          workers: int = 2) -> Scores:
    """Every patch's class probabilities and domain distance.

    Parameters
    ----------
    store_or_slide
        A patch store (:func:`wsi_screen.tile`) made with the model's resolution, patch size and stain, or
        an open slide, which is then tiled in memory as ``infer`` tiles it for this model. The store's patches
        are scored as they are kept: an in-memory, lz4 or coordinates-only store's are the slide's pixels (the
        scores are ``infer``'s); a JPEG store's (``tile``'s default on disk) are not, and the scores differ
        (enough to move a call or flag near its threshold).
    model
        A loaded model (:func:`wsi_screen.load_model`), a model folder or name (``"default"``), or ``None`` for the
        bundled default model, as :func:`screen` takes it.
    batch_size
        Patches per forward pass (at least 1).
    workers
        Reader threads when tiling a slide, at least 1.

    Returns
    -------
    Scores
        ``probabilities`` (N, C), ``coords`` (N, 2) and ``domain_distance`` (N,), aligned with the store's
        patches (``scores.store``).

    Raises
    ------
    ModelMismatchError
        A store cut at another resolution, size or stain than the model's.

    Examples
    --------
    >>> import wsi_screen
    >>> model = wsi_screen.load_model()
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     scores = wsi_screen.score(slide, model)
    >>> scores.probabilities.shape, scores.coords.shape
    ((66, 2), (66, 2))
    """
    from wsi_screen.screening.run import tile_config_for
    from wsi_screen.screening.score import check_batch_size, check_store_matches_model, score_stores
    from wsi_screen.tiling.pipeline import tile_with

    check_batch_size(batch_size)  # before a slide is tiled for nothing
    workers = check_whole(workers, "workers", at_least=1)
    model = _as_model(model)
    if isinstance(store_or_slide, Slide):
        # an in-memory store keeps its (lz4) pixels: scores.store[i] must not need the slide after it is closed
        store = tile_with(store_or_slide, None,
                          tile_config_for(model, InferConfig(workers=workers, keep_patches=True)))
    elif isinstance(store_or_slide, PatchStore):
        store = store_or_slide
        check_store_matches_model(store.attrs, model.spec, store.location,
                                  other_way="or pass the open slide to `score`, which tiles it as the model needs")
        lossy = store.lossy_note("scoring")
        if lossy:
            log.warning("%s: %s", store.location, lossy)
    else:
        check_type(store_or_slide, (PatchStore, Slide), "store_or_slide", "a PatchStore or an open Slide")
    before = model.decision_thresholds
    model.decision_thresholds = decision_thresholds(model, _rule(model))  # as infer scores for this rule
    try:
        slides = {store.location: store.slide_path} if store.slide_path else None  # opened with a moved slide
        ((_, probs, distance),) = list(score_stores([store.location], model, batch_size=batch_size, slides=slides))
    finally:
        model.decision_thresholds = before
    spec = model.spec
    return Scores(probabilities=probs, coords=store.coords, domain_distance=distance, classes=tuple(spec.classes),
                  positive_class=str(spec.positive_class), store=store, model_sha256=_sha256(model),
                  model_dir=model.model_dir)


@speaks_api
def call_slide(scores: Scores, model: ModelLike = None, *, rule: str | None = None, threshold: float | None = None,
               k: int | float | None = None) -> SlideCall:
    """The slide's call from its patch scores, by the model's calibrated slide rule.

    Parameters
    ----------
    scores
        From :func:`score`.
    model
        The model that scored them (loaded, or its folder or name as :func:`score` takes it): its folder holds the
        slide rule (``slide_rule.json``) and its domain model. Another model folder (another sha256 of weights and
        config than ``scores.model_sha256``) is refused: its rule would be applied to scores it did not make.
    rule, threshold, k
        Override the rule (``mean``, ``max``, ``topk``, ``fraction``, ``smoothmax``, ``region``), its slide
        threshold and top-k's k, as the ``rule``, ``threshold`` and ``k`` settings of ``infer`` do.

    Returns
    -------
    SlideCall
        Diagnosis, score, threshold, rule, metastasis category, foci with their sizes, in-domain fraction.

    Raises
    ------
    ModelMismatchError
        ``scores`` were made by another model folder than ``model``.

    Examples
    --------
    >>> import wsi_screen
    >>> model = wsi_screen.load_model()
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     call = wsi_screen.call_slide(wsi_screen.score(slide, model), model)
    >>> call.diagnosis, call.rule, call.metastasis
    ('normal', 'region', 'none')
    """
    check_type(scores, Scores, "scores", "the Scores of wsi_screen.score")
    model = _as_model(model)
    _check_scored_by(scores, model)
    aggregate = _rule(model, InferConfig(rule=rule, threshold=threshold, k=k))
    written = runfolder.as_written(scores.as_slide_scores())
    attrs = scores.store.attrs
    grid = patch_grid(written.coords, written.probs[:, positive_column(written, model.spec)], int(attrs["stride_l0"]),
                      float(attrs["slide"]["mpp"]))
    result = call_scores(written, model, aggregate, grid)
    domain = slide_domain(written, model)
    return SlideCall(name=scores.store.name, result=result, aggregate=aggregate,
                     in_domain_fraction=domain.get("in_domain_fraction"), out_of_domain=domain.get("out_of_domain"))


@speaks_api
def heatmap(slide: Slide | None, scores: Scores, call: SlideCall, *, mpp: float | None = None) -> Figure:
    """The slide's heatmap, as ``infer`` draws its heatmap.png: the thumbnail beside the probability of the
    positive class over it, the call's patch threshold as a contour, every focus the call counted outlined with
    its size, the call in the title (:func:`wsi_screen.screening.callview.heatmap_figure`).

    Parameters
    ----------
    slide
        The open slide the scores come from, read at ``mpp`` for the background; ``None`` uses the store's
        thumbnail.
    scores, call
        From :func:`score` and :func:`call_slide`, ``call`` of these ``scores`` (another slide's is a
        ``ConfigError``, as is a ``slide`` other than theirs).
    mpp
        Background resolution (microns per pixel); by default the store's thumbnail resolution.

    Returns
    -------
    matplotlib.figure.Figure
        Shown by a notebook as it is; ``fig.savefig("heatmap.png")`` writes it.

    Examples
    --------
    >>> import wsi_screen
    >>> model = wsi_screen.load_model()
    >>> with wsi_screen.open_slide("examples/CMU-1-Small-Region.svs") as slide:
    ...     scores = wsi_screen.score(slide, model)
    ...     fig = wsi_screen.heatmap(slide, scores, wsi_screen.call_slide(scores, model))
    >>> fig.axes[1].get_title()
    'P(tumour) overlay'
    """
    from wsi_screen.screening.callview import CallContext, heatmap_figure

    check_type(slide, (Slide, type(None)), "slide", "the open Slide the scores come from, or None")
    check_type(scores, Scores, "scores", "the Scores of wsi_screen.score")
    check_type(call, SlideCall, "call", "the SlideCall of wsi_screen.call_slide")
    store = scores.store
    if (call.name, call.n_patches) != (store.name, len(scores)):  # its foci and title would be drawn over these
        raise ConfigError(f"`call` is another slide's ({call.name}, {call.n_patches} patches; these scores are "
                          f"{store.name}'s, {len(scores)} patches): pass call_slide(scores) of these scores")
    info = store.attrs["slide"]
    dims = (int(info["dimensions"][0]), int(info["dimensions"][1]))
    if slide is None:
        thumb = store.thumbnail
    else:
        if slide.dimensions != dims:
            raise ConfigError(f"{slide.path}: these scores are of another slide ({info['name']}, {dims[0]} x "
                              f"{dims[1]} px; this one is {slide.dimensions[0]} x {slide.dimensions[1]} px)")
        thumb = slide.thumbnail(mpp if mpp is not None else float(store.attrs["tissue"]["thumbnail_mpp"]))
    domain = {"in_domain_fraction": call.in_domain_fraction, "out_of_domain": call.out_of_domain} \
        if call.in_domain_fraction is not None else {}
    ctx = CallContext(name=call.name, classes=tuple(scores.classes),
                      positive_index=scores.classes.index(scores.positive_class),
                      model_threshold=call.aggregate.patch_threshold, aggregate=call.aggregate, result=call.result,
                      domain=domain)
    return heatmap_figure(store, scores.coords, scores.positive, ctx, thumbnail=thumb)


@speaks_api
def screen(path: str | os.PathLike[str] | Slide, model: ModelLike = None, *,
           mpp: float | None = None, force_mpp: float | None = None, workers: int = 2) -> SlideCall:
    """Screen one slide: open, tile (in memory, at the model's settings), score and call it.

    Parameters
    ----------
    path
        A slide file (or a DICOM series folder), or a slide already open (:func:`wsi_screen.open_slide`; it is left
        open, and ``mpp`` and ``force_mpp`` are those it was opened with).
    model
        A loaded model, a model folder, or ``None`` for the bundled default model.
    mpp
        Level-0 microns per pixel for a slide that declares none.
    force_mpp
        Level-0 microns per pixel that replaces the declared value (a wrong, implausible or non-square one).
    workers
        Reader threads, at least 1.

    Returns
    -------
    SlideCall
        The diagnosis and score ``wsi-screen infer`` writes for this slide in results.csv, with the foci and
        the in-domain fraction.

    Examples
    --------
    >>> import wsi_screen
    >>> call = wsi_screen.screen("examples/CMU-1-Small-Region.svs")
    >>> call.diagnosis, f"{call.score:.6f}"        # as in results.csv
    ('normal', '0.043537')
    """
    if isinstance(path, Slide):
        if mpp is not None or force_mpp is not None:
            raise ConfigError(f"{path.path}: an open slide has its resolution: pass `mpp` or `force_mpp` to "
                              "`wsi_screen.open_slide`, not to `screen`")
        classifier = _as_model(model)
        return call_slide(score(path, classifier, workers=workers), classifier)
    check_type(path, (str, os.PathLike), "path", "a slide's path or an open Slide")
    classifier = _as_model(model)
    with open_slide(path, mpp, force_mpp=force_mpp) as slide:
        return call_slide(score(slide, classifier, workers=workers), classifier)
