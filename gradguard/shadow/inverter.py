"""The default shadow: a feature inverter co-trained on the client's own batches.

An attacker with the shared update reads each sample's last-layer features (up to scale) and
inverts them. The shadow learns exactly that inversion on the client's data, one Adam step per
training batch, so it costs a small decoder's forward and backward, no second-order terms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gradguard.shadow.base import Shadow, ShadowInputs, per_pixel_error, register_shadow, seeded_decoder


def _scale_free(features: torch.Tensor) -> torch.Tensor:
    # The gradient reveals features only up to a per-sample scale, so the shadow sees unit vectors.
    return F.normalize(features.flatten(1), dim=1)


@register_shadow("feature_inverter")
class FeatureInverter(Shadow):
    def __init__(self, *, feature_dim: int, image_shape: tuple[int, ...], width: int, lr: float,
                 steps: int, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.net = seeded_decoder(feature_dim, image_shape, width, seed=seed, device=device, dtype=dtype)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.steps = steps

    def observe(self, features: torch.Tensor, images: torch.Tensor) -> None:
        inputs = _scale_free(features.detach())
        for _ in range(self.steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(self.net(inputs), images.detach())
            loss.backward()
            self.optimizer.step()

    @torch.no_grad()
    def error_map(self, inputs: ShadowInputs) -> torch.Tensor:
        return per_pixel_error(self.net(_scale_free(inputs.features)), inputs.images)
