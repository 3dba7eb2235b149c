"""``wsi-screen calibrate``: a lab's own labelled slides set the slide rule of a copy of the model.

Reads a run folder made by ``wsi-screen infer`` (its results.csv, and each slide's scores.csv and
slide.json), the slide labels, chooses the rule and threshold exactly as the bundled model's were chosen
(:func:`wsi_screen.screening.calibration.calibrate`), and writes a copy of the run's model folder whose
``slide_rule.json`` holds the choice, so screening with the copy as its model uses it; the copy's ``card.json``
states it (``operating_point.slide_rule``), so the copy's model card and the report's card box say what the copy
does. A ``model`` given must be the one that scored the run (the sha256 run.json records): a rule chosen on
another model's scores would not hold for it. :func:`rule_changes` lists the settings the copy's rule changes from
its source's (the command prints them).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_screen._safe_write import atomic_write_text, fsync_tree, swap_in, write_failed
from wsi_screen.errors import ConfigError, RunError
from wsi_screen.metrics import few_positives, wilson
from wsi_screen.models import CONFIG_NAME, WEIGHTS_NAME, PatchClassifier, default_model_dir, load_model
from wsi_screen.models.card import CARD_NAME, read_card
from wsi_screen.models.spec import ModelSpec
from wsi_screen.screening import calibration, runfolder
from wsi_screen.screening.aggregate import AggregateConfig, describe
from wsi_screen.screening.outputs import left_out, read_labels, slide_grid, unmatched_labels, unmatched_words
from wsi_screen.screening.run import (
    SLIDE_RULE_JSON,
    calibrated_rule,
    fallback_rule,
    model_identity,
    warn_unmatched_labels,
)
from wsi_screen.slide.tables import few

log = logging.getLogger(__name__)

def small_set_warnings(n_positive: int, n_negative: int, min_specificity: float) -> list[str]:
    """What a calibration on this few slides cannot establish (empty when the set is large enough)."""
    # below 1 / (1 - specificity) negatives not one false positive is allowed, whatever the target (at 1: any n)
    needed = math.ceil(1.0 / (1.0 - min_specificity) - 1e-9) if min_specificity < 1 else 0
    found = []
    if n_negative < needed:
        low = wilson(n_negative, n_negative)[0]
        found.append(f"only {n_negative} negative slide(s): a specificity of {min_specificity:g} cannot be checked on "
                     f"fewer than {needed} (the threshold just clears the highest-scoring negative; {n_negative} of "
                     f"{n_negative} correct has a 95 % lower bound of {low:.2f})")
    small = few_positives(n_positive, "the rule is chosen by its sensitivity on them")
    return [*found, small] if small else found


#: what a calibrated copy's card adds to its source's name (then "N slides (RUN)")
RECALIBRATED = ", recalibrated on "

#: the rule's settings :func:`rule_changes` compares, in the order it lists them; ``region_threshold`` is listed as
#: ``call_patch_threshold`` (the same value: the foci's and the pictures' patch threshold); ``patch_threshold`` is
#: the model's own and never changes
RULE_SETTINGS = ("rule", "k", "radius", "slide_threshold", "call_patch_threshold", "min_focus_patches")


def rule_changes(old: AggregateConfig, new: AggregateConfig) -> list[tuple[str, Any, Any]]:
    """``(setting, old, new)`` for each of :data:`RULE_SETTINGS` whose value differs between ``old`` and ``new``."""
    before, after = old.to_json(), new.to_json()
    return [(name, before[name], after[name]) for name in RULE_SETTINGS if before[name] != after[name]]


@dataclass(frozen=True)
class Recalibration:
    model_dir: Path
    config: AggregateConfig
    doc: dict[str, Any]
    n_positive: int
    n_negative: int
    #: the source model's rule (its slide_rule.json, else the fallback rule) and where it comes from
    previous: AggregateConfig
    previous_source: str


def _run_model(run: Path) -> dict[str, Any]:
    """The model that scored ``run`` as its run.json records it (``path`` as usable from here, ``sha256``);
    empty when run.json does not say."""
    path = run / runfolder.RUN_JSON
    model = runfolder.read_json(path).get("model") if path.exists() else None
    if not isinstance(model, dict) or not model.get("path"):
        return {}
    return {**model, "path": runfolder.resolve_path(str(model["path"]), run)}


def _check_scored_by(run: Path, scored_by: dict[str, Any], source: Path, classifier: PatchClassifier) -> None:
    """Refuse a `model` other than the one that scored ``run``: its rule would be chosen on another model's
    scores. A run.json without the model's sha256 cannot say, and is taken on trust."""
    expected = scored_by.get("sha256")
    found = model_identity(source, classifier)["sha256"]
    if expected and found != expected:
        raise ConfigError(f"{source} did not score the run {run} (sha256 {found[:12]}; the run was scored by "
                          f"{scored_by.get('path')}, sha256 {str(expected)[:12]}); rerun `wsi-screen infer` with "
                          "this model, or leave `model` unset to calibrate the run's own")


def _restate_card(model_dir: Path, spec: ModelSpec, config: AggregateConfig, calibrated_on: dict[str, Any]) -> None:
    """The copy's card states the calibrated rule and threshold (``operating_point``), not its source's."""
    card = read_card(model_dir)
    if card is None:  # a model without a card: `models --card` says so, slide_rule.json holds the rule
        return
    patch_mm = (spec.mpp * spec.input_size / 1000.0) if spec.mpp and spec.input_size else None
    point = card.setdefault("operating_point", {})
    point["slide_rule"] = describe(config, str(spec.positive_class),
                                   patch_area_mm2=patch_mm * patch_mm if patch_mm else None)
    point["slide_threshold"] = config.slide_threshold
    point["slide_rule_calibrated_on"] = (f"{calibrated_on['n_slides']} labelled slides ({calibrated_on['n_positive']} "
                                         f"positive) of the run {calibrated_on['run']}")
    if isinstance(card.get("name"), str):  # the copy names itself as one (its weights and their sha256 are the same)
        card["name"] = (f"{card['name'].split(RECALIBRATED)[0]}{RECALIBRATED}{calibrated_on['n_slides']} slides "
                        f"({Path(calibrated_on['run']).name})")
    atomic_write_text(model_dir / CARD_NAME, json.dumps(card, indent=2, allow_nan=False, default=str) + "\n")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_bundled(out: str | Path, dest: Path) -> None:
    """The package's models folder is not written to (a calibrated copy there would replace the bundled model)."""
    bundled = default_model_dir().parent
    if _within(dest, bundled):
        raise ConfigError(f"{out} is in the package's bundled models ({bundled}); write the calibrated copy "
                          "elsewhere")


def check_destination(out: str | Path, dest: Path, *, run: Path, source: Path) -> None:
    """Refuse an existing folder ``dest`` (``out`` resolved) that the calibrated copy would replace but this command
    did not write: `overwrite` replaces only a model folder (its config.json and model.safetensors), never the run,
    the source model or a folder that holds either."""
    if not dest.exists():
        return
    for what, folder in (("the run", run.resolve()), ("the run's model folder", source.resolve())):
        if _within(folder, dest):
            held = "is" if folder == dest else "holds"
            raise ConfigError(f"{out} {held} {what} {folder}; write the calibrated copy elsewhere")
    if not dest.is_dir() or not all((dest / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        raise ConfigError(f"{out} is not a model folder (no {CONFIG_NAME} and {WEIGHTS_NAME}); `overwrite` replaces "
                          "only an earlier calibrated copy: choose another folder")


def refuse_no_separation(doc: dict[str, Any], n_positive: int, min_specificity: float) -> None:
    """Refuse to write a rule that separates nothing: the chosen candidate ranks the slides the wrong way round
    (AUC below 0.5) or detects none of the positives at ``min_specificity``. The labels look reversed when it, or
    the median candidate, has an AUC below 0.5."""
    row = doc["candidates"][doc["name"]]
    if row["auc"] >= 0.5 and row["sensitivity"] > 0:
        return
    aucs = sorted(c["auc"] for c in doc["candidates"].values())
    reversed_ = row["auc"] < 0.5 or aucs[len(aucs) // 2] < 0.5
    why = ("the rules rank the negatives above the positives: the labels look reversed (tumour and normal swapped?)"
           if reversed_ else "the model separates nothing at this specificity: check the labels, or lower "
           "`min_specificity`")
    raise ConfigError(f"calibration: the best rule, {doc['name']} (AUC {row['auc']:.3f}), detects "
                      f"{round(row['sensitivity'] * n_positive)} of the {n_positive} positive slide(s) at specificity "
                      f">= {min_specificity:g}; {why}; no model was written")


def recalibrate(run: str | Path, labels: str | Path, out: str | Path, *, model: str | Path | None = None,
                min_specificity: float = calibration.DEFAULT_MIN_SPECIFICITY,
                overwrite: bool = False) -> Recalibration:
    """Choose the slide rule on the labelled slides of ``run`` and write a model folder copy to ``out``."""
    run = Path(run)
    if not (run / runfolder.RESULTS_CSV).exists():
        raise RunError(f"{run}: not a run folder of `wsi-screen infer` (no {runfolder.RESULTS_CSV})")
    dest = Path(out).resolve()  # "." and "z/.." name a folder only once resolved
    refuse_bundled(out, dest)
    if dest.exists() and not overwrite:  # refused before any work, not after it
        raise ConfigError(f"{out} already exists; set `overwrite` or choose another folder")
    scored_by = _run_model(run)
    if model is None and not scored_by:
        raise RunError(f"{run}: run.json does not name the run's model; set `model`")
    source = Path(model) if model is not None else Path(scored_by["path"])
    check_destination(out, dest, run=run, source=source)
    classifier: PatchClassifier = load_model(source)
    if model is not None:
        _check_scored_by(run, scored_by, source, classifier)
    spec = classifier.spec
    truth = read_labels(Path(labels), classifier)
    if not truth:
        raise ConfigError(f"`labels`: {labels} has no rows (a header only?); give a slide,label row for each "
                          "labelled slide of the run")
    patch_threshold = spec.threshold if spec.threshold is not None else 0.5
    slides = []
    results = runfolder.read_results(run)
    names = {row["slide"] for row in results}
    if not any(name in truth for name in names):
        unmatched = unmatched_labels(truth, names)
        raise ConfigError(f"`labels`: none of its {len(unmatched)} row(s) names a slide of the run {run} (its slide "
                          f"column must hold the slide names of {runfolder.RESULTS_CSV}, e.g. {few(sorted(names))}): "
                          f"{few(unmatched_words(unmatched, names))}")
    warn_unmatched_labels(truth, names)
    unscored = sorted(row["slide"] for row in results if row.get("status") != "ok" and row["slide"] in truth)
    if unscored:
        log.warning("calibration: %s", left_out(unscored))
    for row in results:
        label = truth.get(row["slide"])
        if row.get("status") != "ok" or label is None:
            continue
        scores = runfolder.read_scores(runfolder.slide_dir(run, row["slide"]) / runfolder.SCORES_CSV)
        pos = scores.classes.index(str(spec.positive_class))
        grid = slide_grid(runfolder.read_slide(run, row["slide"]), scores.coords, scores.probs[:, pos])
        if grid is None:
            raise RunError(f"{run}/{row['slide']}: slide.json lacks the patch grid (stride, mpp); rerun infer")
        slides.append(calibration.labelled_slide(row["slide"], grid, label == "positive", patch_threshold))
    outside = sorted(row["slide"] for row in results if row.get("status") == "ok" and row["slide"] in truth
                     and row.get("out_of_domain") == "true")
    n_pos = sum(s.positive for s in slides)
    if n_pos == 0 or n_pos == len(slides):
        raise ConfigError(f"{run}: calibration needs labelled slides of both kinds among the scored ones; found "
                          f"{n_pos} positive and {len(slides) - n_pos} negative")
    found = calibrated_rule(source, patch_threshold)  # read before the copy is written
    previous, previous_source = (found[0], str(source / SLIDE_RULE_JSON)) if found is not None else \
        (fallback_rule(spec.threshold), f"the fallback rule ({source} has no {SLIDE_RULE_JSON})")
    config, doc = calibration.calibrate(slides, patch_threshold=patch_threshold, min_specificity=min_specificity,
                                        current=previous)
    doc["calibrated_on"] = {"run": str(run.resolve()), "labels": str(Path(labels).resolve()),
                            "n_slides": len(slides), "n_positive": n_pos, "source_model": str(source.resolve()),
                            "slides": [s.name for s in slides], "not_scored": unscored}
    refuse_no_separation(doc, n_pos, min_specificity)
    figures = calibration.report([s.scores[doc["name"]] for s in slides], [s.positive for s in slides],
                                 [s.size_class for s in slides], [s.n_patches for s in slides], config.slide_threshold)
    doc["on_calibration_slides"] = {k: figures[k] for k in ("auc", "auc_ci", "sensitivity", "specificity")}
    warnings = small_set_warnings(n_pos, len(slides) - n_pos, min_specificity)
    if outside:
        warnings.append(f"{len(outside)} of the {len(slides)} slides are out of the model's domain (most of their "
                        "patches are unlike its training data): their scores, and so the rule chosen on them, are "
                        f"not ones the model supports: {few(outside)}")
    if warnings:
        doc["warnings"] = [*warnings, "check the calibrated model on other labelled slides before screening with it"]
        for text in doc["warnings"]:
            log.warning("calibration: %s", text)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoint", ".*"))
        atomic_write_text(tmp / SLIDE_RULE_JSON, json.dumps(doc, indent=2) + "\n")
        _restate_card(tmp, spec, config, doc["calibrated_on"])
        fsync_tree(tmp)
        swap_in(tmp, dest)
    except OSError as exc:
        raise write_failed(out, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left behind by a failed write
    return Recalibration(model_dir=dest, config=config, doc=doc, n_positive=n_pos, n_negative=len(slides) - n_pos,
                         previous=previous, previous_source=previous_source)
