"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019): L2 gradient matching with L-BFGS.

Labels come from the caller or from iDLG (Zhao et al. 2020) instead of DLG's jointly optimised
soft labels, which is iDLG's improvement and the standard pairing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradguard.eval.attacks.base import Attack, AttackConfig, Run, random_images, register_attack
from gradguard.eval.attacks.objectives import simulated_gradient, squared_distance
from gradguard.eval.attacks.observation import Observation


@dataclass(kw_only=True)
class DLGConfig(AttackConfig):
    """DLG. Defaults are the benchmark's full-size run (the paper's 300 L-BFGS iterations).

    iterations: L-BFGS steps; each evaluates the loss up to ``max_evals`` times.
    lr=1.0, max_evals=20, history=100: L-BFGS settings of the original code (no line search).
    restarts=2: DLG diverges from some starts; the lowest final loss wins.
    """

    iterations: int = 300
    lr: float = 1.0
    restarts: int = 2
    max_evals: int = 20
    history: int = 100


@register_attack
class DLG(Attack):
    name = "dlg"
    config_class = DLGConfig
    config: DLGConfig

    def _restart(self, obs: Observation, labels: Tensor, generator: torch.Generator, *, desc: str) -> Run:
        cfg = self.config
        images = random_images((obs.batch_size, *obs.image_shape), generator, obs.device).requires_grad_(True)
        optimizer = torch.optim.LBFGS([images], lr=cfg.lr, max_iter=cfg.max_evals, history_size=cfg.history)
        target = list(obs.target.values())
        # Relative to the target's energy, so L-BFGS's absolute tolerances mean the same on every model.
        scale = 1 / float(sum(t.pow(2).sum() for t in target))

        def closure() -> Tensor:
            loss = scale * squared_distance(simulated_gradient(obs, images, labels), target)
            (images.grad,) = torch.autograd.grad(loss, images)
            return loss

        history: list[float] = []
        for _ in self._steps(desc):
            history.append(float(optimizer.step(closure).detach()))
            if not math.isfinite(history[-1]):
                break
        with torch.no_grad():
            images.clamp_(0, 1)
        final = scale * squared_distance(simulated_gradient(obs, images, labels), target).item()
        return Run(images=images.detach(), loss=final if math.isfinite(final) else math.inf, history=history)
