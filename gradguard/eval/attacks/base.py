"""The attack interface: configs, results, the base class and the registry.

Every attack sees only what a client shares: the update, the global model it was computed on
and the update's metadata (batch size, learning rate, local steps). ``reconstruct`` deep-copies
the model, recovers labels when none are given, runs ``restarts`` seeded optimisations and keeps
the one whose matching loss is lowest (Geiping et al.'s choice: the true images are unknown).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradguard.eval.attacks.labels import recover_labels
from gradguard.eval.attacks.observation import Observation, observe
from gradguard.progress import progress_bar
from gradguard.registry import Registry
from gradguard.update import ProtectedUpdate


@dataclass(kw_only=True)
class AttackConfig:
    """Settings every attack shares; subclasses set defaults to the benchmark's full-size run.

    iterations: optimiser steps per restart (0: the attack's starting point).
    restarts: independent seeded runs; the lowest final matching loss wins.
    lr: the optimiser's learning rate.
    seed: restart r is seeded with ``seed + r``.
    device: where the attack runs ("cpu", "cuda", "cuda:1", ...).
    progress: show a tqdm bar per restart.
    """

    iterations: int
    lr: float
    restarts: int = 1
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.restarts < 1:
            raise ValueError(f"iterations must be >= 0 and restarts >= 1, got {self.iterations} and {self.restarts}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class AttackResult:
    """A reconstruction: images [B, C, H, W] in [0, 1] on the CPU and the labels it used.

    ``loss`` is the winning restart's final matching loss, ``history`` its loss per iteration,
    ``seconds`` the wall time of the whole ``reconstruct`` call.
    """

    images: Tensor
    labels: Tensor
    loss: float
    seconds: float
    history: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One restart's outcome, before the best one is chosen."""

    images: Tensor
    loss: float
    history: list[float]


class Attack(ABC):
    """A gradient inversion attack. Subclasses set ``name``, ``config_class`` and ``_restart``."""

    name: ClassVar[str]
    config_class: ClassVar[type[AttackConfig]]

    def __init__(self, config: AttackConfig | None = None, **overrides: Any):
        # AttackConfig itself has required fields (the ignore below); every config_class defaults them all
        config = config if config is not None else self.config_class()  # type: ignore[call-arg]
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        valid = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"{self.config_class.__name__} has no field(s) {unknown}; valid: {sorted(valid)}")
        self.config = dataclasses.replace(config, **overrides)

    def reconstruct(self, *, model: nn.Module, update: ProtectedUpdate, image_shape: tuple[int, int, int],
                    num_classes: int, labels: Tensor | None = None) -> AttackResult:
        """Reconstruct the client's images from ``update`` (computed on ``model``, left untouched)."""
        start = time.perf_counter()
        device = torch.device(self.config.device)
        obs = observe(copy.deepcopy(model).to(device), update, image_shape=image_shape, num_classes=num_classes)
        if labels is None:
            labels = recover_labels(obs)
        elif labels.shape != (obs.batch_size,):
            raise ValueError(f"labels must have shape ({obs.batch_size},) (the update's batch), "
                             f"got {tuple(labels.shape)}")
        labels = labels.to(device=device, dtype=torch.long)
        self._prepare(obs, labels)
        best: Run | None = None
        for restart in range(self.config.restarts):
            generator = torch.Generator().manual_seed(self.config.seed + restart)
            run = self._restart(obs, labels, generator, desc=f"{self.name} {restart + 1}/{self.config.restarts}")
            if best is None or run.loss < best.loss:
                best = run
        assert best is not None  # restarts >= 1
        return AttackResult(images=best.images.detach().clamp(0, 1).cpu(), labels=labels.cpu(), loss=best.loss,
                            seconds=time.perf_counter() - start, history=best.history)

    def _prepare(self, obs: Observation, labels: Tensor) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Work shared by all restarts (e.g. fitting a learned prior); nothing by default."""

    @abstractmethod
    def _restart(self, obs: Observation, labels: Tensor, generator: torch.Generator, *, desc: str) -> Run:
        """One seeded optimisation; ``generator`` (CPU) draws every random number it needs."""

    def _steps(self, desc: str) -> tqdm:
        return progress_bar(range(self.config.iterations), desc=desc, enabled=self.config.progress, leave=False)


ATTACKS: Registry[type[Attack]] = Registry("attack")
AttackT = TypeVar("AttackT", bound=type[Attack])


def register_attack(cls: AttackT) -> AttackT:
    """Class decorator: make ``cls`` available to :func:`build_attack` under ``cls.name``."""
    ATTACKS.add(cls.name, cls)
    return cls


def build_attack(name: str, **kwargs: Any) -> Attack:
    """The attack registered as ``name``; ``kwargs`` are ``config=`` and/or config field overrides."""
    return ATTACKS.lookup(name)(**kwargs)


def random_images(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1] starting images drawn on the CPU (same numbers on every device)."""
    return torch.rand(shape, generator=generator).to(device)

