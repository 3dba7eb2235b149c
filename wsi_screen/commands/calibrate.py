"""``wsi-screen calibrate``: set a model's slide rule and threshold on a lab's own labelled slides."""

from __future__ import annotations

from typing import Any

import click

from wsi_screen.commands._options import common_options, configure_output


@click.command(short_help="Choose the slide rule on labelled slides of a run; write a calibrated model copy.")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="slides.csv with columns slide,label (the tumour class or normal) for the run's slides."
                   " Two rows naming one slide (a, a.svs) must agree.")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), metavar="MODEL_DIR",
              help="Where to write the calibrated copy of the run's model folder.")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None,
              help="The model the run was scored with (default: the one its run.json names); a model "
                   "other than the run's (another sha256 of weights and config) is refused.")
@click.option("--min-specificity", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True,
              help="Specificity the threshold must keep on the labelled negatives of every slide-size bin.")
@click.option("--overwrite", is_flag=True,
              help="Replace MODEL_DIR if it is a model folder (an earlier calibrated copy); never the run, its model "
                   "or a folder holding either. The package's bundled models are never written.")
@common_options
def calibrate(run: str, labels: str, out: str, model: str | None, min_specificity: float, overwrite: bool) -> None:
    """Choose the slide rule and threshold on the labelled slides of RUN (from `wsi-screen infer`).

    Every rule (mean, max, top-k, fraction, smoothed maximum, largest region) is scored on every labelled
    slide from the run's patch scores; the threshold of each is the one with the highest sensitivity that
    keeps --min-specificity on the negatives of every slide-size bin, and the rule with the highest
    sensitivity wins (then the higher AUC; a tie keeps the model's own rule where it is among the best, else
    takes the widest margin between the classes, and is said). The terminal shows every candidate (by rule,
    then its setting) and each setting of the rule that changed from the model's own (rule, k, radius,
    slide_threshold, call_patch_threshold: the foci's patch probability, min_focus_patches: the smallest focus,
    in patches). MODEL_DIR gets a copy of the model
    with that choice in slide_rule.json, stated in its card (`wsi-screen models --card MODEL_DIR`); screen with
    `wsi-screen infer SLIDES --model MODEL_DIR`. Choose on one set of slides and check on another: the chosen
    rule's sensitivity and specificity on these slides are printed as counts with 95 % intervals. Labels on which
    the best rule detects no positive slide, or ranks the negatives above the positives (reversed), write nothing.

    \b
    Example:
      wsi-screen infer lab-slides/ -o runs/lab
      wsi-screen calibrate runs/lab --labels lab-slides.csv -o models/lab-calibrated
      wsi-screen infer new-slides/ -o runs/new --model models/lab-calibrated
    """
    configure_output()
    from wsi_screen.screening.aggregate import AREA_UNIT
    from wsi_screen.screening.calibration import candidate_name, candidates
    from wsi_screen.screening.recalibrate import recalibrate, rule_changes
    from wsi_screen.slide.tables import few

    result = recalibrate(run, labels, out, model=model, min_specificity=min_specificity, overwrite=overwrite)
    table = result.doc["candidates"]
    chosen = result.doc["name"]
    click.echo(f"{'candidate':<12} {'AUC':>5}  {'threshold':>9}  {'sensitivity':>11}  {'specificity':>11}")
    for name in (c.name for c in candidates() if c.name in table):  # by rule, then its setting
        row = table[name]
        click.echo(f"{name:<12} {row['auc']:>5.3f}  {row['threshold']:>9.4g}  {row['sensitivity']:>11.3f}  "
                   f"{row['specificity']:>11.3f}{'  <- chosen' if name == chosen else ''}")
    c = result.config
    unit = f" {AREA_UNIT}" if c.rule == "region" else ""
    click.echo(f"\nchosen on {result.n_positive} positive and {result.n_negative} negative slides: "
               f"{chosen} score >= {c.slide_threshold:.4g}{unit}")
    click.echo(f"on these slides: {_figures(result.doc['on_calibration_slides'])}")
    if result.doc.get("tie"):
        kept = chosen == candidate_name(result.previous)
        click.echo(f"a tie: {len(result.doc['tie'])} candidates have the chosen one's sensitivity and AUC "
                   f"({few(result.doc['tie'])}); " + ("kept the model's own rule" if kept else
                                                      f"chose {chosen}, the widest margin between the classes"))
    changes = rule_changes(result.previous, c)
    click.echo(f"changed from {result.previous_source}:" if changes else
               f"no setting changed from {result.previous_source}")
    for setting, before, after in changes:
        click.echo(f"  {setting}: {_value(before)} -> {_value(after)}")
    click.echo(f"calibrated model: {result.model_dir} (wsi-screen infer SLIDES --model {result.model_dir})")


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _figures(figures: dict[str, Any]) -> str:
    """The chosen rule on its own calibration slides, as counts with 95 % intervals (a few slides say little)."""
    from wsi_screen.metrics import auc_words, count_words

    sens, spec = figures["sensitivity"], figures["specificity"]
    return (f"sensitivity {count_words(sens['detected'], sens['n'], sens['ci'])}, "
            f"specificity {count_words(spec['correct'], spec['n'], spec['ci'])}, "
            f"AUC {auc_words(figures['auc'], figures['auc_ci'])}")
