"""``wsi-screen train``: train a patch classifier on a labelled patch dataset."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from wsi_screen.commands._options import (
    common_options,
    configure_output,
    device_option,
    encoder_options,
    threads_option,
)
from wsi_screen.progress import duration

F = TypeVar("F", bound=Callable[..., Any])

STAINS = ("none", "macenko", "reinhard", "vahadane")


def dataset_options(func: F) -> F:
    """Options that say how to read a dataset folder (shared by train, tune and evaluate)."""
    options = [
        click.option("--label-column", default="label", show_default=True,
                     help="labels.csv column holding the class (e.g. binary_label)."),
        click.option("--split-column", default="split", show_default=True,
                     help="labels.csv column holding train/valid/test (optional in the file)."),
        click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True,
                     help="Threads decoding images (and DataLoader workers when streaming from disk)."),
        threads_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def training_options(*, with_encoder: bool) -> Callable[[F], F]:
    """Options shared by ``train`` and ``tune`` (everything except the searchable optimiser settings);
    ``with_encoder``: the command also has ``--encoder`` (which replaces ``--arch``), ``--weights``, ``--head`` and
    ``--embedding-cache``: a head trained on a frozen encoder's cached embeddings."""
    return functools.partial(_add_training_options, with_encoder=with_encoder)


def _add_training_options(func: F, *, with_encoder: bool) -> F:
    required = "Required unless --encoder is given." if with_encoder else "Required."
    options = [
        click.argument("dataset", type=click.Path(exists=True, file_okay=False)),
        click.option("--arch", default=None, metavar="NAME",
                     help=f"Architecture: screen_cnn32 or any timm name (see `wsi-screen models`). {required}"),
        click.option("--size", type=click.IntRange(8, 2048), default=None, metavar="PX",
                     help="Input edge in pixels; images are resized to it. Default: the architecture's fixed "
                          "size (screen_cnn32: 32), the --pretrained model's, else the images' own size."),
        click.option("--group-column", default=None, metavar="COL",
                     help="Column of patient/slide/source ids: a carved validation split keeps each group "
                          "on one side (use group_id for lc25000-colon)."),
        click.option("--positive", default=None, metavar="CLASS",
                     help="The positive (disease) class. Default for two classes: the one whose name says so "
                          "(tumour, abnormal, ..._aca, ...)."),
        click.option("--valid-fraction", type=click.FloatRange(0.01, 0.9), default=0.15, show_default=True,
                     help="Share of train carved (seeded, stratified) for validation if the dataset has no "
                          "valid split."),
        click.option("--carve-valid", is_flag=True,
                     help="Carve validation from train even if the dataset has a valid split, leaving that "
                          "split unused (held out for `wsi-screen evaluate --split valid`)."),
        click.option("--recipe", type=click.Choice(["auto", "small", "default"]), default="auto", show_default=True,
                     help="Training defaults. small: Adam at a constant 1e-3, no label smoothing, class weights or "
                          "colour/HED jitter, 60 epochs, no early stopping (best on a few hundred images); "
                          "default: the options' own defaults (suit tens of thousands of patches); auto: small "
                          "below 3,000 training images. Options you give always win; with another --optimizer, "
                          "that optimiser's own --lr and --weight-decay defaults apply."),
        click.option("--folds", type=click.IntRange(0, 20), default=0, show_default=True,
                     help="K-fold cross-validation: K models train in lockstep, the epoch and threshold are chosen "
                          "on their pooled out-of-fold predictions, and the model folder is their ensemble. 1: one "
                          "validation split; 0 (auto): 5 folds below 3,000 images (with >= 25 of every class), "
                          "else 1."),
        click.option("--epochs", type=click.IntRange(1, 1000), default=20, show_default=True,
                     help="Epochs (the small recipe trains 60 unless you give this)."),
        click.option("--patience", type=click.IntRange(0, 1000), default=8, show_default=True,
                     help="Stop after this many epochs without improvement on validation (0: never)."),
        click.option("--monitor", type=click.Choice(["auto", "auc", "balanced_accuracy", "accuracy", "loss"]),
                     default="auto", show_default=True,
                     help="Validation score that picks the best epoch (auto: AUC for two classes, else "
                          "balanced accuracy)."),
        click.option("--schedule", type=click.Choice(["cosine", "onecycle", "constant"]), default="cosine",
                     show_default=True, help="LR schedule (cosine and constant start with a linear warm-up)."),
        click.option("--warmup-epochs", type=click.FloatRange(0, 100), default=1.0, show_default=True,
                     help="Epochs of linear learning-rate warm-up before --schedule takes over (the small recipe: "
                          "0)."),
        click.option("--label-smoothing", type=click.FloatRange(0, 0.5), default=0.1, show_default=True,
                     help="Label smoothing of the cross-entropy loss (the small recipe: 0)."),
        click.option("--class-weights/--no-class-weights", default=True, show_default=True,
                     help="Weight the loss by inverse class frequency (for imbalanced data)."),
        click.option("--drop-rate", type=click.FloatRange(0, 0.9), default=0.0, show_default=True,
                     help="Dropout before the classifier."),
        click.option("--pretrained", type=click.Path(exists=True), default=None, metavar="WEIGHTS",
                     help="Local weights to start from: a model folder (a cross-validated one gives its first "
                          "fold model) or a .safetensors state dict (ours or timm's names). The classifier starts "
                          "fresh when the class list differs. Nothing is downloaded; pickle files are refused."),
        click.option("--freeze-backbone", is_flag=True,
                     help="Train only the classifier for --frozen-epochs, then fine-tune everything."),
        click.option("--frozen-epochs", type=click.IntRange(0, 1000), default=2, show_default=True,
                     help="Epochs that train only the classifier, with --freeze-backbone."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seeds the split, initialisation, shuffling and augmentation."),
        click.option("--mpp", type=float, default=None,
                     help="Microns per pixel of the training patches, 0.05-100 (overrides an mpp column; recorded at "
                          "the input size: x image px / --size when resized). Without it or a column, infer cannot "
                          "use the model on slides."),
        click.option("--stain", type=click.Choice(STAINS), default="none", show_default=True,
                     help="Stain normalisation the training patches already had (recorded for inference; "
                          "images are used as they are)."),
        click.option("--stain-target", default=None, metavar="TARGET",
                     help="Stain target used to normalise the training patches (recorded)."),
        click.option("--threshold-rule", default="sensitivity:0.95", show_default=True, metavar="RULE",
                     help="Operating point chosen on validation: sensitivity:X (highest specificity with "
                          "sensitivity >= X), specificity:X, youden or fixed:T."),
        click.option("--flips/--no-flips", default=True, show_default=True,
                     help="Random flips and 90-degree rotations."),
        click.option("--hed-jitter", type=click.FloatRange(0, 0.5), default=0.05, show_default=True,
                     help="HED stain augmentation strength (0: off)."),
        click.option("--color-jitter", type=click.FloatRange(0, 0.5), default=0.1, show_default=True,
                     help="Brightness/contrast/saturation jitter (0: off)."),
        click.option("--cache-limit", type=click.FloatRange(min=0), default=4096, show_default=True,
                     metavar="MB", help="Decode the dataset into memory up to this size, else stream from disk."),
        click.option("--compile", "compile_", is_flag=True,
                     help="torch.compile the model (pays off on long runs; needs a C compiler)."),
        click.option("--overwrite", is_flag=True, help="Replace a model already in the output folder."),
        device_option,
    ]
    if with_encoder:
        options += [
            encoder_options(required=False, what="Train only a head on this frozen encoder's embeddings (computed "
                            "once, cached; replaces --arch; docs/encoders.md)"),
            click.option("--head", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True,
                         help="The head trained on --encoder's embeddings (mlp: one hidden layer of 256); needs "
                              "--encoder."),
            click.option("--embedding-cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
                         help="Where --encoder's dataset embeddings are cached (default: "
                              "$WSI_SCREEN_CACHE/embeddings, else ~/.cache/wsi-screen/embeddings)."),
        ]
    func = dataset_options(func)
    for option in reversed(options):
        func = option(func)
    return func


def config_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Map the shared options onto :class:`wsi_screen.training.train.TrainConfig` keywords."""
    ctx = click.get_current_context()
    from wsi_screen.training.config import HEAD_ONLY

    # a head's setting (or `encoder_weights`) given without `encoder` is refused by TrainConfig in one line naming it
    misplaced = params.get("encoder_weights") or set(HEAD_ONLY) & set(explicit_options(ctx))
    if not params["arch"] and not params.get("encoder") and not misplaced:
        hint = " or --encoder (a frozen encoder to train a head on)" if "encoder" in params else ""
        raise click.UsageError(f"Missing option '--arch' (a network to train){hint}.")
    source = ctx.get_parameter_source("split_column")
    return {
        "arch": params["arch"] or "", "size": params["size"], "label_column": params["label_column"],
        "split_column": params["split_column"],
        "require_split_column": source is not None and source != click.core.ParameterSource.DEFAULT,
        "group_column": params["group_column"], "positive": params["positive"],
        "valid_fraction": params["valid_fraction"], "carve_valid": params["carve_valid"],
        "epochs": params["epochs"], "patience": params["patience"],
        "monitor": params["monitor"], "schedule": params["schedule"], "warmup_epochs": params["warmup_epochs"],
        "label_smoothing": params["label_smoothing"], "class_weights": params["class_weights"],
        "drop_rate": params["drop_rate"], "pretrained": params["pretrained"],
        "freeze_backbone": params["freeze_backbone"], "frozen_epochs": params["frozen_epochs"],
        "seed": params["seed"], "mpp": params["mpp"], "stain_method": params["stain"],
        "stain_target": params["stain_target"], "threshold_rule": params["threshold_rule"],
        "flips": params["flips"], "hed_jitter": params["hed_jitter"], "color_jitter": params["color_jitter"],
        "workers": params["workers"], "cache_limit_mb": params["cache_limit"], "compile": params["compile_"],
        "overwrite": params["overwrite"], "recipe": params["recipe"], "folds": params["folds"],
        "overrides": explicit_options(ctx), "device": params["device"],
        # a head on a frozen encoder (commands with `training_options(with_encoder=True)`)
        **{k: params[k] for k in ("encoder", "encoder_weights", "head", "embedding_cache") if k in params},
    }


#: TrainConfig fields whose option is named otherwise here
_OPTION_PARAMS = {"cache_limit_mb": "cache_limit", "compile": "compile_"}


def explicit_options(ctx: click.Context) -> tuple[str, ...]:
    """TrainConfig fields the user gave (command line, environment or --config file), of those a recipe may set
    (they win) and those that apply to one kind of training only (given for the other kind, they are refused).

    A setting of the other kind counts as given only on the command line: from the environment or a --config file
    (which may serve both kinds of training) it is left to TrainConfig, which refuses it only where it differs
    from its default, so a file that spells out the defaults (`flips` = true) does not stop a head's training."""
    from wsi_screen.training.config import HEAD_ONLY, NETWORK_ONLY
    from wsi_screen.training.recipes import RECIPES

    other_kind = NETWORK_ONLY if ctx.params.get("encoder") else HEAD_ONLY
    fields = sorted({k for recipe in RECIPES.values() for k in recipe} | {*NETWORK_ONLY, *HEAD_ONLY})
    given = []
    for name in fields:
        param = _OPTION_PARAMS.get(name, name)
        source = ctx.get_parameter_source(param) if param in ctx.params else None
        if source is None or source == click.core.ParameterSource.DEFAULT:
            continue
        if name in other_kind and source != click.core.ParameterSource.COMMANDLINE:
            continue
        given.append(name)
    return tuple(given)


#: at or below this many cores, the default is one compute thread (see bench/RESULTS.md, "Threads")
SMALL_MACHINE_CORES = 2


def default_threads(cores: int | None = None) -> int:
    """Torch compute threads when --threads is 0: 1 on small machines, else 0 (torch's own default)."""
    import os

    n = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count() or 1)
    return 1 if n <= SMALL_MACHINE_CORES else 0


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads: ``threads``, or :func:`default_threads` when 0."""
    threads = threads or default_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)


@click.command(short_help="Train a patch classifier on a labelled patch dataset.")
@training_options(with_encoder=True)
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), metavar="MODEL_DIR",
              help="Model folder to write (model.safetensors, config.json, history.csv, split.csv, valid/).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Training images per optimiser step.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="adamw", show_default=True,
              help="Optimiser (the small recipe: adam).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (default 1e-3 for adam/adamw, 0.01 for sgd; 1e-4 for a head on --encoder).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="Weight decay, not applied to biases and norms (default 0.05 adamw, 0 adam, 1e-4 sgd).")
@click.option("--restart", is_flag=True,
              help="Start over, ignoring the checkpoint an interrupted run left in MODEL_DIR (by default the "
                   "same command resumes a single-split run after its last finished epoch; cross-validated "
                   "runs always start over).")
@common_options
def train(**params: Any) -> None:
    """Train a classifier on DATASET and write MODEL_DIR.

    DATASET is a folder with labels.csv (columns path, label, optional split = train/valid/test and any
    others you select with --label-column / --group-column) or an ImageFolder tree (<class>/<image> or
    <split>/<class>/<image>). The test split is never used. Without a valid split, one is carved from
    train: seeded, stratified, and grouped by --group-column.

    A run with one validation split checkpoints its whole state in MODEL_DIR/checkpoint after every
    epoch: if it is killed, the same command resumes after the last finished epoch (--restart starts
    over). Cross-validated runs (--folds, by default below 3,000 images) are not checkpointed: they say
    so, and a rerun starts again at epoch 1 (--folds 1 trains one checkpointed model).

    On a CUDA GPU (--device auto finds one) training runs in mixed precision; validation stays float32.

    The best epoch on validation is kept; the decision threshold is chosen on validation by
    --threshold-rule; everything that defines the model (architecture, classes, input size, mpp, mean/std,
    stain, threshold, data fingerprint, metrics, resolved options) goes into MODEL_DIR/config.json.

    \b
    Examples:
      wsi-screen train herlev/ --arch screen_cnn32 --label-column binary_label -o models/herlev
      wsi-screen train pcam/ --arch resnet10t --epochs 30 --mpp 0.97 -o models/pcam
      wsi-screen train lc25000-colon/ --arch resnet18 --size 96 --group-column group_id -o models/colon
      wsi-screen train herlev/ --arch resnet10t --pretrained models/pcam --freeze-backbone -o models/tl
      wsi-screen train pcam/ --encoder default --head linear --mpp 0.972 -o models/probe
      wsi-screen train tiles/ --encoder uni --head mlp --mpp 0.5 -o models/uni-head

    With --encoder, only a head trains, on the encoder's embeddings of the train and valid images (computed
    once and cached, reused on reruns); the model folder names the encoder, which is loaded by that name
    wherever the model is used. Options only a whole network uses (--recipe small, --folds above 1,
    --pretrained, --freeze-backbone, --frozen-epochs, --flips, --hed-jitter, --color-jitter, --cache-limit,
    --compile) are refused with --encoder (from --config or the environment, only at other than their
    defaults).
    """
    configure_output()
    from wsi_screen._safe_write import usable_folder

    usable_folder(params["out"], "model folder", create=False)  # one line before torch loads and the data is read
    set_threads(params["threads"])
    from wsi_screen.models.device import resolve_device
    from wsi_screen.training.train import TrainConfig
    from wsi_screen.training.train import train as run_training

    resolve_device(params["device"])  # an absent GPU is one line before any data is read

    config = TrainConfig(**config_kwargs(params), batch_size=params["batch_size"],
                         optimizer=params["optimizer"], lr=params["lr"], weight_decay=params["weight_decay"],
                         restart=params["restart"])
    started = time.perf_counter()
    result = run_training(params["dataset"], params["out"], config)
    click.echo(f"{result.model_dir}: {', '.join(result_parts(result.spec, result.best_epoch, len(result.history)))}; "
               f"{duration(time.perf_counter() - started)} s in all ({duration(result.seconds)} s of training)")


def result_parts(spec: Any, best_epoch: int, epochs: int) -> list[str]:
    """What the training's summary line says: its figures named by what they were measured on (the validation
    split, or the pooled out-of-fold predictions of a cross-validated training) and, for the balanced accuracy,
    the decisions (at the chosen threshold; the epoch lines and history.csv give it at the arg-max)."""
    m = spec.metrics or {}
    on = "out-of-fold" if m.get("cross_validation") else "valid"
    at = " at the threshold" if spec.threshold is not None else ""
    parts = [f"best epoch {best_epoch} of {epochs}",
             f"{on} AUC {_num(m.get('auc'))}", f"balanced accuracy {_num(m.get('balanced_accuracy'))}{at}"]
    if spec.threshold is not None:
        parts.append(f"threshold {spec.threshold:.4f} for {spec.positive_class} ({on} sensitivity "
                     f"{_num(m.get('sensitivity'))}, specificity {_num(m.get('specificity'))})")
    return parts


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
