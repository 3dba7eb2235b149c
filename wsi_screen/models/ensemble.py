"""A cross-validated model: the fold models as one module (see :mod:`wsi_screen.training.cross_validation`)."""

from __future__ import annotations

import torch
from torch import nn


class Ensemble(nn.Module):
    """Members whose class probabilities are averaged; returns log-probabilities (so softmax gives the mean)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-12).log()

    def get_classifier(self) -> nn.Module:
        """The first member's classifier layer (its penultimate features feed the domain distance)."""
        head: nn.Module = self.members[0].get_classifier()  # type: ignore[operator]
        return head
