"""DP-SGD through Opacus (Abadi et al. 2016): per-sample clipping, Gaussian noise, an RDP accountant.

BatchNorm: per-sample gradients do not exist for batch statistics, and Opacus' GradSampleModule
refuses BatchNorm layers. A federation whose clients all run DP-SGD therefore trains the model
with BatchNorm replaced by GroupNorm (:meth:`DPSGD.prepare_model`, Opacus'
``ModuleValidator.fix``), as Opacus recommends. Keeping BatchNorm and normalising with frozen
running statistics does not work there: nobody updates those statistics, so they stay at their
initial values and every benchmark run collapsed to the majority class, even without noise or
clipping. A single DP step on a global model that was trained with BatchNorm elsewhere (the
demo) still runs: local training is in eval mode, so BatchNorm uses the global model's running
statistics and only its affine parameters train. Per-sample gradients come from torch.func (vmap
of grad); clipping, noise and accounting are Opacus' DPOptimizer and accountant. Updates say
``model_mode="eval"``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradguard.eval.defenses.base import Batch, BatchHook, Defense, LocalRound, local_sgd, register_defense
from gradguard.per_sample import per_sample_ready
from gradguard.update import UpdateKind, snapshot

if TYPE_CHECKING:  # opacus loads only when DP-SGD runs
    from opacus.accountants import IAccountant
    from opacus.optimizers import DPOptimizer


def per_sample_gradients(model: nn.Module, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Each sample's cross-entropy gradient per trainable parameter ({name: [B, *shape]}).

    ``model`` must be in eval mode: every sample is then processed on its own, which is what
    makes a per-sample gradient well defined for BatchNorm models.
    """
    if model.training:
        raise ValueError("per-sample gradients need model.eval() (BatchNorm on running statistics)")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(weights: dict[str, Tensor], image: Tensor, target: Tensor) -> Tensor:
        logits = functional_call(model, (weights, buffers), (image.unsqueeze(0),))
        return F.cross_entropy(logits, target.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, images, targets)


def private_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                      max_grad_norm: float, batch_size: int, sample_rate: float, accountant: IAccountant,
                      generator: torch.Generator) -> tuple[DPOptimizer, BatchHook]:
    """Opacus' DPOptimizer around ``optimizer`` (any torch optimizer), charging ``accountant`` one
    step at ``sample_rate`` per step, and the ``after_backward`` hook of :func:`local_sgd` that
    hands it each step's per-sample gradients. ``model`` must stay in eval mode while it trains."""
    from opacus.optimizers import DPOptimizer

    private = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                          expected_batch_size=batch_size, generator=generator)
    private.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    named = dict(model.named_parameters())

    def attach_per_sample(_step: int, images: Tensor, targets: Tensor) -> None:
        for name, value in per_sample_gradients(model, images, targets).items():
            # Opacus' DPOptimizer reads this attribute, which torch's Parameter does not declare
            named[name].grad_sample = value  # type: ignore[attr-defined]

    return private, attach_per_sample


@register_defense
class DPSGD(Defense):
    """Opacus DP-SGD with ``noise_multiplier`` and ``max_grad_norm``; one accountant per client.

    Each local step is one subsampled Gaussian mechanism with sample rate batch / local
    dataset size (Opacus' Poisson-sampling analysis; the benchmark's shuffled fixed-size
    batches are the usual approximation of it). :meth:`epsilon` is the accountant's epsilon
    for all steps a client has taken over all rounds.
    """

    name = "dpsgd"
    model_mode = "eval"

    def __init__(self, *, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, delta: float = 1e-5,
                 accountant: str = "rdp", seed: int = 0, share: UpdateKind = "delta"):
        from opacus.accountants import create_accountant

        if noise_multiplier < 0 or max_grad_norm <= 0 or not 0 < delta < 1:
            raise ValueError(f"need noise_multiplier >= 0, max_grad_norm > 0 and 0 < delta < 1, got "
                             f"{noise_multiplier}, {max_grad_norm}, {delta}")
        create_accountant(mechanism=accountant)  # fails early on an unknown accountant name
        super().__init__(share=share, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         delta=delta, accountant=accountant, seed=seed)
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self._delta, self._accountant_kind = delta, accountant
        self._generator = torch.Generator().manual_seed(seed)
        self.accountants: dict = {}

    @classmethod
    def prepare_model(cls, model: nn.Module, **params: Any) -> nn.Module:
        """``model`` with every layer Opacus cannot clip per sample replaced (BatchNorm -> GroupNorm)."""
        return per_sample_ready(model)

    @property
    def delta(self) -> float:
        return self._delta

    def epsilon(self, *, delta: float, client_id: str | None = None) -> float:
        if client_id is not None:
            chosen = [self.accountants[client_id]] if client_id in self.accountants else []
        else:
            chosen = list(self.accountants.values())
        return max((float(a.get_epsilon(delta=delta)) for a in chosen if len(a)), default=0.0)

    def _train(self, model: nn.Module, batches: list[Batch], context: LocalRound) -> dict[str, Tensor]:
        from opacus.accountants import create_accountant

        model.eval()
        before = snapshot(model)
        device = next(model.parameters()).device
        if self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._params["seed"])
        accountant = self.accountants.setdefault(context.client_id, create_accountant(self._accountant_kind))
        optimizer, attach_per_sample = private_optimizer(
            model, torch.optim.SGD(model.parameters(), lr=context.lr), noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, batch_size=context.batch_size,
            sample_rate=context.batch_size / context.num_samples, accountant=accountant, generator=self._generator)
        local_sgd(model, batches, lr=context.lr, optimizer=optimizer, after_backward=attach_per_sample)
        return self.shared_tensors(before, model)
