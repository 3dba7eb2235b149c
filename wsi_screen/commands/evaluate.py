"""``wsi-screen evaluate``: metrics and plots of a model on a labelled split."""

from __future__ import annotations

from typing import Any

import click

from wsi_screen.commands._options import common_options, configure_output, device_option, precision_option
from wsi_screen.commands.train import dataset_options, set_threads


@click.command(short_help="Evaluate a model on a labelled split (metrics.json, roc.png, confusion.png).")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_dir", type=click.Path(exists=True), default=None, metavar="MODEL_DIR",
              help="Model folder from `wsi-screen train` (default: the bundled model).")
@click.option("--split", default="test", show_default=True,
              help="Split to evaluate: test, valid, train or all (a dataset without splits is used whole).")
@click.option("--positive", default=None, metavar="CLASS",
              help="Class for sensitivity/specificity/AUC (default: the model's positive class). The decisions "
                   "stay the model's: a two-class model's other class is called where p(positive) < threshold, "
                   "and the outputs say so.")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), metavar="EVAL_DIR",
              help="Folder for metrics.json, predictions.csv, roc.png and confusion.png.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="Images per forward pass.")
@click.option("--overwrite", is_flag=True,
              help="Write into an EVAL_DIR that holds files, replacing an earlier evaluation's (by default such "
                   "a folder is refused, e.g. a model folder's valid/ report).")
@dataset_options
@precision_option("fp32")
@device_option
@common_options
def evaluate(dataset: str, model_dir: str | None, split: str, positive: str | None, out: str, batch_size: int,
             overwrite: bool, label_column: str, split_column: str, workers: int, threads: int, precision: str,
             device: str) -> None:
    """Score a split of DATASET with a model and write EVAL_DIR.

    Decisions use the model's own operating point (the threshold chosen on validation when it was
    trained); metrics come from scikit-learn: accuracy, balanced accuracy, precision, recall, F1, AUC,
    sensitivity and specificity, the confusion matrix and a per-class report with macro averages. AUC,
    sensitivity and specificity come with 95 % intervals (bootstrap; Wilson).
    Images of another size than the model input are resized, with a warning.

    Evaluating images that trained the model (its split.csv says which; under cross-validation the
    dataset's valid split as well as train), or its validation images, which chose its epoch and threshold,
    gives optimistic figures: a warning says how many.

    If --label-column is not given and DATASET has the column the model was trained on, that column is
    used.

    \b
    Examples:
      wsi-screen evaluate herlev/ --model models/herlev -o eval/herlev
      wsi-screen evaluate pcam/ --model models/pcam --split valid -o eval/pcam
    """
    configure_output()
    set_threads(threads)
    import logging

    from wsi_screen.models import load_model
    from wsi_screen.training.data import open_patch_folder
    from wsi_screen.training.evaluate import evaluate_model

    log = logging.getLogger("wsi_screen.training.evaluate")
    model = load_model(model_dir, precision=precision, device=device)
    ctx = click.get_current_context()
    trained_on = model.spec.data.get("label_column")
    if ctx.get_parameter_source("label_column") == click.core.ParameterSource.DEFAULT and trained_on \
            and trained_on != label_column and _has_column(dataset, trained_on):
        log.info("using label column %r, the one the model was trained on", trained_on)
        label_column = trained_on
    explicit_split = ctx.get_parameter_source("split_column") != click.core.ParameterSource.DEFAULT
    folder = open_patch_folder(dataset, label_column=label_column, split_column=split_column,
                               require_split_column=explicit_split)
    metrics = evaluate_model(model, folder, split, out, positive=positive, batch_size=batch_size,
                             workers=max(1, workers), overwrite=overwrite)
    click.echo(format_summary(metrics, out))


def _has_column(dataset: str, column: str) -> bool:
    import csv
    from pathlib import Path

    path = Path(dataset) / "labels.csv"
    if not path.is_file():
        return False
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return column in (next(csv.reader(fh), None) or [])


def format_summary(metrics: dict[str, Any], out: str) -> str:
    """A short table of the headline metrics."""
    keys = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity")
    from wsi_screen.metrics import call_rule

    head = f"{metrics['n']} images; positive class {metrics.get('positive_class') or 'n/a'}; "
    if metrics.get("positive_class") != metrics.get("decision_class") and metrics.get("positive_class"):
        head += f"called where {call_rule(metrics, '.4f')} (the model's operating point)"
    else:
        head += f"threshold {'n/a' if metrics.get('threshold') is None else format(metrics['threshold'], '.4f')}"
    lines = [head]
    for key in keys:
        value, ci = metrics.get(key), metrics.get(f"{key}_ci95")
        interval = f"  (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci and value is not None else ""
        lines.append(f"  {key:<18} {'n/a' if value is None else format(value, '.4f')}{interval}")
    domain = metrics.get("domain")
    if domain:
        lines.append(f"  {'out of domain':<18} {domain['flagged_fraction']:.4f} ({domain['flagged']} images with "
                     f"domain distance > {domain['threshold']:.3f})")
    lines.append(f"written to {out}/ (metrics.json, predictions.csv, roc.png, confusion.png)")
    return "\n".join(lines)
