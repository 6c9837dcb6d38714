"""The defense interface every benchmarked defense implements, its registry and the shared local loop.

A defense turns one client's round (the global model, its batches, the learning rate) into the
update it shares. The benchmark calls every defense the same way, so baselines and GradGuard
differ only in what they do inside :meth:`Defense.local_update`.
"""
from __future__ import annotations

import copy
import json
from abc import ABC
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.eval.attacks.observation import MODEL_MODE_KEY
from gradguard.registry import Registry
from gradguard.update import LeakageEstimate, ProtectedUpdate, UpdateKind, snapshot, weight_delta

Batch = tuple[Tensor, Tensor]
BatchHook = Callable[[int, Tensor, Tensor], None]
"""Called as ``hook(step, images, targets)`` with the batch already on the model's device."""


@dataclass(frozen=True)
class LocalRound:
    """What a defense knows about the round it protects."""

    lr: float
    round: int
    total_rounds: int
    client_id: str
    num_samples: int
    batch_size: int
    sample_ids: tuple[str, ...] | None


def local_sgd(model: nn.Module, batches: Sequence[Batch], *, lr: float,
              optimizer: torch.optim.Optimizer | None = None, forward: nn.Module | None = None,
              before_forward: BatchHook | None = None, after_backward: BatchHook | None = None) -> None:
    """The client's local training: one SGD step of mean cross-entropy per batch, in place.

    ``optimizer`` defaults to plain SGD (no momentum, no weight decay) on ``model``;
    ``forward`` is what computes the logits (default ``model``, e.g. a wrapper around it).
    ``before_forward`` sees each batch before its forward pass, ``after_backward`` after its
    backward pass and before the optimizer step (to change the gradients). The gradients of
    the last step stay in ``p.grad``. The caller sets train or eval mode.
    """
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    forward = forward or model
    device = next(model.parameters()).device
    for step, (images, targets) in enumerate(batches):
        images, targets = images.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        if before_forward is not None:
            before_forward(step, images, targets)
        F.cross_entropy(forward(images), targets).backward()
        if after_backward is not None:
            after_backward(step, images, targets)
        optimizer.step()


def last_gradient(model: nn.Module) -> dict[str, Tensor]:
    """The gradient of the last local step, per trainable parameter, on the CPU."""
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}


def _checked_batches(batches: Sequence[Batch], sample_ids: Sequence[str] | None) -> list[Batch]:
    batches = list(batches)
    if not batches:
        raise ValueError("local_update needs at least one batch of (images, labels)")
    for i, batch in enumerate(batches):
        if len(batch) != 2 or batch[0].ndim < 2 or batch[1].ndim != 1 or len(batch[0]) != len(batch[1]):
            raise ValueError(f"batch {i} must be (images [B, ...], labels [B]) with equal B")
        if batch[1].dtype != torch.long:
            raise ValueError(f"batch {i}'s labels must be class indices (torch.long), got {batch[1].dtype}")
    total = sum(len(b[1]) for b in batches)
    if sample_ids is not None and len(sample_ids) != total:
        raise ValueError(f"sample_ids names {len(sample_ids)} samples but the batches hold {total}")
    return batches


class Defense(ABC):
    """A client-side defense. Subclasses set ``name`` and override ``_train`` and/or ``_protect``.

    ``share``: "delta" (the FedAvg weight update) or "gradient" (the one step's gradient; needs
    exactly one batch). Every constructor argument is recorded in :attr:`params` and in the
    update's metadata, so results say which setting produced them.
    """

    name: ClassVar[str]
    model_mode: ClassVar[str] = "train"  # the mode local training runs in, told to attackers

    def __init__(self, *, share: UpdateKind = "delta", **params: Any):
        if share not in ("delta", "gradient"):
            raise ValueError(f"share must be 'delta' or 'gradient', got {share!r}")
        self.share: UpdateKind = share
        self._params = {"share": share, **params}

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def settings(self) -> dict[str, Any] | None:
        """What the defense's behaviour depends on beyond :attr:`params`, e.g. the defaults a preset
        resolves to; a benchmark's cached run is reused only while they are unchanged. None: only
        the params."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def prepare_model(cls, model: nn.Module, **params: Any) -> nn.Module:
        """The global model a federation of this defense's clients trains, built from ``model``;
        ``params`` are the ones the defense is built with.

        Unchanged by default; a defense whose training cannot run on some layers (DP-SGD and
        BatchNorm) swaps them here, before the first round, so the whole federation and every
        attacker use the same architecture."""
        return model

    def local_update(self, model: nn.Module, batches: Sequence[Batch], *, lr: float, round: int,
                     total_rounds: int, client_id: str, sample_ids: Sequence[str] | None = None
                     ) -> ProtectedUpdate:
        """Train a copy of the global ``model`` on ``batches`` (one SGD step each) and return
        the update to share. ``model`` itself is never changed."""
        batches = _checked_batches(batches, sample_ids)
        if self.share == "gradient" and len(batches) != 1:
            raise ValueError(f"share='gradient' needs exactly one batch, got {len(batches)}; "
                             "use share='delta' for multi-step rounds")
        if lr <= 0 or not 0 <= round <= total_rounds:
            raise ValueError(f"need lr > 0 and 0 <= round <= total_rounds, got lr={lr}, "
                             f"round={round}, total_rounds={total_rounds}")
        context = LocalRound(lr=lr, round=round, total_rounds=total_rounds, client_id=client_id,
                             num_samples=sum(len(b[1]) for b in batches),
                             batch_size=max(len(b[1]) for b in batches),
                             sample_ids=tuple(sample_ids) if sample_ids is not None else None)
        local = copy.deepcopy(model).train()
        tensors = self._protect(self._train(local, batches, context), context)
        epsilon = self.epsilon(delta=self.delta, client_id=client_id) if self.delta is not None else None
        return ProtectedUpdate(
            tensors=tensors, kind=self.share, num_samples=context.num_samples, num_steps=len(batches),
            round=round, client_id=client_id, batch_size=context.batch_size, learning_rate=lr,
            epsilon=epsilon, delta=self.delta,
            metadata={"defense": self.name, "params": json.dumps(self._params, sort_keys=True, default=str),
                      MODEL_MODE_KEY: self.model_mode},
            leakage=self.leakage.get(client_id),
        )

    @property
    def leakage(self) -> dict[str, LeakageEstimate]:
        """Per client, the leakage estimate of its last update (defenses that estimate one)."""
        return {}

    def _train(self, model: nn.Module, batches: list[Batch], context: LocalRound) -> dict[str, Tensor]:
        """Train ``model`` (a private copy, in train mode) and return the raw shared tensors."""
        before = snapshot(model)
        local_sgd(model, batches, lr=context.lr)
        return self.shared_tensors(before, model)

    def shared_tensors(self, before: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        """The update of kind ``self.share`` after training ``model`` from the state ``before``."""
        return weight_delta(before, model) if self.share == "delta" else last_gradient(model)

    def _protect(self, tensors: dict[str, Tensor], context: LocalRound) -> dict[str, Tensor]:
        """Post-process the shared tensors (e.g. add noise); unchanged by default."""
        return tensors

    @property
    def delta(self) -> float | None:
        """The delta of the (epsilon, delta) guarantee for DP defenses, else None."""
        return None

    def epsilon(self, *, delta: float, client_id: str | None = None) -> float | None:
        """Privacy spent so far by ``client_id`` (all clients: the largest) for DP defenses, else None."""
        return None


DEFENSES: Registry[type[Defense]] = Registry("defense")
DefenseT = TypeVar("DefenseT", bound=type[Defense])


def register_defense(cls: DefenseT) -> DefenseT:
    """Class decorator: make ``cls`` available to :func:`build_defense` under ``cls.name``."""
    DEFENSES.add(cls.name, cls)
    return cls


def build_defense(name: str, **params: Any) -> Defense:
    """The defense registered as ``name``, built with ``params``."""
    defense = DEFENSES.lookup(name)
    try:
        return defense(**params)
    except TypeError as err:
        raise TypeError(f"defense {name!r} does not accept {sorted(params)}: {err}") from err

