"""wsi_screen.training.data: labelled patch datasets read, validated and split honestly (groups never straddle)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tests.classifier_data import read_rows, tiny_config, write_rows
from wsi_screen.errors import DatasetError
from wsi_screen.training.data import (
    PatchFolder,
    carve_validation,
    group_leaks,
    image_sizes,
    load_images,
    make_split,
    open_patch_folder,
)
from wsi_screen.training.train import train


def test_real_datasets_open(patches_dir: Path) -> None:
    herlev = open_patch_folder(patches_dir / "herlev", label_column="binary_label")
    assert len(herlev) == 917 and herlev.classes == ["abnormal", "normal"]
    assert Counter(herlev.splits or ()) == {"train": 716, "test": 201}
    crc = open_patch_folder(patches_dir / "crc-7class-sample")
    assert crc.splits is None and len(crc.classes) == 7  # an all-empty split column means unsplit
    nct = open_patch_folder(patches_dir / "nct-crc-9class-sample")
    assert len(nct) == 9 and len(nct.indices("test")) == 9


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rows: [{k: v for k, v in r.items() if k != "binary_label"} for r in rows], "no column 'binary_label'"),
    (lambda rows: [{**r, "binary_label": ""} for r in rows], "empty 'binary_label'"),
    (lambda rows: [{**r, "split": "holdout"} for r in rows], "unknown 'split' values 'holdout'"),
    (lambda rows: [{**r, "path": "missing/" + r["path"]} for r in rows], "do not exist"),
    (lambda rows: [{**r, "split": ""} if i == 0 else r for i, r in enumerate(rows)], "no 'split' value"),
])
def test_malformed_labels_csv(herlev_small: Path, tmp_path: Path, edit: object, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(herlev_small, broken)
    rows = edit(read_rows(broken))  # type: ignore[operator]
    write_rows(broken, rows)
    with pytest.raises(DatasetError, match=message):
        open_patch_folder(broken, label_column="binary_label")


def test_missing_group_and_split_columns(herlev_small: Path) -> None:
    with pytest.raises(DatasetError, match="no column 'patient' for `group_column`"):
        open_patch_folder(herlev_small, group_column="patient")
    with pytest.raises(DatasetError, match="for `split_column`"):
        open_patch_folder(herlev_small, split_column="fold", require_split_column=True)
    assert open_patch_folder(herlev_small, split_column="fold").splits is None


def test_unreadable_image(herlev_small: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(herlev_small, broken)
    victim = broken / read_rows(broken)[0]["path"]
    victim.write_bytes(b"\xff\xd8\xff truncated")
    folder = open_patch_folder(broken, label_column="binary_label")
    with pytest.raises(DatasetError, match=f"{victim.name}: unreadable image .*; fix or remove it from the dataset$"):
        load_images(folder, range(len(folder)), 32)
    victim.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=f"{victim.name}: unreadable image .*; fix or remove it from the dataset$"):
        image_sizes(folder, range(len(folder)))


def test_image_folder_layouts(herlev_small: Path, tmp_path: Path) -> None:
    rows = read_rows(herlev_small)
    for row in rows:  # <split>/<class>/<image>, as herlev is laid out
        target = tmp_path / "by_split" / row["split"] / row["binary_label"] / Path(row["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(herlev_small / row["path"], target)
    folder = open_patch_folder(tmp_path / "by_split")
    assert folder.layout == "split/class folders" and folder.classes == ["abnormal", "normal"]
    assert Counter(folder.splits or ()) == {"train": 48, "test": 12}
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "by_split" / "train", flat)
    folder = open_patch_folder(flat)
    assert folder.layout == "class folders" and folder.splits is None and len(folder) == 48
    with pytest.raises(DatasetError, match="need one"):
        open_patch_folder(flat, label_column="binary_label")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"neither labels\.csv nor class folders"):
        open_patch_folder(tmp_path / "empty")


def test_lc25000_group_split_never_leaks(patches_dir: Path) -> None:
    folder = open_patch_folder(patches_dir / "lc25000-colon", group_column="group_id", check_files=False)
    assert not group_leaks(folder)  # the dataset's own train/test split is grouped
    split = make_split(folder, seed=0)
    assert split.source == "carved"
    groups = np.asarray(folder.groups)
    assert not set(groups[split.train]) & set(groups[split.valid])
    assert not set(split.valid) & set(folder.indices("test"))  # test is never touched
    assert 0.1 < len(split.valid) / (len(split.train) + len(split.valid)) < 0.2
    assert set(np.asarray(folder.labels)[split.valid]) == {"colon_aca", "colon_n"}
    again = make_split(folder, seed=0)
    np.testing.assert_array_equal(split.valid, again.valid)
    assert not np.array_equal(split.valid, make_split(folder, seed=1).valid)
    # without the group column the same rows would leak copies of one photo into validation
    ungrouped = make_split(open_patch_folder(patches_dir / "lc25000-colon", check_files=False), seed=0)
    assert set(groups[ungrouped.train]) & set(groups[ungrouped.valid])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30)), min_size=30, max_size=120), st.integers(0, 99))
def test_grouped_carving_never_leaks(rows: list[tuple[int, int]], seed: int) -> None:
    labels = [f"c{label}" for label, _ in rows]
    groups = [f"g{group}" for _, group in rows]
    folder = PatchFolder(root=Path(), paths=tuple(f"{i}.png" for i in range(len(rows))), labels=tuple(labels),
                         groups=tuple(groups), group_column="g")
    if len(set(labels)) < 2 or len(set(groups)) < 7:
        return
    train, valid = carve_validation(folder, np.arange(len(rows)), valid_fraction=0.15, seed=seed)
    assert not {groups[i] for i in train} & {groups[i] for i in valid}
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(len(rows)))


def test_stratified_carving_and_dataset_valid(patches_dir: Path) -> None:
    herlev = open_patch_folder(patches_dir / "herlev", label_column="binary_label", check_files=False)
    split = make_split(herlev, seed=0)
    labels = np.asarray(herlev.labels)
    share = lambda rows: (labels[rows] == "abnormal").mean()  # noqa: E731
    assert abs(share(split.train) - share(split.valid)) < 0.02
    assert not set(split.train) & set(herlev.indices("test"))
    pcam = open_patch_folder(patches_dir / "pcam", check_files=False)
    own = make_split(pcam)
    assert own.source == "dataset" and len(own.valid) == 3000  # PCam valid: 1,500 + 1,500
    carved = make_split(pcam, carve_valid=True)
    assert carved.source == "carved" and not set(carved.valid) & set(pcam.indices("valid"))


def test_streaming_from_disk_matches_in_memory(herlev_small: Path, tmp_path: Path) -> None:
    memory = train(herlev_small, tmp_path / "memory", tiny_config(epochs=1, workers=0))
    stream = train(herlev_small, tmp_path / "stream", tiny_config(epochs=1, workers=0, cache_limit_mb=0.01))
    a = load_file(str(memory.model_dir / "model.safetensors"))
    b = load_file(str(stream.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_source_reports_and_moves_its_in_memory_images() -> None:
    """What training moves to a GPU once (wsi_screen.training.loop): in-memory images, never a stream."""
    import torch

    from wsi_screen.training.data import BatchSource

    images = torch.arange(4 * 2 * 2 * 3, dtype=torch.uint8).reshape(4, 2, 2, 3)
    source = BatchSource(np.array([0, 1, 0, 1]), images=images)
    assert source.nbytes == 48
    source.to(torch.device("cpu"))
    xb, yb = next(source.batches(2, order=torch.tensor([3, 1, 2, 0])))
    assert torch.equal(xb, images[[3, 1]]) and yb.tolist() == [1, 1]
