"""Gradient pruning (Zhu et al., DLG, NeurIPS 2019): share only the largest-magnitude entries."""
from __future__ import annotations

from torch import Tensor

from gradguard.eval.defenses.base import Defense, LocalRound, register_defense
from gradguard.update import UpdateKind


@register_defense
class GradientPruning(Defense):
    """Zeroes the ``fraction`` of entries with the smallest |value| in every tensor of the update."""

    name = "pruning"

    def __init__(self, *, fraction: float = 0.5, share: UpdateKind = "delta"):
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        super().__init__(share=share, fraction=fraction)
        self.fraction = fraction

    def _protect(self, tensors: dict[str, Tensor], context: LocalRound) -> dict[str, Tensor]:
        pruned = {}
        for name, value in tensors.items():
            flat = value.flatten().clone()
            count = round(self.fraction * flat.numel())
            if count:
                flat[flat.abs().argsort()[:count]] = 0  # argsort, not a threshold: ties prune exactly `count`
            pruned[name] = flat.view_as(value)
        return pruned
