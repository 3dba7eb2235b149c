"""Training recipes: defaults that suit the data.

The defaults that suit PatchCamelyon-sized data (tens of thousands of patches: AdamW with a cosine schedule,
label smoothing, class weights, HED and colour jitter, early stopping) cost a small CNN on a few hundred
images 0.05-0.2 test AUC and make it swing with the seed (docs/classifier.md, "Small datasets"). ``train``
therefore picks a recipe from the data it sees:

* ``small`` (fewer than :data:`SMALL_DATASET` training images): Adam at a constant 1e-3, no label
  smoothing, no class weights, flips and 90-degree rotations only, 60 epochs without early stopping (a few
  hundred images give few steps per epoch; the epoch is chosen on validation, or on the pooled out-of-fold
  predictions with ``folds``);
* ``default``: the options' own defaults.

``recipe`` ``small`` or ``default`` names one; ``auto`` (the CLI's default) chooses. A setting given explicitly
(``overrides``) always wins over the recipe. A recipe's learning rate and weight decay belong to its optimiser
(:data:`WITH_OPTIMIZER`): where ``optimizer`` is given, they are not applied either, and the optimiser's own
defaults (``DEFAULT_LR``, ``DEFAULT_WEIGHT_DECAY`` of :mod:`wsi_screen.training.config`) hold unless ``lr`` /
``weight_decay`` are given too (``small`` with SGD: 0.01 and 1e-4, as with ``default``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from wsi_screen.errors import ConfigError

#: below this many training images, ``auto`` picks the ``small`` recipe (and ``folds`` 0, auto, picks 5)
SMALL_DATASET = 3000
#: what each recipe sets (fields of :class:`wsi_screen.training.train.TrainConfig`)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "small": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0.0,
              "label_smoothing": 0.0, "class_weights": False, "hed_jitter": 0.0, "color_jitter": 0.0,
              "patience": 0, "epochs": 60},
}
CHOICES = ("auto", *RECIPES)
#: a recipe's settings that are tuned to its optimiser: they go where the user names another
WITH_OPTIMIZER = ("lr", "weight_decay")


def choose(name: str, n_train: int) -> str:
    """The recipe ``name`` stands for with ``n_train`` training images."""
    if name == "auto":
        return "small" if n_train < SMALL_DATASET else "default"
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r} is not one of {', '.join(CHOICES)}")
    return name


def apply(config: Any, n_train: int) -> Any:
    """``config`` (a TrainConfig) with its recipe resolved and applied, except to the fields in
    ``config.overrides`` (set explicitly by the user) and, where ``optimizer`` is one of them, to
    :data:`WITH_OPTIMIZER`."""
    name = choose(config.recipe, n_train)
    kept = set(config.overrides) | (set(WITH_OPTIMIZER) if "optimizer" in config.overrides else set())
    changes = {k: v for k, v in RECIPES[name].items() if k not in kept}
    return replace(config, recipe=name, **changes)
