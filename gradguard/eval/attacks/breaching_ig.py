"""A peer attack: breaching's own Inverting-Gradients attacker (Geiping et al.,
https://github.com/JonasGeiping/breaching), driven on a FedSGD update.

breaching (PyPI ``breaching``, an optional extra: ``pip install "gradguard[breaching]"``) is
imported only when the attack runs. Its ``breaching.attacks.prepare_attack`` builds the
optimisation-based attacker from its ``invertinggradients`` attack config (cosine gradient
matching, signed Adam with step decay, a box constraint, total variation), and its
``reconstruct`` receives the global model's parameters, the shared gradient and the labels,
the way breaching's own server hands them over.

breaching's total variation convolves three channels (one filter group per RGB channel), so a
grey victim is attacked through an RGB view: breaching optimises a 3-channel image, the victim
sees its channel mean, and the reconstruction returned is that mean.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor, nn

from gradguard.eval.attacks.base import Attack, AttackConfig, Run, register_attack
from gradguard.eval.attacks.observation import Observation


def import_breaching() -> ModuleType:
    """The breaching package, or an ImportError that says how to install it."""
    try:
        with warnings.catch_warnings():  # its TorchScript decorators warn on import with torch >= 2.10
            warnings.simplefilter("ignore", FutureWarning)
            import breaching
    except ImportError as err:
        raise ImportError('the breaching_ig attack needs the breaching package: pip install "gradguard[breaching]"'
                          ) from err
    return breaching


class GreyFromRGB(nn.Module):
    """The victim behind an RGB view: an RGB image goes in as its channel mean."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.mean(dim=1, keepdim=True))


@dataclass(kw_only=True)
class BreachingConfig(AttackConfig):
    """breaching's ``invertinggradients`` attack config, with these overrides. Defaults are the
    benchmark's full-size run.

    iterations=2000: breaching's config runs 24000 steps (ImageNet); on 32 px images the
        loss has plateaued long before, as for :class:`InvertingConfig`.
    lr=0.1: breaching's step size (signed Adam, step decay at 3/8, 5/8 and 7/8 of the run).
    tv_weight=1e-2: the total variation scale. breaching's config has 0.2, which over-smooths
        32 px grey images: on an untrained ConvNet at batch 1 (200 steps, PneumoniaMNIST) it
        gave 15-31 dB, 1e-2 about 41 dB.
    """

    iterations: int = 2000
    lr: float = 0.1
    tv_weight: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tv_weight < 0:
            raise ValueError(f"tv_weight must be >= 0, got {self.tv_weight}")


@register_attack
class BreachingInvertingGradients(Attack):
    """breaching's optimisation-based attacker on a gradient (or a one-step delta); each restart
    is one breaching trial, seeded from the restart's generator."""

    name = "breaching_ig"
    config_class = BreachingConfig
    config: BreachingConfig

    def _restart(self, obs: Observation, labels: Tensor, generator: torch.Generator, *, desc: str) -> Run:
        if obs.num_steps != 1:
            raise ValueError(f"breaching_ig attacks one gradient (FedSGD or a one-step delta); this update has "
                             f"{obs.num_steps} local steps: use inverting_gradients with simulate_steps=True")
        channels, height, width = obs.image_shape
        if channels not in (1, 3):
            raise ValueError(f"breaching's total variation needs 1 (grey, seen as RGB) or 3 channels, got {channels}")
        names = [name for name, _ in obs.model.named_parameters()]
        if names != list(obs.target):
            raise ValueError("breaching matches the gradient of every parameter of the model; "
                             "unfreeze the model's parameters (requires_grad) or use inverting_gradients")
        breaching = import_breaching()
        victim = GreyFromRGB(obs.model) if channels == 1 else obs.model
        cfg = self.config
        # breaching prints which config it loaded, and hydra warns that breaching names no version_base.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            attack_config = breaching.get_attack_config("invertinggradients", overrides=[
                f"optim.max_iterations={cfg.iterations}", f"optim.step_size={cfg.lr}",
                f"regularization.total_variation.scale={cfg.tv_weight}", "restarts.num_trials=1"])
        attacker = breaching.attacks.prepare_attack(victim, nn.CrossEntropyLoss(), attack_config,
                                                    dict(device=obs.device, dtype=torch.float))
        # Without buffers breaching runs the model in train mode, as the client's train-mode step.
        buffers = None if obs.train_mode else [b.detach() for b in victim.buffers()]
        payload = [dict(parameters=[p.detach() for p in victim.parameters()], buffers=buffers,
                        metadata=SimpleNamespace(shape=(3, height, width), modality="vision"))]
        shared = [dict(gradients=[obs.target[name] for name in names], buffers=None,
                       metadata=dict(num_data_points=obs.batch_size, labels=labels, local_hyperparams=None))]
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[obs.device] if obs.device.type == "cuda" else []):
            torch.manual_seed(seed)  # breaching draws its starting image from the global generator
            data, stats = attacker.reconstruct(payload, shared, {}, dryrun=False)
        images = data["data"].mean(dim=1, keepdim=True) if channels == 1 else data["data"]
        return Run(images=images.detach(), loss=float(stats["opt_value"]), history=list(stats["Trial_0_Val"]))
