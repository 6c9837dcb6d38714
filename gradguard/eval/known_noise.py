"""The attacker who knows the defense (Kerckhoffs): a denoiser trained on the defense's own noise.

GradGuard is open source and its configuration travels with every update; only the seed is
secret. Such an attacker draws the defense's exact noise, with seeds of its own, on public
images of the clients' modality, and trains a denoising network to remove it; the network then
cleans every reconstruction (and the imprint attack's recovered inputs). The benchmark's
public images are the dataset's ``val`` split, which no client trains on.

The network is DnCNN-style (Zhang et al., "Beyond a Gaussian Denoiser: Residual Learning of
Deep CNN for Image Denoising", IEEE TIP 2017): a stack of 3x3 convolutions with ReLU that
predicts the noise, subtracted from its input. It has no BatchNorm (DnCNN's has), so that
training on small batches and applying it to single images behave alike.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard import GradGuard, GradGuardWarning, GuardConfig
from gradguard.update import ProtectedUpdate

NoiseFn = Callable[[Tensor, torch.Generator], Tensor]
"""``noise_fn(images, generator) -> noised images``: the defense's noise on clean [N, C, H, W]
images in [0, 1]; every random number (seeds included) comes from ``generator``."""


@dataclass(frozen=True, kw_only=True)
class DenoiserConfig:
    """The known-noise denoiser and its training. Defaults are the benchmark's full-size run.
    On 32 px grey images and one CPU core, 300 steps took 12 s with white noise and 30-40 s
    with GradGuard's (whose ``explain`` runs for every batch).

    width: channels of the hidden convolutions. depth: number of 3x3 convolutions (>= 2).
    steps, batch_size, lr: Adam on the mean squared error to the clean images; every step draws
        a fresh batch of public images and fresh noise.
    seed: seeds the initial weights, the batches and the noise seeds.
    device: where it trains and runs ("cpu", "cuda", ...).
    """

    width: int = 16
    depth: int = 5
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = {"width": self.width >= 1, "depth": self.depth >= 2, "steps": self.steps >= 1,
                  "batch_size": self.batch_size >= 1, "lr": self.lr > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid DenoiserConfig field(s) {bad}: see the DenoiserConfig docstring for ranges")


def residual_cnn(channels: int, *, width: int, depth: int) -> nn.Sequential:
    """conv-ReLU, (depth - 2) x conv-ReLU, conv: maps a noised image to its estimated noise."""
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(width, channels, 3, padding=1))
    return nn.Sequential(*layers)


class KnownNoiseDenoiser:
    """Learns to remove one defense's noise from public images: ``fit`` once, then ``apply``.

    Deterministic given ``config.seed`` (on the CPU): the same images, noise and config give
    the same network.
    """

    def __init__(self, config: DenoiserConfig | None = None) -> None:
        self.config = config or DenoiserConfig()
        self.network: nn.Sequential | None = None

    def fit(self, public_images: Tensor, noise_fn: NoiseFn) -> "KnownNoiseDenoiser":
        """Train on ``public_images`` [N, C, H, W] in [0, 1] noised by ``noise_fn``.

        The noised images are clipped to [0, 1] as every reconstruction is, so the network
        learns the noise as an attack's output shows it.
        """
        cfg = self.config
        if public_images.ndim != 4 or len(public_images) < 1:
            raise ValueError(f"public_images must be [N, C, H, W] with N >= 1, got {tuple(public_images.shape)}")
        device = torch.device(cfg.device)
        generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):  # the initial weights, without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            network = residual_cnn(public_images.shape[1], width=cfg.width, depth=cfg.depth)
        network.to(device).train()
        optimizer = torch.optim.Adam(network.parameters(), lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
        public = public_images.detach().float().cpu()
        for _ in range(cfg.steps):
            clean = public[torch.randint(len(public), (cfg.batch_size,), generator=generator)]
            noised = noise_fn(clean, generator).detach().cpu().clamp(0, 1)
            if noised.shape != clean.shape:
                raise ValueError(f"noise_fn returned shape {tuple(noised.shape)} for images {tuple(clean.shape)}")
            clean, noised = clean.to(device), noised.to(device)
            loss = F.mse_loss(noised - network(noised), clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        self.network = network.eval()
        return self

    @torch.no_grad()
    def apply(self, images: Tensor) -> Tensor:
        """``images`` [N, C, H, W] (reconstructions) denoised, clipped to [0, 1], on the CPU."""
        if self.network is None:
            raise RuntimeError("the denoiser is not trained: call fit(public_images, noise_fn) first")
        if images.ndim != 4 or images.shape[1] != self.network[0].in_channels:
            raise ValueError(f"images must be [N, {self.network[0].in_channels}, H, W], got {tuple(images.shape)}")
        x = images.detach().float().to(torch.device(self.config.device))
        return (x - self.network(x)).clamp(0, 1).cpu().to(images.dtype)


def gaussian_noise(sigma: float) -> NoiseFn:
    """White Gaussian noise of standard deviation ``sigma`` (in units of the [0, 1] range)."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")

    def noise(images: Tensor, generator: torch.Generator) -> Tensor:
        return images + sigma * torch.randn(images.shape, generator=generator).to(images)

    return noise


def gradguard_noise(config: GuardConfig, *, model: nn.Module, round: int = 0,
                    dataset_size: int | None = None) -> NoiseFn:
    """GradGuard's noise under ``config``, as an attacker reproduces it from the public API.

    Each call wraps a private copy of ``model`` (the global model the update was computed on)
    with a fresh ``GradGuard`` whose seed is drawn from the generator, sets the FL ``round``
    and returns ``guard.explain(images).noised``. ``dataset_size`` is the N of
    ``update_exponent`` (the update's ``num_samples``); it is needed when that exponent is
    non-zero. The relevance map explains the model's predictions, and the shadow is the
    fresh guard's own: the masks' shape can differ from a client's (with
    ``mask_normalization="rms"`` their energy cannot), the noise kind and amplitude are exact.
    """
    private = copy.deepcopy(model)
    device = next(private.parameters()).device

    def noise(images: Tensor, generator: torch.Generator) -> Tensor:
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        guard = GradGuard(config.with_(seed=seed), device=device)
        # explain() never steps; wrap() only needs an optimizer to hook, and what it warns of (what a
        # client's updates would share) does not concern a draw of the noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradGuardWarning)
            guard.wrap(private, torch.optim.SGD(private.parameters(), lr=0.0), dataset_size=dataset_size)
        try:
            guard.begin_round(round)
            return guard.explain(images).noised.to(images)
        finally:
            guard.cleanup()

    return noise


def gradguard_noise_for_update(update: ProtectedUpdate, *, model: nn.Module) -> NoiseFn:
    """:func:`gradguard_noise` for the configuration, round and image count that ``update``
    (a ``GradGuard.protected_update()``) carries: everything but the seed travels with it."""
    if "config" not in update.metadata:
        raise ValueError("the update carries no GradGuard configuration (metadata['config'], written by "
                         "GradGuard.protected_update); build the noise with gradguard_noise(config, model=...)")
    config = GuardConfig.from_dict(json.loads(update.metadata["config"]))
    return gradguard_noise(config, model=model, round=update.round, dataset_size=update.num_samples)
