"""What a benchmark run covers: defense and attack settings (:class:`Spec`), the run's size
(:class:`BenchConfig`) and the named modes."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from gradguard.eval.attacks import ATTACKS
from gradguard.eval.defenses import DEFENSES
from gradguard.eval.models import MODELS
from gradguard.eval.partition import Distribution
from gradguard.eval.report import slugify

Mode = Literal["smoke", "quick", "full"]
_FORMAT = 1

@dataclass(frozen=True)
class Spec:
    """A registered defense or attack by name and the parameters it is built with."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name`` or ``name(key=value,...)``: how tables and plots name this setting."""
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.params.items()))})"

    @property
    def slug(self) -> str:
        """The label as a file name."""
        return slugify(self.label)

    @classmethod
    def parse(cls, text: str) -> "Spec":
        """``"name"`` or ``"name:key=value,key=value"``; values are JSON literals, else strings."""
        name, _, rest = text.partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"bad setting {item!r} in {text!r}; write name:key=value,key=value")
            try:
                params[key] = json.loads(raw)
            except json.JSONDecodeError:
                params[key] = raw
        if not name:
            raise ValueError(f"bad spec {text!r}: it names no defense or attack")
        return cls(name, params)


def _specs(*texts: str) -> tuple[Spec, ...]:
    return tuple(Spec.parse(text) for text in texts)


@dataclass(frozen=True)
class BenchConfig:
    """What a benchmark run covers and how big it is. Defaults are the ``quick`` mode.

    Data and model
        datasets: MedMNIST names (files in ``gradguard.eval.datasets.data_dir()``).
        image_size: images are bilinearly resized from 28 px to this size.
        model, width: "smallcnn" (``width`` channels in its first block), "convnet" (``width``
            channels in each conv layer) or "resnet18".
    Federation
        scale: multiplies the 9-client layout's dataset sizes (the single-image client stays).
        distribution, alpha: IID, or Dirichlet(alpha) non-IID client data.
        rounds: FedAvg rounds; each client trains one local epoch (plain SGD, ``lr``) per round.
        lr_schedule: "constant", or "cosine": round t uses lr (1 + cos(pi (t - 1) / rounds)) / 2,
            so the final global model is not caught mid-oscillation (test accuracy on
            PneumoniaMNIST swings by several points from round to round at a constant lr).
        capture_rounds: rounds whose updates are attacked (1-based); None: first, middle, last.
        clients: attacked client ids; None: the single-image client (the layout's last) and the
            smallest client whose batches hold more than one image.
        seeds: utility is reported over all of them.
        attack_seeds: the runs of the first ``attack_seeds`` seeds are captured and attacked, and
            leakage is averaged over all their captured updates (one run's updates depend on
            which images its single-image client drew: attacking several runs averages that out).
    Defenses and attacks
        defenses, attacks: registered names with parameters (see :class:`Spec`).
    Execution
        device: where training, attacks and LPIPS run ("cpu", "cuda", "cuda:1", ...).
        progress: tqdm bars.
    """

    datasets: tuple[str, ...] = ("pneumoniamnist",)
    image_size: int = 32
    model: str = "smallcnn"
    width: int = 16
    scale: float = 0.1
    distribution: Distribution = "iid"
    alpha: float = 0.5
    rounds: int = 6
    lr: float = 0.03
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    capture_rounds: tuple[int, ...] | None = None
    clients: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    attack_seeds: int = 1
    defenses: tuple[Spec, ...] = _specs(
        "none", "gradguard", "shadowdef", "untargeted", "relevance_only", "shadow_only",
        "dpsgd:noise_multiplier=0.5,max_grad_norm=5", "gaussian:sigma0=0.1", "gaussian:sigma0=1.0",
        "pruning:fraction=0.9", "soteria:score_every=8")
    attacks: tuple[Spec, ...] = _specs("inverting_gradients:iterations=300,restarts=1")
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.datasets:
            problems.append("datasets is empty")
        if self.rounds < 1 or self.scale <= 0 or self.lr <= 0 or self.image_size < 8:
            problems.append("need rounds >= 1, scale > 0, lr > 0 and image_size >= 8")
        if not self.seeds:
            problems.append("seeds is empty")
        elif not 1 <= self.attack_seeds <= len(self.seeds):
            problems.append(f"attack_seeds must lie in 1..{len(self.seeds)} (the number of seeds), "
                            f"got {self.attack_seeds}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.model not in MODELS:
            problems.append(f"model must be one of {MODELS}, got {self.model!r}")
        bad_rounds = [t for t in self.capture_rounds or () if not 1 <= t <= self.rounds]
        if bad_rounds:
            problems.append(f"capture_rounds {bad_rounds} lie outside 1..{self.rounds}")
        unknown = [s.name for s in self.defenses if s.name not in DEFENSES]
        if unknown or not self.defenses:
            problems.append(f"unknown defense(s) {unknown}; registered: {sorted(DEFENSES)}")
        unknown = [s.name for s in self.attacks if s.name not in ATTACKS]
        if unknown or not self.attacks:
            problems.append(f"unknown attack(s) {unknown}; registered: {sorted(ATTACKS)}")
        if len({s.label for s in self.defenses}) != len(self.defenses):
            problems.append("a defense setting is listed twice")
        if problems:
            raise ValueError("invalid benchmark configuration: " + "; ".join(problems))

    def round_lr(self, round_: int) -> float:
        """The clients' learning rate in round ``round_`` (1-based)."""
        if self.lr_schedule == "cosine":
            return self.lr * (1 + math.cos(math.pi * (round_ - 1) / self.rounds)) / 2
        return self.lr

    @property
    def rounds_attacked(self) -> tuple[int, ...]:
        if self.capture_rounds is not None:
            return tuple(sorted(set(self.capture_rounds)))
        return tuple(sorted({1, (self.rounds + 1) // 2, self.rounds}))

    @property
    def seeds_attacked(self) -> tuple[int, ...]:
        return self.seeds[:self.attack_seeds]

    def fingerprint(self) -> dict[str, Any]:
        """The settings every cached cell depends on; a rerun must match them to reuse cells.

        Datasets, defenses, attacks, further seeds and further attacked seeds can be added to an
        existing run."""
        return {"format": _FORMAT, "image_size": self.image_size, "model": self.model,
                "width": self.width if self.model != "resnet18" else None, "scale": self.scale,
                "distribution": self.distribution,
                "alpha": self.alpha if self.distribution == "dirichlet" else None,
                "rounds": self.rounds, "lr": self.lr,
                "lr_schedule": self.lr_schedule if self.lr_schedule != "constant" else None,
                "capture_rounds": list(self.rounds_attacked),
                "clients": list(self.clients) if self.clients else None, "attack_seed": self.seeds[0]}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["defenses"] = [s.label for s in self.defenses]
        data["attacks"] = [s.label for s in self.attacks]
        data["capture_rounds"] = list(self.rounds_attacked)
        return data


# The full mode's own settings: GradGuard's presets, their untargeted ablation and one of each
# baseline. DP-SGD clips at C=5: the median per-sample gradient norm of the (GroupNorm) SmallCNN at
# initialisation is 6.7 on PneumoniaMNIST and 9.7 on RetinaMNIST, and at C=1 training collapsed
# even without noise. Reports with more settings name them in experiment files
# (benchmarks/experiments/paper.toml holds the 28 of benchmarks/results/paper).
_FULL_DEFENSES = _specs(
    "none", "gradguard", "chest_xray", "fundus", "untargeted", "shadowdef",
    "dpsgd:noise_multiplier=0.5,max_grad_norm=5", "gaussian:sigma0=0.1", "pruning:fraction=0.9",
    "soteria:score_every=8")
# DLG (L-BFGS, about 15 s a cell at 30 steps) never beat another attack on a captured update in
# a trial run, so the CPU-sized full mode leaves it out; ``--large`` runs every attack.
_FULL_ATTACKS = _specs("inverting_gradients:iterations=500,restarts=1",
                       "bn_fedavg:iterations=300,restarts=1", "learned_decoder:fit_steps=200,iterations=100")


def mode_config(mode: Mode) -> BenchConfig:
    """The preset of a mode.

    smoke: the test's plumbing check (3 defenses, 2 rounds, a short attack; about a minute).
    quick: every defense on PneumoniaMNIST at 0.1 of the layout (137 training images), 6 rounds
        (cosine learning rate),
        one seed, IG 300 steps; under 10 minutes on 2 CPU cores. With so little data and one
        seed, utility is indicative only (other seeds collapse even without a defense).
    full: both datasets, 10 defense settings, three attacks (IG, BN-aware, learned), SmallCNN at
        32 px, half the layout (681 training images), 20 rounds with a cosine learning rate, 5 seeds. Sized for
        2 CPU cores (one process per dataset; RESULTS.md gives the run time). ``--large`` runs
        the same protocol at the GPU size: ResNet-18 at 64 px, 0.75 of the layout, 40 rounds
        and every attack at its full-size defaults.
    """
    if mode == "quick":
        return BenchConfig()
    if mode == "smoke":
        return BenchConfig(rounds=2, lr=0.05, lr_schedule="constant",
                           defenses=_specs("none", "gradguard", "gaussian:sigma0=1.0"),
                           attacks=_specs("inverting_gradients:iterations=200,restarts=1"))
    if mode == "full":
        return BenchConfig(datasets=("pneumoniamnist", "retinamnist"), scale=0.5, rounds=20, lr=0.02,
                           lr_schedule="cosine", seeds=(0, 1, 2, 3, 4), defenses=_FULL_DEFENSES,
                           attacks=_FULL_ATTACKS)
    raise KeyError(f"unknown mode {mode!r}; choose smoke, quick or full")


# The honest-server attacks a federation's captured FedAvg updates can take at full size: the
# imprint attack needs the malicious server's model and breaching's attacker a single-step update.
_LARGE_ATTACKS = ("bn_fedavg", "dlg", "inverting_gradients", "learned_decoder")


def large(config: BenchConfig) -> BenchConfig:
    """``config`` at the GPU size of the protocol (the ``--large`` option)."""
    return dataclasses.replace(config, image_size=64, model="resnet18", scale=0.75, rounds=40, lr=0.01,
                               attacks=tuple(Spec(name) for name in _LARGE_ATTACKS))

