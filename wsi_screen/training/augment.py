"""Training-time augmentation of histology batches: dihedral flips/rotations, HED stain jitter, colour jitter.

Seeded by the generator it is given, so a training run is reproducible under its seed. The random numbers are
drawn on the CPU (the generator's device) whatever device the batch is on, so a batch on a GPU is augmented
there with the same draws.
"""

from __future__ import annotations

import math

import torch

from wsi_screen.models.pixels import to_unit_float

#: stain vectors of haematoxylin, eosin and DAB (Ruifrok & Johnston, as in scikit-image's rgb_from_hed)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
                             dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED).float()
_LOG_ADJUST = math.log(1e-6)


def _rotate_each(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Image ``i`` of an NCHW batch turned by ``turns[i]`` quarter turns: one rotation per turn count, not one per
    image (four kernel launches on a GPU instead of a batch's worth)."""
    out = x.clone()
    for k in (1, 2, 3):
        chosen = turns == k
        if bool(chosen.any()):
            out[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return out


class BatchAugment:
    """Histology augmentation on a uint8 NHWC batch, returning float NCHW in [0, 1].

    Per image: a random element of the dihedral group (horizontal flip x 90-degree rotation; square
    patches have no up), HED stain jitter (each stain's optical density scaled by U(1-s, 1+s) and shifted
    by U(-s, s), Tellez et al. 2018) and brightness, contrast and saturation jitter of +-``color``.
    """

    def __init__(self, *, flips: bool = True, hed: float = 0.05, color: float = 0.1,
                 generator: torch.Generator | None = None) -> None:
        self.flips, self.hed, self.color = flips, hed, color
        self.generator = generator

    def _uniform(self, shape: tuple[int, ...], low: float, high: float, device: torch.device) -> torch.Tensor:
        return (torch.rand(shape, generator=self.generator) * (high - low) + low).to(device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(batch)
        n, device = x.shape[0], x.device
        if self.flips and x.shape[2] == x.shape[3]:
            flip = torch.rand(n, generator=self.generator) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1).to(device), x.flip(3), x)
            turns = torch.randint(0, 4, (n,), generator=self.generator).to(device)
            x = _rotate_each(x, turns)
        if self.hed > 0:
            x = self._hed_jitter(x)
        if self.color > 0:
            c = self.color
            x = x * self._uniform((n, 1, 1, 1), 1 - c, 1 + c, device)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * self._uniform((n, 1, 1, 1), 1 - c, 1 + c, device) + mean
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - gray) * self._uniform((n, 1, 1, 1), 1 - c, 1 + c, device) + gray
        return x.clamp_(0.0, 1.0)

    def _hed_jitter(self, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[0], self.hed
        od = torch.log(x.clamp(min=1e-6)) / _LOG_ADJUST  # (N, 3, H, W), 0 = white
        stains = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(x.device)).clamp_(min=0)
        alpha = self._uniform((n, 3, 1, 1), 1 - s, 1 + s, x.device)
        beta = self._uniform((n, 3, 1, 1), -s, s, x.device)
        stains = stains * alpha + beta * (stains.amax(dim=(2, 3), keepdim=True) > 0)
        log_rgb = torch.einsum("ndhw,dc->nchw", stains.clamp_(min=0), _RGB_FROM_HED.float().to(x.device)) * _LOG_ADJUST
        jittered = torch.exp(log_rgb)
        tissue = od.amax(dim=1, keepdim=True) > 0.02  # leave (near-)white background alone
        return torch.where(tissue, jittered, x)
