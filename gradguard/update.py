"""What leaves a client: the protected update and its metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

# Defined without torch, for the aggregator (which never imports it); re-exported here.
from gradguard.leakage import LeakageEstimate as LeakageEstimate

UpdateKind = Literal["delta", "gradient"]


@dataclass(repr=False)
class ProtectedUpdate:
    """A client's shared update for one round.

    ``tensors`` maps state-dict names to CPU tensors. For ``kind="delta"`` they are
    ``local_weights - global_weights`` (parameters and floating-point buffers, so BatchNorm
    running statistics are averaged too); for ``kind="gradient"`` they are the gradient of one
    step at the weights the round started from (parameters only). Everything an attacker could know about the round
    (batch size, learning rate, local steps) travels in the metadata because a server sees it anyway.
    ``leakage`` is the client's own estimate of what the update gives away (calibrated noise only).
    """

    tensors: dict[str, torch.Tensor]
    kind: UpdateKind
    num_samples: int
    num_steps: int
    round: int
    client_id: str = ""
    batch_size: int | None = None
    learning_rate: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    leakage: LeakageEstimate | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("delta", "gradient"):
            raise ValueError(f"kind must be 'delta' or 'gradient', got {self.kind!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    def __repr__(self) -> str:
        guarantee = f", epsilon={self.epsilon:.3g}, delta={self.delta:g}" if self.epsilon is not None else ""
        if self.leakage is not None:
            guarantee += (f", leakage<={self.leakage.psnr_above_prior_max:.2f} dB above prior"
                          + ("" if self.leakage.met else " (target missed)"))
        return (f"ProtectedUpdate(kind={self.kind!r}, round={self.round}, client_id={self.client_id!r}, "
                f"tensors={len(self.tensors)} ({self.num_bytes() / 2 ** 20:.2f} MiB), num_samples={self.num_samples}, "
                f"num_steps={self.num_steps}{guarantee})")

    def apply_to(self, model: nn.Module, *, scale: float = 1.0) -> None:
        """Add ``scale * delta`` to ``model``'s state in place (``kind="delta"`` only)."""
        if self.kind != "delta":
            raise ValueError("only a weight delta can be applied to a model; this update is a gradient")
        state = model.state_dict()
        missing = sorted(set(self.tensors) - set(state))
        if missing:
            raise KeyError(f"update names tensors the model does not have: {missing[:5]}")
        with torch.no_grad():
            for name, value in self.tensors.items():
                state[name].add_(value.to(device=state[name].device, dtype=state[name].dtype), alpha=scale)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def shared_state_names(model: nn.Module) -> list[str]:
    """State-dict names that a delta update carries: parameters and floating-point buffers."""
    return [name for name, value in model.state_dict().items() if value.is_floating_point()]


def weight_delta(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state minus ``before`` for every shared name, detached on CPU."""
    after = model.state_dict()
    return {name: (after[name].detach() - before[name]).cpu() for name in before}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the shared part of ``model``'s state (same device)."""
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in shared_state_names(model)}
