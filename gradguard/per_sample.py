"""Per-sample gradients through Opacus, and the optional hybrid DP mode with its accountant.

BatchNorm mixes the samples of a batch, so per-sample gradients are undefined for it and Opacus'
GradSampleModule refuses it. The guard itself never needs them for the whole model: its shadow
reads only what the final Linear layer's per-sample gradient reveals (that layer's input), which
exists for any model, BatchNorm or not. Whole-model per-sample gradients are needed only for
hybrid DP (per-sample clipping); there a BatchNorm model gets an error naming each BN layer and
the fix (``opacus.validators.ModuleValidator.fix``, BatchNorm -> GroupNorm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradguard.errors import UnsupportedModelError


def validate_per_sample(model: nn.Module) -> None:
    """Raise UnsupportedModelError naming every layer Opacus cannot give per-sample gradients for."""
    from opacus.validators import ModuleValidator

    # Opacus' messages do not say where a layer sits; checking leaf by leaf names the path.
    problems = [f"  - {name} ({type(m).__name__}): {ModuleValidator.validate(m, strict=False)[0]}".split(". ")[0]
                for name, m in model.named_modules()
                if not list(m.children()) and ModuleValidator.validate(m, strict=False)]
    if problems:
        raise UnsupportedModelError(
            "per-sample gradients (hybrid DP mode) are not defined for these layers:\n" + "\n".join(problems) +
            "\nfix: model = opacus.validators.ModuleValidator.fix(model) (BatchNorm -> GroupNorm) before "
            "wrapping, or turn hybrid DP off (dp_noise_multiplier=None): the guard's masks do not need it")


def per_sample_ready(model: nn.Module) -> nn.Module:
    """``model`` with every layer Opacus cannot clip per sample replaced (BatchNorm -> GroupNorm,
    Opacus' ``ModuleValidator.fix``); a model that needs nothing is returned as it is."""
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model) if ModuleValidator.validate(model, strict=False) else model


def per_sample_gradients(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of each sample's cross-entropy loss, per parameter: {name: [B, *shape]}.

    Uses Opacus' GradSampleModule hooks, then removes them, leaving ``model`` as it was.
    """
    from opacus import GradSampleModule

    validate_per_sample(model)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(images), targets, reduction="sum").backward()
        return {name: p.grad_sample.detach().clone() for name, p in model.named_parameters()
                if p.requires_grad and p.grad_sample is not None}
    finally:
        wrapped.zero_grad(set_to_none=True)
        wrapped._close()


@dataclass
class HybridDP:
    """DP-SGD on top of the masks: Opacus' GradSampleModule + DPOptimizer + an accountant."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    accountant: object
    delta: float

    @classmethod
    def attach(cls, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
               max_grad_norm: float, batch_size: int, dataset_size: int, delta: float,
               accountant: str | object, generator: torch.Generator | None = None) -> "HybridDP":
        """Wrap for DP-SGD. ``accountant`` is a mechanism name for a fresh accountant, or an
        accountant from an earlier round, so privacy spent accumulates over the whole run."""
        from opacus import GradSampleModule
        from opacus.accountants import create_accountant
        from opacus.optimizers import DPOptimizer

        validate_per_sample(model)
        module = GradSampleModule(model)
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                   expected_batch_size=batch_size, generator=generator)
        tracker = create_accountant(mechanism=accountant) if isinstance(accountant, str) else accountant
        dp_optimizer.attach_step_hook(tracker.get_optimizer_hook_fn(sample_rate=batch_size / dataset_size))
        return cls(module=module, optimizer=dp_optimizer, accountant=tracker, delta=delta)

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.delta)) if len(self.accountant) else 0.0

    def detach(self) -> None:
        self.module._close()
