"""Hyper-parameter search: a grid (or a seeded random subset of it), chosen on validation only.

The dataset is read, split and decoded once; every trial trains with the same split and seed, so trials
differ only in their settings. With ``encoder`` (a head on a frozen encoder, as ``train`` trains one), the
encoder embeds the train and valid images once (the cache ``train`` uses, :mod:`wsi_screen.training.embeddings`)
and every trial trains only the head on those embeddings (``tune.json``'s ``embeddings`` records that pass once;
each trial's ``seconds`` and ``config.json`` leave it out). Each trial writes a model folder under
``TUNE_DIR/trials/NNN``; the best by the validation monitor (ties: the earlier trial) is copied to
``TUNE_DIR/best``. ``trials.csv`` is the table of trials and ``tune.json`` the search and its choice. The test
split is never read. A search does not resume: interrupted, it says that a rerun needs ``overwrite``
(:data:`NOT_RESUMED`).
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wsi_screen._safe_write import atomic_write_text
from wsi_screen.errors import ConfigError
from wsi_screen.models.spec import WEIGHTS_NAME
from wsi_screen.training.heads import fit_head, for_head, prepare_head_data
from wsi_screen.training.train import TrainConfig, TrainResult, fit, for_data, prepare_data

log = logging.getLogger(__name__)

#: what an interrupted search leaves: nothing to resume (a note on its KeyboardInterrupt, which the CLI prints)
NOT_RESUMED = "a search does not resume: rerun with `overwrite` to start it again"

#: settings a search may vary (they do not change how the data are prepared)
SEARCHABLE = ("lr", "batch_size", "optimizer", "weight_decay", "label_smoothing", "drop_rate", "epochs",
              "schedule", "hed_jitter", "color_jitter")


@dataclass(frozen=True)
class Trial:
    """One trained setting and how it scored on validation."""

    index: int
    params: dict[str, Any]
    model_dir: Path
    best_epoch: int
    score: float
    metrics: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class TuneResult:
    trials: list[Trial]
    best: Trial
    best_dir: Path
    monitor: str


def expand(space: dict[str, list[Any]], *, search: str = "grid", trials: int | None = None,
           seed: int = 0) -> list[dict[str, Any]]:
    """The settings to try: every combination (grid), or ``trials`` of them drawn without replacement."""
    unknown = sorted(set(space) - set(SEARCHABLE))
    if unknown:
        raise ConfigError(f"cannot search over {', '.join(unknown)} (searchable: {', '.join(SEARCHABLE)})")
    empty = [k for k, v in space.items() if not v]
    if empty:
        raise ConfigError(f"no values given for {', '.join(empty)}")
    keys = list(space)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(space[k] for k in keys))]
    if search == "grid":
        return combos
    if search != "random":
        raise ConfigError(f"search {search!r} is not grid or random")
    n = len(combos) if trials is None else min(trials, len(combos))
    return random.Random(seed).sample(combos, n)


def tune(dataset: str | Path, out_dir: str | Path, base: TrainConfig, space: Mapping[str, list[Any] | None], *,
         search: str = "grid", trials: int | None = None, keep_weights: bool = False) -> TuneResult:
    """Train every setting of the search on the dataset's train split and keep the best on validation.

    A setting of ``space`` given as None is not searched: every trial takes ``base``'s value once the recipe is
    resolved for the data, as ``train`` would (``optimizer`` None: adam under the small recipe), and the table
    shows it (``lr`` None: each optimiser's own)."""
    out = Path(out_dir)
    expand({k: [None] if v is None else v for k, v in space.items()}, search=search, trials=trials,
           seed=base.seed)  # a bad space is refused before the data are read
    for key, values in space.items():  # and so is a value train would refuse (TrainConfig's checks), before trial 1
        for value in values or ():
            replace(base, **{key: value})
    if (out / "trials.csv").exists() and not base.overwrite:
        raise ConfigError(f"{out} already holds a search; set `overwrite` or choose another output folder")
    for name in ("trials", "best"):
        if base.overwrite and (out / name).exists():
            shutil.rmtree(out / name)
    searched = tuple(k for k, v in space.items() if v is not None and k not in base.overrides)
    base = replace(base, overrides=(*base.overrides, *searched))  # the recipe never sets them
    trainer: Callable[[TrainConfig, Path], TrainResult]
    embeddings: dict[str, Any] | None = None
    if base.encoder is not None:  # a head: the embeddings are made (or read from the cache) once, for every trial
        base = for_head(base)
        head_data = prepare_head_data(dataset, base)
        embeddings = replace(head_data, shared=False).embedding_record()  # the pass, recorded once: tune.json
        trainer = functools.partial(fit_head, replace(head_data, shared=True))
    else:
        data = prepare_data(dataset, base)
        base = for_data(base, data)
        trainer = functools.partial(fit, data)
    settings = expand({k: [getattr(base, k)] if v is None else v for k, v in space.items()}, search=search,
                      trials=trials, seed=base.seed)
    log.info("%d trials (%s search over %s)", len(settings), search,
             ", ".join(k for k, v in space.items() if v is not None) or "nothing")
    done: list[Trial] = []
    for index, params in enumerate(settings, start=1):
        config = replace(base, **params)
        params = {k: _resolved(config, k) for k in params}
        trial_dir = out / "trials" / f"{index:03d}"
        log.info("trial %d/%d: %s", index, len(settings), _describe(params))
        started = time.perf_counter()
        try:
            result = trainer(config, trial_dir)
        except KeyboardInterrupt as exc:
            exc.add_note(NOT_RESUMED)
            raise
        done.append(Trial(index=index, params=params, model_dir=trial_dir, best_epoch=result.best_epoch,
                          score=result.best_score, metrics=result.spec.metrics,
                          seconds=time.perf_counter() - started))
        _write_table(out / "trials.csv", done)
    best = max(done, key=lambda t: (t.score if not math.isnan(t.score) else -math.inf, -t.index))
    best_dir = out / "best"
    shutil.copytree(best.model_dir, best_dir)
    if not keep_weights:
        for t in done:
            if t is not best:
                (t.model_dir / WEIGHTS_NAME).unlink(missing_ok=True)
    monitor = str(best.metrics.get("monitor", ""))
    # every searchable setting, null where not searched (its value per trial is in trials.csv)
    recorded = {k: space.get(k) for k in SEARCHABLE}
    summary = {"dataset": str(dataset), "search": search, "space": recorded, "monitor": monitor,
               "trials": len(done), "best_trial": best.index, "best_params": best.params,
               "best_score": best.score, "best_dir": str(best_dir), "test_split_used": False}
    if embeddings is not None:  # the shared embedding pass (each trial's seconds and config.json leave it out)
        summary["embeddings"] = embeddings
    atomic_write_text(out / "tune.json", json.dumps(summary, indent=2, default=str) + "\n")
    log.info("best: trial %d (%s) with validation %s %.4f", best.index, _describe(best.params), monitor,
             best.score)
    return TuneResult(trials=done, best=best, best_dir=best_dir, monitor=monitor)


def _resolved(config: TrainConfig, key: str) -> Any:
    """``config``'s value of a searched setting as the trial trains with it (``lr`` None: the optimiser's own)."""
    return {"lr": config.resolved_lr, "weight_decay": config.resolved_weight_decay}.get(key, getattr(config, key))


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _write_table(path: Path, trials: list[Trial]) -> None:
    keys = list(trials[0].params)
    columns = ["trial", *keys, "best_epoch", "monitor", "score", "valid_auc", "valid_balanced_accuracy",
               "valid_sensitivity", "valid_specificity", "seconds", "model_dir"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for t in trials:
            m = t.metrics
            writer.writerow([t.index, *[t.params[k] for k in keys], t.best_epoch, m.get("monitor"),
                             f"{t.score:.4f}", _fmt(m.get("auc")), _fmt(m.get("balanced_accuracy")),
                             _fmt(m.get("sensitivity")), _fmt(m.get("specificity")), f"{t.seconds:.1f}",
                             t.model_dir.as_posix()])


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"
