"""``wsi-screen tune``: grid or random search over training settings, chosen on validation."""

from __future__ import annotations

import math
from typing import Any

import click

from wsi_screen.commands._options import common_options, configure_output, parse_float_list
from wsi_screen.commands.train import config_kwargs, set_threads, training_options
from wsi_screen.progress import duration


def _choices(text: str, allowed: tuple[str, ...], name: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise click.BadParameter(f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}",
                                 param_hint=name)
    return values


def _ints(text: str, name: str) -> list[int]:
    values = parse_float_list(text, name)
    if any(not math.isfinite(v) or v != int(v) or v < 1 for v in values):
        raise click.BadParameter(f"expected positive integers, got {text!r}", param_hint=name)
    return [int(v) for v in values]


@click.command(short_help="Search training settings on validation; keep the best model.")
@training_options(with_encoder=True)
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), metavar="TUNE_DIR",
              help="Folder for trials.csv, tune.json, trials/NNN/ and best/ (the chosen model).")
@click.option("--lr", "lrs", default=None, metavar="LIST",
              help="Learning rates to try, comma-separated (e.g. 1e-3,3e-4; default: as for train, the recipe's, "
                   "else each optimiser's own; with --optimizer given, each optimiser's own; a head's on --encoder: "
                   "1e-4).")
@click.option("--batch-size", "batch_sizes", default=None, metavar="LIST",
              help="Batch sizes to try (e.g. 32,64; default: not searched, 64 as for train).")
@click.option("--optimizer", "optimizers", default=None, metavar="LIST",
              help="Optimisers to try: sgd, adam, adamw (e.g. sgd,adam; default: as for train, the recipe's: adam "
                   "below 3,000 training images, else adamw).")
@click.option("--weight-decay", "weight_decays", default=None, metavar="LIST",
              help="Weight decays to try (default: as for --lr, the recipe's, else each optimiser's own; with "
                   "--optimizer given, each optimiser's own).")
@click.option("--search", type=click.Choice(["grid", "random"]), default="grid", show_default=True,
              help="Every combination, or --trials of them drawn at random (seeded).")
@click.option("--trials", type=click.IntRange(1, 10000), default=None,
              help="Number of random-search trials (default: all combinations).")
@click.option("--keep-weights", is_flag=True, help="Keep every trial's weights (default: only the best's).")
@common_options
def tune(**params: Any) -> None:
    """Train one model per setting on DATASET's train split, choose on validation, write TUNE_DIR.

    Every trial uses the same split, seed and data; only the searched settings differ. The trial with the
    best validation score (--monitor; AUC for two classes) is copied to TUNE_DIR/best, a model folder
    like `wsi-screen train` writes. The test split is never used. All other options are as for train.

    With --encoder (and --head linear or mlp), as for train, every trial trains only a head on the encoder's
    embeddings of the train and valid images: they are computed once, in the cache train uses
    (--embedding-cache), and every trial (and a later train or tune of the same data and encoder) reads them
    from it; tune.json's "embeddings" records that pass (its seconds) once, and each trial's seconds and
    config.json leave it out. --lr defaults to the head's 1e-4.

    \b
    Examples:
      wsi-screen tune herlev/ --arch screen_cnn32 --label-column binary_label \\
          --lr 1e-3,3e-4 --batch-size 32,64 --optimizer sgd,adam -o tune/herlev
      wsi-screen tune pcam/ --encoder default --head mlp --mpp 0.972 --lr 1e-4,1e-3 -o tune/probe
    """
    configure_output()
    from wsi_screen._safe_write import usable_folder

    usable_folder(params["out"], "tuning folder", create=False)  # one line before torch loads and the data is read
    set_threads(params["threads"])
    from wsi_screen.models.device import resolve_device
    from wsi_screen.training.train import TrainConfig
    from wsi_screen.training.tune import tune as run_search

    resolve_device(params["device"])  # an absent GPU is one line before any data is read

    space: dict[str, list[Any] | None] = {  # None: not searched, the recipe's value (as train resolves it)
        "lr": parse_float_list(params["lrs"], "--lr") if params["lrs"] is not None else None,
        "batch_size": _ints(params["batch_sizes"], "--batch-size") if params["batch_sizes"] is not None else None,
        "optimizer": _choices(params["optimizers"], ("sgd", "adam", "adamw"), "--optimizer")
        if params["optimizers"] is not None else None,
        "weight_decay": parse_float_list(params["weight_decays"], "--weight-decay")
        if params["weight_decays"] is not None else None,
    }
    base = TrainConfig(**config_kwargs(params))
    result = run_search(params["dataset"], params["out"], base, space, search=params["search"],
                        trials=params["trials"], keep_weights=params["keep_weights"])
    keys = list(space)
    click.echo("\t".join(["trial", *keys, "best_epoch", result.monitor, "seconds"]))
    for t in result.trials:
        mark = "  <- best" if t is result.best else ""
        click.echo("\t".join([str(t.index), *[str(t.params[k]) for k in keys], str(t.best_epoch),
                              f"{t.score:.4f}", duration(t.seconds)]) + mark)
    click.echo(f"best model: {result.best_dir}")
