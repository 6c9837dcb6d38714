"""Gaussian noise on the shared update, scaled per tensor as NVFlare's GaussianPrivacy filter does."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradguard.eval.defenses.base import Defense, LocalRound, register_defense
from gradguard.update import UpdateKind


@register_defense
class GaussianUpdateNoise(Defense):
    """Adds N(0, sigma^2) to every tensor of the update, sigma = ``sigma0`` x the
    ``percentile``-th percentile of that tensor's |values| (NVFlare: sigma0 and 95).

    No formal guarantee: the noise scales with the update itself, so it hides a fixed fraction
    of the signal whatever the update's size.
    """

    name = "gaussian"

    def __init__(self, *, sigma0: float = 0.1, percentile: float = 95.0, seed: int = 0, share: UpdateKind = "delta"):
        if sigma0 < 0 or not 0 < percentile <= 100:
            raise ValueError(f"need sigma0 >= 0 and 0 < percentile <= 100, got {sigma0} and {percentile}")
        super().__init__(share=share, sigma0=sigma0, percentile=percentile, seed=seed)
        self.sigma0, self.percentile = sigma0, percentile
        self._generator = torch.Generator().manual_seed(seed)

    def _protect(self, tensors: dict[str, Tensor], context: LocalRound) -> dict[str, Tensor]:
        noisy = {}
        for name, value in tensors.items():
            # numpy, as NVFlare does (torch.quantile refuses tensors over 16M entries)
            scale = float(np.percentile(value.abs().double().numpy(), self.percentile))
            noise = torch.randn(value.shape, generator=self._generator, dtype=torch.float64)
            noisy[name] = (value.double() + self.sigma0 * scale * noise).to(value.dtype)
        return noisy
