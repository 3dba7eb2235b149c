"""Patch probabilities -> slide score and call (pure: arrays in, numbers and frozen dataclasses out).

Rules, over the positive-class probability of each of a slide's N patches:

``mean``      mean probability;
``max``       highest probability;
``topk``      mean of the k highest; ``k`` is a count (int >= 1) or a share of N (0 < k < 1, rounded up);
              always at least 1 and at most N patches;
``fraction``  share of patches with probability >= ``patch_threshold`` (a value in {0, 1/N, ..., 1});
``smoothmax`` spatial: the highest mean probability over a patch's ``(2 radius + 1)^2`` neighbourhood of
              tissue patches (in [0, 1]);
``region``    spatial: the area in mm² of the largest 8-connected region of patches with probability
              >= ``region_threshold`` (0 when there is none).

The first four ignore where patches are; the spatial rules need the patch grid (coordinates, stride, mpp)
and do not drift with slide size as the others do (false positives are scattered, tumour is contiguous;
docs/default-model.md measures both). Every rule is invariant to patch order and never decreases when a
patch's probability increases; ``max >= topk >= mean``. A slide is called positive when its score is >=
``slide_threshold`` (:meth:`AggregateConfig.calls`), and under the region rule only when it has a region too
(score > 0): a region call needs a region, so a slide threshold of 0 mm² calls a slide positive on any region at
all, never on none. A slide without patches has no score: :func:`diagnose` calls it "no tissue".

Foci: on a slide called positive, the regions at ``region_threshold`` of at least ``min_focus_patches``
patches (the size scattered false positives practically never reach, calibrated with the rule) are its foci,
whatever the rule; under the region rule the largest region always counts too (its area is the call's score). A
slide called positive by another rule may have no focus (metastasis ``none``): what decided it is its evidence.
Each slide result carries the largest focus's longest axis (mm), the total focus area (mm²; both 0 on a slide with
no focus, positive or negative, when the patch grid is known), the number of foci
and the metastasis category (``none``, ``itc`` < 0.2 mm, ``micro`` 0.2-2 mm, ``macro`` > 2 mm; see
:mod:`wsi_screen.screening.spatial` for how sizes are measured on the patch grid), and the foci themselves
(``SlideResult.foci``, largest first, each with its patches and outline): the heatmap draws and the GeoJSON exports
exactly these. A slide called negative has none.

One operating point per picture: :attr:`AggregateConfig.call_patch_threshold` is the patch probability a slide's
pictures show, the focus threshold ``region_threshold`` whatever the rule (the region rule's call reads it; the
others read none of their own, or, for ``fraction``, ``patch_threshold`` inside its score); a slide's heatmap
contour, GeoJSON tile classes, foci, report and notebook show that one. The patches a rule's score was read from
(:func:`call_evidence`: max's highest patch, top-k's k highest, smoothmax's neighbourhood) are the call's evidence,
marked on the pictures with the slide threshold they were compared with.

:mod:`wsi_screen.screening.calibration` chooses the rule, its settings and the slide threshold on labelled slides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from numbers import Real
from typing import Any

import numpy as np

from wsi_screen.errors import ConfigError, plain_number
from wsi_screen.screening import spatial
from wsi_screen.screening.spatial import ScoreGrid

logger = logging.getLogger(__name__)

RULES = ("mean", "max", "topk", "fraction", "smoothmax", "region")
SPATIAL_RULES = ("smoothmax", "region")
#: diagnosis and status of a slide without tissue patches
NO_TISSUE = "no tissue"
#: a slide's status in results.csv: scored, no tissue to score, failed, or skipped because another wsi-screen process
#: was writing its store or results (not a failure: a rerun picks it up)
STATUS_OK, STATUS_NO_TISSUE, STATUS_ERROR, STATUS_BUSY = "ok", NO_TISSUE, "error", "busy"
#: the statuses of a slide without results in the run (no slide folder of this run, no call)
NO_RESULT = (STATUS_ERROR, STATUS_BUSY)
#: how many of the highest-scoring patch indices a SlideResult keeps
N_TOP = 10



@dataclass(frozen=True, kw_only=True)
class AggregateConfig:
    """How patch probabilities become a slide call."""

    rule: str = "topk"
    k: int | float = 5
    patch_threshold: float = 0.5
    slide_threshold: float = 0.5
    radius: int = 1
    region_threshold: float = 0.5
    min_focus_patches: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy's numbers as Python's (the call's JSON holds them)
            object.__setattr__(self, f.name, plain_number(getattr(self, f.name)))
        _check_rule(self.rule)
        check_k(self.k)
        _check_unit("patch_threshold", self.patch_threshold)
        _check_unit("region_threshold", self.region_threshold)
        if self.rule == "region":
            value = self.slide_threshold
            if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 0 and
                                                                                     math.isfinite(value)):
                raise ConfigError(f"the region rule's `slide_threshold` is an area in {AREA_UNIT} >= 0, "
                                  f"got {value!r}")
        else:
            _check_unit("slide_threshold", self.slide_threshold)
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or not 1 <= self.radius <= 5:
            raise ConfigError(f"smoothmax radius must be a whole number of patches in 1-5, got {self.radius!r}")
        if isinstance(self.min_focus_patches, bool) or not isinstance(self.min_focus_patches, int) \
                or self.min_focus_patches < 1:
            raise ConfigError(f"min_focus_patches must be a count >= 1, got {self.min_focus_patches!r}")

    def calls(self, score: float) -> bool:
        """Whether a slide ``score`` by this rule is a positive call: ``score >= slide_threshold`` and, for the
        region rule, a region to call on (``score > 0``; see the module docstring)."""
        return score >= self.slide_threshold and (self.rule != "region" or score > 0)

    @property
    def label(self) -> str:
        """The rule as people read it (see :func:`rule_label`)."""
        return rule_label(self.rule, self.k, self.patch_threshold)

    @property
    def call_patch_threshold(self) -> float:
        """The one patch probability a slide's heatmap, GeoJSON, foci and report show, whatever the rule: the focus
        threshold ``region_threshold`` (see the module docstring; :func:`call_patch_threshold_name` says what it is
        to the rule). ``patch_threshold`` is the model's own."""
        return self.region_threshold

    @property
    def unit(self) -> str:
        """What the slide score measures."""
        return AREA_UNIT if self.rule == "region" else "probability"

    def to_json(self) -> dict[str, Any]:
        """Its fields, and ``call_patch_threshold`` (the pictures' threshold; ``patch_threshold`` is the model's)."""
        return {**asdict(self), "call_patch_threshold": self.call_patch_threshold}


@dataclass(frozen=True, kw_only=True)
class SlideResult:
    """A slide's score and call. ``score`` is None (and ``status`` "no tissue") when it has no patches."""

    score: float | None
    diagnosis: str
    n_patches: int
    top_indices: list[int] = field(default_factory=list)
    status: str = STATUS_OK
    rule: str = "topk"
    slide_threshold: float = 0.5
    n_positive_patches: int = 0  # patches at the model's patch_threshold (not the pictures': see n_call_positive)
    metastasis: str = "none"
    largest_focus_mm: float | None = None
    tumour_area_mm2: float | None = None
    n_foci: int = 0
    focus_indices: list[int] = field(default_factory=list)  # patches of the largest focus (input order)
    foci: tuple[spatial.Focus, ...] = ()  # every focus the call counts, largest first (positive calls only)
    n_call_positive: int = 0  # patches at the call's patch threshold (call_patch_threshold): the pictures' tumour tiles
    evidence_indices: tuple[int, ...] = ()  # patches the score was read from (call_evidence), ascending

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: the unit of an area (the region rule's score and threshold, a focus's area) wherever people read it: terminal,
#: pictures, model card (CSV columns keep their names, e.g. ``tumour_area_mm2``)
AREA_UNIT = "mm²"
#: most decimals :func:`score_decimals` gives a score and its threshold
MOST_DECIMALS = 6


def score_decimals(slide_threshold: float, scores: Sequence[float | None] = ()) -> int:
    """The decimals to print slide ``scores`` and their ``slide_threshold`` with (the same for all, so they line
    up): at least 3 and the threshold's own (as 3 significant digits show it: 4 for 0.0479), then more until every
    score below the threshold prints below it (0.9846 < 0.9848, not 0.985 < 0.985), at most
    :data:`MOST_DECIMALS`. A score at or above the threshold never prints below it (rounding keeps order)."""
    t = float(slide_threshold)
    shown = Decimal(f"{t:.3g}") if math.isfinite(t) else Decimal(0)  # 0.0479, 0.01, 5, 1e-05
    least = max(3, -int(shown.as_tuple().exponent))
    below = [float(s) for s in scores if s is not None and float(s) < t]
    for d in range(min(least, MOST_DECIMALS), MOST_DECIMALS + 1):
        if all(round(s, d) < round(t, d) for s in below):
            return d
    return MOST_DECIMALS


def call_comparison(rule: str | None, slide_threshold: float, decimals: int | None = None) -> str:
    """How a score by ``rule`` is compared with ``slide_threshold`` to call a slide positive, for a sentence:
    ``>= 0.0479``, or ``> 0`` for the region rule at 0 (a region call needs a region; :meth:`AggregateConfig.calls`).
    With ``decimals`` (:func:`score_decimals` of the scores shown beside it) the threshold has that many."""
    if rule == "region" and slide_threshold <= 0:
        return "> 0"
    return f">= {slide_threshold:.3g}" if decimals is None else f">= {slide_threshold:.{decimals}f}"


def score_against(config: AggregateConfig, score: float) -> str:
    """A slide score against its threshold, both with :func:`score_decimals` and the rule's unit: ``0.9846 <
    0.9848``, ``0.6530 mm² >= 0.0479 mm²``, ``0.100 mm² > 0 mm²`` (the region rule at 0, :func:`call_comparison`). A
    region score of 0 at threshold 0 (no region to call on) reads ``0.000 mm² (no region)``."""
    d = score_decimals(config.slide_threshold, [score])
    unit = f" {AREA_UNIT}" if config.rule == "region" else ""
    shown = f"{score:.{d}f}{unit}"
    if config.calls(score):
        return f"{shown} {call_comparison(config.rule, config.slide_threshold, d)}{unit}"
    if score >= config.slide_threshold:
        return f"{shown} (no region)"
    return f"{shown} < {config.slide_threshold:.{d}f}{unit}"


def call_patch_threshold(aggregate: Mapping[str, Any]) -> float | None:
    """:attr:`AggregateConfig.call_patch_threshold` of a recorded rule (run.json's ``aggregate``, as
    :meth:`AggregateConfig.to_json` writes it; a run.json from before it was recorded: its ``region_threshold``).
    None without one. The record's ``patch_threshold`` is the model's own."""
    value = aggregate.get("call_patch_threshold", aggregate.get("region_threshold"))
    return None if value is None else float(value)


def call_patch_threshold_name(rule: str | None) -> str:
    """What :func:`call_patch_threshold` is to a call by ``rule``, in words: ``the call's patch threshold`` (the
    region rule reads it) or ``the focus threshold`` (the other rules read no patch threshold of their own)."""
    return "the call's patch threshold" if rule == "region" else "the focus threshold"


def rule_label(rule: str | None, k: int | float | None = None, patch_threshold: float | None = None) -> str:
    """A rule's name with the setting that changes its meaning: ``topk (k = 5)``, ``fraction (of patches at
    p >= 0.213)`` (the fraction rule counts patches at the model's patch threshold, not the pictures' one); the
    others by name."""
    if rule == "topk" and k is not None:
        return f"{rule} (k = {k:g})"
    if rule == "fraction" and patch_threshold is not None:
        return f"{rule} (of patches at p >= {float(patch_threshold):.3g})"
    return str(rule)


def recorded_rule_label(aggregate: Mapping[str, Any]) -> str:
    """:func:`rule_label` of a rule as run.json records it (``AggregateConfig.to_dict``)."""
    return rule_label(aggregate.get("rule"), aggregate.get("k"), aggregate.get("patch_threshold"))


def foci_count(n: int) -> str:
    """``1 focus``, ``0 foci``, ``2 foci``: a number of foci in words."""
    return f"{n} {'focus' if n == 1 else 'foci'}"


def call_counts(calls: Iterable[tuple[str, bool]]) -> list[tuple[str, int, int]]:
    """``(call, slides, of them out of domain)`` by call (a diagnosis, "no tissue", "error" or "busy"), in name
    order, from each slide's ``(call, out_of_domain)``: what the report's summary boxes and `infer`'s closing lines
    count (a slide out of domain keeps its call, which should not be trusted, so it is counted apart within it)."""
    found: dict[str, list[int]] = {}
    for call, outside in calls:
        n = found.setdefault(call, [0, 0])
        n[0] += 1
        n[1] += bool(outside)
    return [(call, n, ood) for call, (n, ood) in sorted(found.items())]


def out_of_domain_words(n: int) -> str:
    """`` (2 out of domain)`` after a call's count; empty for none."""
    return f" ({n} out of domain)" if n else ""


def describe(config: AggregateConfig, positive_class: str, *, patch_area_mm2: float | None = None) -> str:
    """The slide rule as a sentence for people (a model card's ``operating_point.slide_rule``), e.g. ``largest
    connected region of patches with P(tumour) >= 0.8 of at least 0.0479 mm² (6 patches) -> tumour``."""
    p = f"P({positive_class})"
    t = f"{config.slide_threshold:.3g}"
    if config.rule == "region":
        patches = (f" ({math.ceil(round(config.slide_threshold / patch_area_mm2, 9))} patches)"
                   if patch_area_mm2 and config.slide_threshold > 0 else "")
        what = (f"largest connected region of patches with {p} >= {config.region_threshold:.3g} of at least "
                f"{t} {AREA_UNIT}{patches}")
    elif config.rule == "smoothmax":
        side = 2 * config.radius + 1
        what = f"highest mean {p} over a {side} x {side} patch neighbourhood >= {t}"
    elif config.rule == "max":
        what = f"highest patch {p} >= {t}"
    elif config.rule == "mean":
        what = f"mean {p} over all patches >= {t}"
    elif config.rule == "topk":
        top = f"{config.k:g} highest" if config.k >= 1 else f"highest {config.k:.0%} of"
        what = f"mean {p} of the {top} patches >= {t}"
    else:  # fraction
        what = f"share of patches with {p} >= {config.patch_threshold:.3g} of at least {t}"
    return f"{what} -> {positive_class}"


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown aggregation rule {rule!r}; choose one of {', '.join(RULES)}")


def check_k(k: int | float) -> None:
    """Refuse a top-k ``k`` that is neither a whole count >= 1 nor a share in (0, 1)."""
    if isinstance(k, bool) or not isinstance(k, Real) or not math.isfinite(k):
        raise ConfigError(f"top-k `k` must be a count >= 1 or a share in (0, 1), got {k!r}")
    if k <= 0 or (k >= 1 and k != int(k)):
        raise ConfigError(f"top-k `k` must be a whole count >= 1 or a share in (0, 1), got {k!r}")


def check_k_read(rule: str, k: int | float | None) -> None:
    """Refuse a ``k`` given (not None) for a slide ``rule`` that reads none: only ``topk`` does, and another would
    ignore it without a word."""
    if k is not None and rule != "topk":
        raise ConfigError(f"`k` is read by the topk rule only, and the slide rule is {rule}: drop `k`, or set `rule` "
                          "to topk")


def as_k(k: float) -> int | float:
    """A top-k ``k`` as a number typed gives it (``2.0``) checked by :func:`check_k`: a whole count as an int, a
    share as it is."""
    check_k(k)
    return int(k) if k >= 1 else k


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 <= value <= 1.0):
        raise ConfigError(f"`{name}` must be a number in [0, 1], got {value!r}")


def check_probs(probs: np.ndarray | Sequence[float]) -> np.ndarray:
    """``probs`` as a float64 vector, or ConfigError if it is not 1-D, has NaN or leaves [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"patch probabilities must be a vector (N,), got shape {p.shape}")
    if p.size:
        if np.isnan(p).any():
            raise ConfigError(f"patch probabilities contain NaN ({int(np.isnan(p).sum())} of {p.size})")
        lo, hi = float(p.min()), float(p.max())
        if lo < 0.0 or hi > 1.0:
            raise ConfigError(f"patch probabilities must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    return p


def top_k_count(n: int, k: int | float) -> int:
    """Patches that ``topk`` averages for a slide of ``n`` patches (1 <= count <= n for n >= 1)."""
    check_k(k)
    count = math.ceil(round(k * n, 9)) if k < 1 else int(k)
    return max(1, min(n, count))


def slide_score(probs: np.ndarray | Sequence[float], rule: str, *, k: int | float = 5,
                patch_threshold: float = 0.5, grid: ScoreGrid | None = None, radius: int = 1,
                region_threshold: float = 0.5) -> float:
    """A slide's score from its patches' positive-class probabilities (see the module docstring).

    The spatial rules read ``grid`` (:func:`wsi_screen.screening.spatial.patch_grid` of the same probabilities)."""
    _check_rule(rule)
    _check_unit("patch_threshold", patch_threshold)
    p = check_probs(probs)
    n = p.size
    if n == 0:
        raise ConfigError("a slide score needs at least one patch probability; use diagnose() for slides "
                          "without tissue")
    if rule in SPATIAL_RULES:
        if grid is None:
            raise ConfigError(f"the {rule} rule needs the patches' grid positions (coordinates, stride, mpp)")
        if rule == "smoothmax":
            return spatial.smoothed_max(grid, radius)
        found = spatial.regions(grid, region_threshold)
        return found[0].area_mm2 if found else 0.0
    if rule == "mean":
        score = float(p.mean())
    elif rule == "max":
        score = float(p.max())
    elif rule == "topk":
        m = top_k_count(n, k)
        score = float(np.partition(p, n - m)[n - m:].mean())
    else:  # fraction
        score = int(np.count_nonzero(p >= patch_threshold)) / n
    if rule != "fraction":  # rounding in a mean must not step outside the data's range
        score = min(max(score, float(p.min())), float(p.max()))
    return score


def top_indices(probs: np.ndarray, n: int = N_TOP) -> list[int]:
    """Indices of the ``n`` highest probabilities, highest first (ties: lower index first)."""
    p = np.asarray(probs, dtype=np.float64)
    n = min(n, p.size)
    if n == 0:
        return []
    if p.size > 4 * n:
        cand = np.argpartition(-p, n - 1)[:n]
        cut = p[cand].min()
        cand = np.flatnonzero(p >= cut)  # every index tied at the cut, so the order below is exact
    else:
        cand = np.arange(p.size)
    order = np.lexsort((cand, -p[cand]))
    return [int(i) for i in cand[order][:n]]


def foci(grid: ScoreGrid, config: AggregateConfig) -> list[spatial.Region]:
    """A positive slide's foci: regions at ``region_threshold`` of >= ``min_focus_patches`` patches, whatever the
    rule, and under the region rule always the largest region (the call's score)."""
    found = spatial.regions(grid, config.region_threshold)
    return [r for i, r in enumerate(found)
            if r.n_patches >= config.min_focus_patches or (i == 0 and config.rule == "region")]


def call_evidence(probs: np.ndarray, config: AggregateConfig, grid: ScoreGrid | None = None) -> tuple[int, ...]:
    """The patches (input order, ascending) a slide score by ``config.rule`` was read from, when they are few:
    ``max`` its highest patch, ``topk`` its k highest (:func:`top_k_count`), ``smoothmax`` the tissue patches of the
    highest neighbourhood (needs ``grid``). The region rule's is its largest region (the first focus); ``mean`` and
    ``fraction`` pool every patch: none."""
    p = np.asarray(probs, dtype=np.float64)
    if p.size == 0:
        return ()
    if config.rule in ("max", "topk"):
        m = 1 if config.rule == "max" else top_k_count(p.size, config.k)
        order = np.lexsort((np.arange(p.size), -p))  # highest first, ties: lower index (as top_indices)
        return tuple(sorted(int(i) for i in order[:m]))
    if config.rule == "smoothmax" and grid is not None:
        return spatial.smoothed_max_patches(grid, config.radius)
    return ()


def diagnose(probs: np.ndarray | Sequence[float], config: AggregateConfig, *, positive: str,
             negative: str, grid: ScoreGrid | None = None) -> SlideResult:
    """Score a slide by ``config.rule``; call it ``positive`` (:meth:`AggregateConfig.calls`) or ``negative``.

    With ``grid`` (the patches on their grid, :func:`wsi_screen.screening.spatial.patch_grid`) a positive call also
    measures the foci (see the module docstring); the spatial rules need it."""
    p = check_probs(probs)
    if p.size == 0:
        return SlideResult(score=None, diagnosis=NO_TISSUE, n_patches=0, status=NO_TISSUE, rule=config.rule,
                           slide_threshold=config.slide_threshold)
    score = slide_score(p, config.rule, k=config.k, patch_threshold=config.patch_threshold, grid=grid,
                        radius=config.radius, region_threshold=config.region_threshold)
    called = config.calls(score)
    sizes: dict[str, Any] = {"evidence_indices": call_evidence(p, config, grid)}
    if grid is not None:  # no focus measures 0, whatever the call
        sizes |= {"largest_focus_mm": 0.0, "tumour_area_mm2": 0.0}
        found = foci(grid, config) if called else []
        if found:
            made = tuple(spatial.focus(r, grid, rank) for rank, r in enumerate(found, start=1))
            largest = made[0]
            sizes |= {"metastasis": largest.category, "largest_focus_mm": largest.longest_axis_mm,
                     "tumour_area_mm2": float(sum(f.area_mm2 for f in made)), "n_foci": len(made),
                     "focus_indices": list(largest.indices), "foci": made}
    return SlideResult(
        score=score, diagnosis=positive if called else negative, n_patches=int(p.size),
        top_indices=top_indices(p), rule=config.rule, slide_threshold=config.slide_threshold,
        n_positive_patches=int(np.count_nonzero(p >= config.patch_threshold)),
        n_call_positive=int(np.count_nonzero(p >= config.call_patch_threshold)), **sizes)
