"""Per-sample gradients through Opacus, and the optional hybrid DP mode with its accountant.

BatchNorm mixes the samples of a batch, so per-sample gradients are undefined for it and Opacus'
GradSampleModule refuses it. The guard itself never needs them for the whole model: its shadow
reads only what the final Linear layer's per-sample gradient reveals (that layer's input), which
exists for any model, BatchNorm or not. Whole-model per-sample gradients are needed only for
hybrid DP (per-sample clipping); there a BatchNorm model gets an error naming each BN layer and
the fix (``opacus.validators.ModuleValidator.fix``, BatchNorm -> GroupNorm).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gradguard.errors import UnsupportedModelError

if TYPE_CHECKING:
    from opacus.accountants import IAccountant


# Opacus' per-sample hooks are full backward hooks on modules whose inputs need no gradient (the
# images); torch warns about that on every backward although the per-sample gradients are right.
_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"


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
    warnings.filterwarnings("ignore", message=_BACKWARD_HOOK_WARNING, category=UserWarning)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(images), targets, reduction="sum").backward()
        # Opacus sets grad_sample on each parameter it hooks.
        samples = {name: getattr(p, "grad_sample", None) for name, p in model.named_parameters() if p.requires_grad}
        return {name: g.detach().clone() for name, g in samples.items() if g is not None}
    finally:
        wrapped.zero_grad(set_to_none=True)
        wrapped._close()


@dataclass
class HybridDP:
    """DP-SGD on top of the masks: Opacus' GradSampleModule + DPOptimizer + a Poisson DataLoader,
    with the accountant charged at the loader's sampling rate, as Opacus' ``make_private`` does."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    accountant: IAccountant
    delta: float

    @classmethod
    def attach(cls, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
               noise_multiplier: float, max_grad_norm: float, delta: float, accountant: IAccountant,
               on_step: Callable[[], None]) -> HybridDP:
        """Wrap for DP-SGD. ``accountant`` carries the privacy spent in earlier rounds, so epsilon
        accumulates over the whole training; ``on_step`` is called at every DP step."""
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        validate_per_sample(model)
        # The accountant assumes every sample joins a step independently with probability q
        # (Poisson sampling); shuffled fixed-size batches would make the reported epsilon wrong.
        poisson = DPDataLoader.from_data_loader(data_loader)
        sample_rate = 1 / len(data_loader)
        warnings.filterwarnings("ignore", message=_BACKWARD_HOOK_WARNING, category=UserWarning)
        module = GradSampleModule(model)
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                   expected_batch_size=max(int(len(data_loader.dataset) * sample_rate), 1))  # type: ignore[arg-type]
        charge = accountant.get_optimizer_hook_fn(sample_rate=sample_rate)

        def step_hook(optim: DPOptimizer) -> None:
            charge(optim)
            on_step()

        dp_optimizer.attach_step_hook(step_hook)
        return cls(module=module, optimizer=dp_optimizer, data_loader=poisson, accountant=accountant, delta=delta)

    def detach(self) -> None:
        self.module._close()  # type: ignore[operator]


def new_accountant(mechanism: str) -> IAccountant:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=mechanism)


def epsilon(accountant: IAccountant, delta: float) -> float:
    """The accountant's epsilon at ``delta``; 0 before any step. Opacus' RDP accountant warns when
    the optimal order is at the edge of its alphas; the value is still a valid upper bound."""
    if not len(accountant.history):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))
