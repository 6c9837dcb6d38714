"""The paper's shadow (``shadowdef``): a generator with one latent code per training image.

Jiang et al. fine-tune a StyleGAN3 generator for 5 steps per batch on gradient matching (1e-2),
BatchNorm-statistics matching (1e-2), TV (1e-5), a norm term (1e2) and pixel MSE to the true
image (1). No pretrained GAN weights ship offline, so the generator here is the same small
decoder as the inverter's, trained from scratch; the losses and weights are the paper's. The
norm term is applied to the latent codes (their mean square kept at 1, a StyleGAN-style latent
prior): on the image, a weight of 1e2 against pixel MSE of weight 1 would shrink every
reconstruction to black.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gradguard.shadow.base import Shadow, ShadowInputs, per_pixel_error, register_shadow, seeded_decoder

WEIGHTS = {"gradient": 1e-2, "bn": 1e-2, "tv": 1e-5, "norm": 1e2, "pixel": 1.0}
LATENT_DIM = 64


def total_variation(images: torch.Tensor) -> torch.Tensor:
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + \
        (images[..., :, 1:] - images[..., :, :-1]).abs().mean()


@contextmanager
def train_mode_without_side_effects(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode (BatchNorm uses batch statistics) with the buffers restored afterwards."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        yield model
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


def _bn_input_stats(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward in train mode; returns logits and each BatchNorm input's (mean, var) per channel."""
    stats: list[torch.Tensor] = []

    def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        dims = (0, *range(2, x.ndim))  # every axis but the channel's
        stats.append(torch.cat([x.mean(dim=dims), x.var(dim=dims, unbiased=False)]))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        logits = model(images)
    finally:
        for h in handles:
            h.remove()
    return logits, stats


@register_shadow("generator")
class LatentGenerator(Shadow):
    def __init__(self, *, feature_dim: int, image_shape: tuple[int, ...], width: int, lr: float,
                 steps: int, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.device, self.dtype = device, dtype
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.net = seeded_decoder(LATENT_DIM, image_shape, width, seed=seed, device=device, dtype=dtype)
        self.latents: dict[str, torch.Tensor] = {}
        self.lr = lr
        self.steps = max(steps, 1)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

    def observe(self, features: torch.Tensor, images: torch.Tensor) -> None:
        """The paper fine-tunes on gradients at refresh time only; nothing to do per step."""

    def _codes(self, ids: list[str]) -> torch.Tensor:
        for sid in ids:
            if sid not in self.latents:
                self.latents[sid] = torch.randn(LATENT_DIM, generator=self.generator).to(self.device, self.dtype)
        return torch.stack([self.latents[sid] for sid in ids]).requires_grad_(True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **{f"latents.{sid}": code.cpu() for sid, code in self.latents.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.latents = {k[len("latents."):]: v.to(self.device, self.dtype) for k, v in state.items()
                        if k.startswith("latents.")}

    def error_map(self, inputs: ShadowInputs) -> torch.Tensor:
        model, images, targets = inputs.model, inputs.images, inputs.targets
        params = [p for p in model.parameters() if p.requires_grad]
        codes = self._codes(inputs.ids)
        code_opt = torch.optim.Adam([codes], lr=self.lr * 10)
        with train_mode_without_side_effects(model):
            logits, true_stats = _bn_input_stats(model, images)
            true_grads = [g.detach() for g in torch.autograd.grad(F.cross_entropy(logits, targets), params)]
            true_stats = [s.detach() for s in true_stats]
            for _ in range(self.steps):
                fake = self.net(codes)
                logits, fake_stats = _bn_input_stats(model, fake)
                grads = torch.autograd.grad(F.cross_entropy(logits, targets), params, create_graph=True)
                grad_loss = sum(1 - F.cosine_similarity(g.flatten(), t.flatten(), dim=0)
                                for g, t in zip(grads, true_grads))
                bn_loss = sum(((f - t) ** 2).sum() for f, t in zip(fake_stats, true_stats))
                loss = (WEIGHTS["gradient"] * grad_loss + WEIGHTS["bn"] * bn_loss
                        + WEIGHTS["tv"] * total_variation(fake)
                        + WEIGHTS["norm"] * (codes.pow(2).mean(dim=1) - 1).pow(2).mean()
                        + WEIGHTS["pixel"] * F.mse_loss(fake, images))
                self.optimizer.zero_grad(set_to_none=True)
                code_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                code_opt.step()
        for sid, code in zip(inputs.ids, codes.detach()):
            self.latents[sid] = code
        with torch.no_grad():
            return per_pixel_error(self.net(codes.detach()), images)
