"""A shadow that is the attack itself: the honest server's gradient inversion of the batch.

The co-trained shadows guess where an attack recovers an image from what they learned on the
client's data. This one runs the attack of the guard's probe (Inverting Gradients, Geiping et al.
2020: cosine gradient matching with total variation and the blind denoisers) on the clean gradient
of the batch at the global weights, and reports the per-pixel error of each image's best estimate.
The guard turns it into a vulnerability map against the prior (:func:`gradguard.masks.recovery_map`):
where the attack fails its estimate is no better than the prior, and noise there buys nothing.
It learns nothing, so it has no state to save; each map costs ``steps`` attack iterations.
"""
from __future__ import annotations

import torch

from gradguard.calibration.probe import invert_gradient, recovered
from gradguard.config import derive_seed
from gradguard.shadow.base import Shadow, ShadowInputs, per_pixel_error, register_shadow
from gradguard.shadow.generator import train_mode_without_side_effects


@register_shadow("gradient_attack")
class GradientAttack(Shadow):
    scored_against_prior = True

    def __init__(self, *, feature_dim: int, image_shape: tuple[int, ...], width: int, lr: float,
                 steps: int, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.steps, self.seed, self._maps = steps, seed, 0

    def observe(self, features: torch.Tensor, images: torch.Tensor) -> None:
        """Nothing to learn: the attack runs afresh on every batch it maps."""

    def error_map(self, inputs: ShadowInputs) -> torch.Tensor:
        model, images = inputs.model, inputs.images.detach()
        self._maps += 1
        with train_mode_without_side_effects(model):  # the gradient a client shares is a training one
            estimates = invert_gradient(model, model, images, inputs.targets, steps=self.steps,
                                        seed=derive_seed(self.seed, "gradient_attack", self._maps))
        return per_pixel_error(recovered(estimates, images), images)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing was saved."""
