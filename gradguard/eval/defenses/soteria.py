"""Soteria (Sun et al., CVPR 2021): perturb the gradient of the representation layer.

The representation r is the input of the model's final Linear layer. Sun et al. score each
feature f by sum_i ||d r_if / d x_i|| / r_if over the batch: a small score means r_f changes
little with the input per unit of value, so the Linear weight gradient's column f (which equals
dL/dy * r_f) reveals the input most cheaply. The ``prune_fraction`` of features with the
smallest scores have their column of the Linear weight gradient zeroed, at every local step.

Scoring costs one vector-Jacobian product per feature (hundreds of backward passes per step),
so ``score_every`` > 1 rescores only every n-th local step of a round and prunes the same
features in between; the first step of every round (a single-step client's whole update) is
always scored on its own batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.eval.defenses.base import Batch, Defense, LocalRound, local_sgd, register_defense
from gradguard.guard import final_linear
from gradguard.update import UpdateKind, snapshot


def feature_scores(model: nn.Module, layer: nn.Linear, images: Tensor, *, chunk: int = 64) -> Tensor:
    """Sun et al.'s per-feature score sum_i ||d r_if / d x_i|| / r_if ([F]; inf where r_if = 0).

    Runs one forward in the model's current mode and restores its buffers afterwards, so
    BatchNorm running statistics are not counted twice.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        inputs = images.detach().clone().requires_grad_(True)
        model(inputs)
        handle.remove()
        features = captured[0].flatten(1)  # [B, F]
        num_features = features.shape[1]
        norms = []
        for start in range(0, num_features, chunk):
            idx = torch.arange(start, min(start + chunk, num_features), device=features.device)
            # One vector-Jacobian product per feature f, batched: d(sum_i r_if)/dx as in Soteria's code.
            basis = F.one_hot(idx, num_features).to(features.dtype)[:, None, :].expand(-1, len(features), -1)
            (grads,) = torch.autograd.grad(features, inputs, grad_outputs=basis, is_grads_batched=True,
                                           retain_graph=True)
            norms.append(grads.flatten(2).norm(dim=2))  # [k, B]
    finally:
        handle.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    norms_t = torch.cat(norms).T  # [B, F]
    r = features.detach()
    ratio = torch.where(r > 0, norms_t / r.clamp_min(1e-30), torch.full_like(r, float("inf")))
    return ratio.sum(dim=0)


@register_defense
class Soteria(Defense):
    """Zeroes the final Linear layer's weight-gradient columns of the ``prune_fraction`` most
    revealing representation features, rescored every ``score_every`` local batches (default: each)."""

    name = "soteria"

    def __init__(self, *, prune_fraction: float = 0.6, score_every: int = 1, share: UpdateKind = "delta"):
        if not 0 <= prune_fraction <= 1:
            raise ValueError(f"prune_fraction must lie in [0, 1], got {prune_fraction}")
        if score_every < 1:
            raise ValueError(f"score_every must be >= 1, got {score_every}")
        super().__init__(share=share, prune_fraction=prune_fraction, score_every=score_every)
        self.prune_fraction = prune_fraction
        self.score_every = score_every

    def _train(self, model: nn.Module, batches: list[Batch], context: LocalRound) -> dict[str, Tensor]:
        _, layer = final_linear(model)
        before = snapshot(model)
        pruned: Tensor | None = None

        def perturb(step: int, images: Tensor, _targets: Tensor) -> None:
            nonlocal pruned
            if pruned is None or step % self.score_every == 0:
                scores = feature_scores(model, layer, images)
                pruned = scores.argsort()[:round(self.prune_fraction * len(scores))]
            if len(pruned) and layer.weight.grad is not None:
                layer.weight.grad[:, pruned] = 0

        local_sgd(model, batches, lr=context.lr, after_backward=perturb)
        return self.shared_tensors(before, model)
