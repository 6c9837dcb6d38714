"""What a shadow model is: a stand-in attacker whose per-pixel error locates vulnerability."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from gradguard.registry import Registry


@dataclass
class ShadowInputs:
    """What the guard hands a shadow for a batch of clean images.

    features: the final Linear layer's input for each image. An attacker reads exactly this
        from the layer's per-sample gradient: dL/dW_i = g_i h_i^T, so every non-zero row of
        it is h_i up to scale (Geiping et al. 2020, Prop. 1).
    model: the global model of the round (eval mode), for shadows that match gradients.
    targets: the class each image is attributed to.
    """

    images: torch.Tensor
    features: torch.Tensor
    model: nn.Module
    targets: torch.Tensor
    ids: list[str]


class Shadow(ABC):
    """Plays the attacker on the client's own data; co-trained alongside the task model."""

    @abstractmethod
    def observe(self, features: torch.Tensor, images: torch.Tensor) -> None:
        """One co-training step on a training batch (features seen during local training)."""

    @abstractmethod
    def error_map(self, inputs: ShadowInputs) -> torch.Tensor:
        """Per-pixel squared reconstruction error [B, 1, H, W]; low means vulnerable."""


ShadowFactory = Callable[..., Shadow]
SHADOWS: Registry[ShadowFactory] = Registry("shadow")


def register_shadow(name: str) -> Callable[[ShadowFactory], ShadowFactory]:
    return SHADOWS.decorator(name)


def build_shadow(name: str, *, feature_dim: int, image_shape: tuple[int, int, int], width: int,
                 lr: float, steps: int, device: torch.device, seed: int) -> Shadow:
    return SHADOWS.lookup(name)(feature_dim=feature_dim, image_shape=image_shape, width=width, lr=lr, steps=steps,
                   device=device, seed=seed)


def per_pixel_error(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over channels: [B, 1, H, W]."""
    return (reconstruction - images).pow(2).mean(dim=1, keepdim=True)


def decoder(in_dim: int, image_shape: tuple[int, int, int], width: int) -> nn.Module:
    """A small decoder from a vector to an image of ``image_shape``.

    Kept light on purpose (it trains on every step): a Linear to a quarter-resolution grid,
    one conv at half resolution, one at full resolution.
    """
    channels, height, width_px = image_shape
    h0, w0 = max(height // 4, 1), max(width_px // 4, 1)
    return nn.Sequential(
        nn.Linear(in_dim, width * h0 * w0),
        nn.Unflatten(1, (width, h0, w0)),
        nn.ReLU(),
        nn.Upsample(size=(max(height // 2, 1), max(width_px // 2, 1)), mode="bilinear", align_corners=False),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Upsample(size=(height, width_px), mode="bilinear", align_corners=False),
        nn.Conv2d(width, channels, 3, padding=1),
    )
