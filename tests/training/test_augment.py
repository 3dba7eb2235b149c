"""wsi_screen.training.augment: seeded histology augmentation that keeps geometry and background."""

from __future__ import annotations

import torch

from wsi_screen.training.augment import BatchAugment


def test_augmentation_is_seeded_and_keeps_geometry() -> None:
    batch = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    first = BatchAugment(generator=torch.Generator().manual_seed(3))(batch)
    second = BatchAugment(generator=torch.Generator().manual_seed(3))(batch)
    assert first.shape == (8, 3, 16, 16) and torch.equal(first, second)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    geometric = BatchAugment(hed=0, color=0, generator=torch.Generator().manual_seed(0))(batch)
    for img, out in zip(batch, geometric, strict=True):  # a rotation/flip keeps every pixel
        source = img.permute(2, 0, 1).float() / 255
        assert torch.equal(source.flatten(1).sort(1).values, out.flatten(1).sort(1).values)
    white = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    assert torch.equal(BatchAugment(color=0, generator=torch.Generator().manual_seed(0))(white),
                       torch.ones(2, 3, 8, 8))  # HED jitter leaves background alone


def test_dihedral_rotations_match_turning_each_image() -> None:
    """The batched rotation gives each image exactly the quarter turns drawn for it (the per-image loop's pixels)."""
    from wsi_screen.training.augment import _rotate_each

    batch = torch.rand(12, 3, 5, 5)
    turns = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 2, 0])
    expected = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(batch, turns, strict=True)])
    assert torch.equal(_rotate_each(batch, turns), expected)
    assert torch.equal(_rotate_each(batch, torch.zeros(12, dtype=torch.long)), batch)
