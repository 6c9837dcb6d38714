"""What leaves a client: the protected update and its metadata."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

UpdateKind = Literal["delta", "gradient"]


@dataclass(frozen=True)
class LeakageEstimate:
    """What the client's simulated attacker estimates an update gives away, and the noise chosen for it.

    Leakage is above the attacker's prior (dB of PSNR, and SSIM, of the best estimate minus the
    prior's), over the samples of the update: the worst sample and the mean. ``estimators`` names
    what was run: "noised_input_bound" (the oracle Wiener filter on the exact noised inputs: every
    attack's ceiling) and, under the honest server, "gradient_probe" (a short gradient-inversion
    attack on the round's clean gradient). ``met``: every sample is at most ``target_db``.
    ``amplitude_max`` / ``amplitude_mean``: the noise chosen (RMS over max |x|; 0 for samples that
    got none) and ``noised_samples`` how many got any.
    """

    threat: str
    estimators: tuple[str, ...]
    target_db: float
    psnr_above_prior_max: float
    psnr_above_prior_mean: float
    ssim_above_prior_max: float
    ssim_above_prior_mean: float
    amplitude_max: float
    amplitude_mean: float
    samples: int
    noised_samples: int
    met: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; an infinite estimate (no noise, exact recovery) is written as the string "inf"."""
        return {k: (list(v) if isinstance(v, tuple) else "inf" if isinstance(v, float) and math.isinf(v) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeakageEstimate:
        """The estimate :meth:`to_dict` wrote; raises ValueError on a missing or mistyped field."""
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"a leakage estimate has the fields {sorted(names)}, got {sorted(data)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = data[f.name]
            if f.name == "estimators":
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ValueError("leakage estimators must be a list of names")
                value = tuple(value)
            elif f.name in ("threat",):
                if not isinstance(value, str):
                    raise ValueError("leakage threat must be a string")
            elif f.name in ("samples", "noised_samples"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"leakage {f.name} must be an integer >= 0")
            elif f.name == "met":
                if not isinstance(value, bool):
                    raise ValueError("leakage met must be true or false")
            else:
                value = math.inf if value == "inf" else value
                if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                    raise ValueError(f"leakage {f.name} must be a number")
                value = float(value)
            values[f.name] = value
        return cls(**values)


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
