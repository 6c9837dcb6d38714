"""Differentiable pieces of the attack objectives: the client's step replayed, distances, priors."""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from gradguard.eval.attacks.observation import Observation


def simulated_gradient(obs: Observation, images: Tensor, labels: Tensor, *, steps: int = 1) -> list[Tensor]:
    """The client's (pseudo-)gradient for ``images``, differentiable with respect to them.

    With ``steps=1`` the plain gradient of the mean cross-entropy at the global weights. With
    ``steps=K`` the client's K local SGD steps are replayed on ``images`` and
    ``-(w_K - w_0) / (lr * K)`` is returned, which is what ``obs.target`` holds for a delta
    (Geiping et al.'s FedAvg variant). Every step's forward runs the model's own modules, so
    forward hooks on it see each step.
    """
    params = obs.params()
    names = list(params)
    current = dict(params)
    total: list[Tensor] | None = None
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(obs.model, current, (images,)), labels)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=True)
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
        if steps > 1:
            current = {name: current[name] - obs.learning_rate * g for name, g in zip(names, grads)}
    assert total is not None  # steps >= 1
    return [t / steps for t in total]


def cosine_distance(grads: list[Tensor], target: list[Tensor]) -> Tensor:
    """1 - cosine similarity of the concatenated tensors (Inverting Gradients' loss)."""
    # cast: sum() of tensors is a tensor; its start, 0, comes back only for no tensors at all
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    norm_g = torch.sqrt(cast(Tensor, sum(g.pow(2).sum() for g in grads)))
    norm_t = torch.sqrt(cast(Tensor, sum(t.pow(2).sum() for t in target)))
    return 1 - dot / (norm_g * norm_t + 1e-12)


def squared_distance(grads: list[Tensor], target: list[Tensor]) -> Tensor:
    """Sum of squared differences (DLG's loss)."""
    return cast(Tensor, sum((g - t).pow(2).sum() for g, t in zip(grads, target)))


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy
