"""The demo's settings: one dataclass with documented defaults, sized for 2 CPU cores."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gradguard import GuardConfig
from gradguard.config import CalibrationConfig


@dataclass(frozen=True)
class DemoConfig:
    """What ``gradguard demo`` runs. The defaults finish in a few minutes on 2 CPU cores.

    Data
        dataset: the MedMNIST file (``<name>.npz``) the federation trains on.
        image_size: images are bilinearly resized from 28 px to this size.
        download: fetch the file through the ``medmnist`` package when no local copy is found;
            without data the demo runs only the attack part, on images shipped inside wheels.
    Federation
        clients: GradGuard clients, each a thread talking gRPC to the in-process aggregator.
        images_per_client, batch_size: each client's local data (IID split) and its batch.
        rounds: FedAvg rounds; every client trains ``local_epochs`` epochs per round with Adam
            (``lr``), which learns reliably in this few-step regime where plain SGD often collapses
            to the majority class.
        model_width: channels of the SmallCNN's first block (it doubles twice).
    Defenses
        preset: the GradGuard preset (:meth:`gradguard.GuardConfig.preset`) of the GradGuard
            clients; "default" is ``GuardConfig()``.
        dpsgd_noise_multiplier, dpsgd_max_grad_norm: Opacus DP-SGD, the comparison's baseline.
        Each defense (none, GradGuard, DP-SGD) trains its own federation of the same clients, so
        the report sets each one's utility beside its leakage.
    Attack
        attack_iterations: Inverting Gradients steps (one restart) per defense; the attack sees
            client 1's batch-1 update of one of its images on the GradGuard federation's final
            global model, the same update under each defense. The GradGuard clients' probe runs
            the same attack at this budget, at most 500 (:attr:`probe_steps`).
    Other
        figure_images: images in the mask figure.
        threads: torch's intra-op threads (torch.set_num_threads); 1 suits this small model, whose
            parallelism is the client threads (on a busy 2-core machine two threads per op made
            the attack 30x slower); 0 keeps torch's default.
        seed: seeds the model, the split, the loaders, the guards' noise and shadows, DP-SGD and the
            attack: the same seed gives the same report, figure for figure.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
        progress: tqdm bars for the rounds and the attacks.
    """

    dataset: str = "pneumoniamnist"
    image_size: int = 32
    download: bool = True

    clients: int = 3
    images_per_client: int = 64
    batch_size: int = 8
    rounds: int = 5
    local_epochs: int = 2
    lr: float = 1e-3
    model_width: int = 32

    preset: str = "default"
    dpsgd_noise_multiplier: float = 1.0
    dpsgd_max_grad_norm: float = 1.0

    attack_iterations: int = 1000

    figure_images: int = 4
    threads: int = 1
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        GuardConfig.preset(self.preset)  # an unknown name raises ConfigError, naming the nearest preset
        checks = {
            "image_size": self.image_size >= 8,
            "clients": self.clients >= 1,
            "images_per_client": self.images_per_client >= 1,
            "batch_size": 1 <= self.batch_size <= self.images_per_client,
            "rounds": self.rounds >= 1,
            "local_epochs": self.local_epochs >= 1,
            "lr": self.lr > 0,
            "model_width": self.model_width >= 1,
            "attack_iterations": self.attack_iterations >= 1,
            "dpsgd_noise_multiplier": self.dpsgd_noise_multiplier >= 0,
            "dpsgd_max_grad_norm": self.dpsgd_max_grad_norm > 0,
            "figure_images": 1 <= self.figure_images <= self.images_per_client,
            "threads": self.threads >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid DemoConfig field(s) {bad}: see the DemoConfig docstring "
                             "(batch_size and figure_images may not exceed images_per_client)")

    @property
    def probe_steps(self) -> int:
        """The GradGuard clients' probe budget: the demo's own attack, at most the default's 500
        (a demo shortened with ``attack_iterations`` probes as briefly as it attacks)."""
        return min(CalibrationConfig().probe_steps, self.attack_iterations)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
