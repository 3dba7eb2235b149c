"""Small real datasets for the classifier tests, cut from ../shared/data/patches (copied into tmp folders)."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path

from wsi_screen.training.train import TrainConfig


def read_rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(dataset: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> None:
    dataset.mkdir(parents=True, exist_ok=True)
    columns = columns or list(rows[0])
    with (dataset / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make_subset(source: Path, dest: Path, per_class_split: dict[str, int], *, label_column: str = "label",
                columns: list[str] | None = None) -> Path:
    """Copy the first N images of every (split, label) of ``source`` into ``dest`` with a new labels.csv."""
    picked: list[dict[str, str]] = []
    taken: dict[tuple[str, str], int] = defaultdict(int)
    for row in read_rows(source):
        key = (row.get("split", ""), row[label_column])
        if taken[key] < per_class_split.get(key[0], 0):
            taken[key] += 1
            picked.append(row)
    for row in picked:
        target = dest / row["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / row["path"], target)
    write_rows(dest, picked, columns)
    return dest


def tiny_config(**changes: object) -> TrainConfig:
    """A fast screen_cnn32 configuration for tests."""
    base: dict[str, object] = {"arch": "screen_cnn32", "label_column": "binary_label", "epochs": 2,
                               "batch_size": 16, "seed": 0, "workers": 1}
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]
