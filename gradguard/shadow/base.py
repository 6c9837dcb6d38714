"""What a shadow model is: a stand-in attacker whose per-pixel error locates vulnerability."""
from __future__ import annotations

import math
import threading
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
    """Plays the attacker on the client's own data; co-trained alongside the task model.

    A shadow's state is its network ``net`` and the Adam ``optimizer`` that trains it (plus what
    a subclass adds to :meth:`state_dict`), so a trained shadow can be saved and handed to a new guard.
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer
    # True for a shadow that runs a real attack: its error counts only where it beats the prior's.
    scored_against_prior: bool = False

    @abstractmethod
    def observe(self, features: torch.Tensor, images: torch.Tensor) -> None:
        """One co-training step on a training batch (features seen during local training)."""

    @abstractmethod
    def error_map(self, inputs: ShadowInputs) -> torch.Tensor:
        """Per-pixel squared reconstruction error [B, 1, H, W] ([B, 1, D, H, W]); low means vulnerable."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network's weights and the optimizer's moments, as named CPU tensors."""
        out = {f"net.{k}": v.detach().cpu() for k, v in self.net.state_dict().items()}
        for index, moments in self.optimizer.state_dict()["state"].items():
            out.update({f"optimizer.{index}.{k}": torch.as_tensor(v).detach().cpu() for k, v in moments.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": moments, "param_groups": saved["param_groups"]})


ShadowFactory = Callable[..., Shadow]
SHADOWS: Registry[ShadowFactory] = Registry("shadow")


def register_shadow(name: str) -> Callable[[ShadowFactory], ShadowFactory]:
    return SHADOWS.decorator(name)


def build_shadow(name: str, *, feature_dim: int, image_shape: tuple[int, ...], width: int,
                 lr: float, steps: int, device: torch.device, dtype: torch.dtype, seed: int) -> Shadow:
    """A shadow for images of ``image_shape`` ([C, H, W] or [C, D, H, W]) on ``device`` in ``dtype``."""
    return SHADOWS.lookup(name)(feature_dim=feature_dim, image_shape=image_shape, width=width, lr=lr, steps=steps,
                                device=device, dtype=dtype, seed=seed)


def per_pixel_error(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over channels: [B, 1, ...]."""
    return (reconstruction - images).pow(2).mean(dim=1, keepdim=True)


# torch.random.fork_rng saves, reseeds and restores the process-wide generator: two guards building
# their shadows at once in threads (clients of one process) would otherwise draw each other's weights.
_GLOBAL_RNG = threading.Lock()


def seeded_decoder(in_dim: int, image_shape: tuple[int, ...], width: int, *, seed: int, device: torch.device,
                   dtype: torch.dtype) -> nn.Module:
    """:func:`decoder` with weights drawn from ``seed`` alone, leaving the global generator as it was."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return decoder(in_dim, image_shape, width).to(device=device, dtype=dtype)


def decoder(in_dim: int, image_shape: tuple[int, ...], width: int) -> nn.Module:
    """A small decoder from a vector to an image of ``image_shape`` ([C, H, W], or [C, D, H, W]).

    Kept light on purpose (it trains on every step): a Linear to a quarter-resolution grid,
    one conv at half resolution, one at full resolution.
    """
    channels, sizes = image_shape[0], tuple(image_shape[1:])
    conv = nn.Conv3d if len(sizes) == 3 else nn.Conv2d
    mode = "trilinear" if len(sizes) == 3 else "bilinear"
    quarter, half = tuple(max(n // 4, 1) for n in sizes), tuple(max(n // 2, 1) for n in sizes)
    return nn.Sequential(
        nn.Linear(in_dim, width * math.prod(quarter)),
        nn.Unflatten(1, (width, *quarter)),
        nn.ReLU(),
        nn.Upsample(size=half, mode=mode, align_corners=False),
        conv(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Upsample(size=sizes, mode=mode, align_corners=False),
        conv(width, channels, 3, padding=1),
    )
