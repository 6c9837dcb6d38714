"""`gradguard bench`: the evaluation protocol of DESIGN.md end to end, resumable.

For every dataset and defense setting:

1. **train** (one run per seed): FedAvg over the 9-client layout (scaled), one local epoch per
   client and round, the defense producing each client's update. The first seed's run (the first
   ``attack_seeds`` seeds' runs) keeps the updates of the attacked clients at the capture rounds
   (early, middle, last), together with the global model of that round and the client's images:
   what an attacker sees, plus the truth to score it. The final global model is scored on the
   test split.
2. **attack**: every configured attack on every captured update, by registry name; each
   reconstruction is scored in each of the adaptive attacker's variants (denoised, intensity-
   calibrated; :mod:`gradguard.eval.adaptive`), and the strongest
   (higher PSNR) counts.
3. **report**: ``results.json``, a Markdown table per dataset, image grids and a privacy-utility
   plot (:mod:`gradguard.eval.report`).

Every finished unit (a training run, an attack cell) is a file written atomically under
``<out>/cells``, so an interrupted benchmark resumes where it stopped and recomputes nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import shlex
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradguard.eval.adaptive import adaptive_variants
from gradguard.eval.attacks import ATTACKS, build_attack
from gradguard.eval.datasets import DatasetError, ImageSet, load_medmnist
from gradguard.eval.defenses import DEFENSES, GuardedDefense, build_defense
from gradguard.eval.metrics import LPIPSMetric, leakage, pairwise_psnr, utility
from gradguard.eval.models import SmallCNN, build_model
from gradguard.eval.partition import ClientSpec, Distribution, partition_clients
from gradguard.eval.report import slugify, write_report
from gradguard.update import ProtectedUpdate

Mode = Literal["smoke", "quick", "full"]
_FORMAT = 1
# A model whose test accuracy is within this of the majority class's share, or that predicts
# one class for at least _CONSTANT_SHARE of the test images, has collapsed (DESIGN.md).
_COLLAPSE_MARGIN = 0.005
_CONSTANT_SHARE = 0.95


# ---------------------------------------------------------------------------- settings
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
        model, width: "smallcnn" (``width`` channels in its first block) or "resnet18".
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
        if self.model not in ("smallcnn", "resnet18"):
            problems.append(f"model must be 'smallcnn' or 'resnet18', got {self.model!r}")
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
                "width": self.width if self.model == "smallcnn" else None, "scale": self.scale,
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


# GradGuard and its equal-energy untargeted ablation at three amplitudes each (the default is
# 0.3), so every defense can be compared with one of them at matched F1. DP-SGD clips at C=5:
# the median per-sample gradient norm of the (GroupNorm) SmallCNN at initialisation is 6.7 on
# PneumoniaMNIST and 9.7 on RetinaMNIST, and at C=1 training collapsed even without noise. The
# setting without noise or clipping is the control: the GroupNorm model trained by plain SGD.
# The two relevance_class=predicted settings (session 4) test a label-free relevance map, alone
# and with a flatter vulnerability map (temperature 1: the shadow's weight ranges over 1..e).
# P1B (session 5) adds a batch exponent; session 6 tests it with more noise (0.7) and with noise
# that decays over the rounds (amplitude_growth -1: 0.86 in round 1, 0.33 in round 20), since
# seed 0's round-1 update of the single-image client leaked the most. Session 8's presets spend the
# noise on updates that cover few images (update_exponent 0.5): P1U and F7U.
_P1 = "gradguard:relevance_class=predicted,vulnerability_temperature=1.0"
_P1B = f"{_P1},batch_exponent=0.5"
_ALL_DEFENSES_FULL = _specs(
    "none", "gradguard", "gradguard:noise_amplitude=0.15", "gradguard:noise_amplitude=0.5",
    "gradguard:relevance_class=predicted", _P1, f"{_P1B},noise_amplitude=0.6", f"{_P1B},noise_amplitude=0.7",
    f"{_P1B},noise_amplitude=0.9,amplitude_growth=-1.0", f"{_P1},update_exponent=0.5,noise_amplitude=0.9",
    "gradguard:mask_floor=0.7", "gradguard:mask_floor=0.7,noise_amplitude=0.5",
    "gradguard:mask_floor=0.7,update_exponent=0.5,noise_amplitude=1.0",
    "untargeted", "untargeted:noise_amplitude=0.15", "untargeted:noise_amplitude=0.5",
    "untargeted:batch_exponent=0.5,noise_amplitude=0.6", "relevance_only",
    "shadow_only", "dpsgd:noise_multiplier=0,max_grad_norm=1000", "dpsgd:noise_multiplier=0.1,max_grad_norm=5",
    "dpsgd:noise_multiplier=0.5,max_grad_norm=5",
    "gaussian:sigma0=0.1", "gaussian:sigma0=0.5", "pruning:fraction=0.5", "pruning:fraction=0.9",
    "soteria:score_every=8", "shadowdef")
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
    full: both datasets, 28 defense settings, three attacks (IG, BN-aware, learned), SmallCNN at
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
                           lr_schedule="cosine", seeds=(0, 1, 2, 3, 4), defenses=_ALL_DEFENSES_FULL,
                           attacks=_FULL_ATTACKS)
    raise KeyError(f"unknown mode {mode!r}; choose smoke, quick or full")


def large(config: BenchConfig) -> BenchConfig:
    """``config`` at the GPU size of the protocol (the ``--large`` option)."""
    return dataclasses.replace(config, image_size=64, model="resnet18", scale=0.75, rounds=40, lr=0.01,
                               attacks=tuple(Spec(name) for name in sorted(ATTACKS)))


# ---------------------------------------------------------------------------- the cache
def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file and rename it into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n"))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Layout:
    """Where a run keeps its files under ``root``.

    Captures and attack cells of the run's first seed have no seed in their names (caches from
    before several seeds were attacked stay valid); other attacked seeds add ``-seed<N>``."""

    root: Path
    first_seed: int = 0

    def _suffix(self, seed: int) -> str:
        return "" if seed == self.first_seed else f"-seed{seed}"

    def train(self, dataset: str, defense: Spec, seed: int) -> Path:
        return self.root / "cells" / "train" / dataset / defense.slug / f"seed{seed}.json"

    def capture(self, dataset: str, defense: Spec, round_: int, *, seed: int) -> Path:
        return self.root / "captures" / dataset / defense.slug / f"round{round_}{self._suffix(seed)}.pt"

    def attack(self, dataset: str, defense: Spec, attack: Spec, round_: int, client: str, *, seed: int) -> Path:
        return (self.root / "cells" / "attack" / dataset / defense.slug / attack.slug
                / f"round{round_}-{client}{self._suffix(seed)}.json")

    @property
    def run(self) -> Path:
        return self.root / "run.json"


class RunMismatchError(ValueError):
    """The results directory holds a run with other settings; its cells cannot be reused."""


def _check_run(layout: Layout, config: BenchConfig) -> None:
    """Refuse to mix cells of runs whose settings differ."""
    fingerprint = config.fingerprint()
    if layout.run.is_file():
        stored = _read_json(layout.run)
        changed = sorted(k for k in fingerprint.keys() | stored.keys() if stored.get(k) != fingerprint.get(k))
        if changed:
            raise RunMismatchError(f"{layout.root} holds a benchmark run with other settings ({', '.join(changed)}: "
                             f"{ {k: stored.get(k) for k in changed} }); use another --out or the same settings")
    else:
        _write_json(layout.run, fingerprint)


# ---------------------------------------------------------------------------- federation
@dataclass
class Data:
    """A dataset's splits, loaded once per benchmark.

    ``prior`` (the validation split, disjoint from every client's data and from the test split)
    is the attacker's own data: learned attacks fit on it, and its mean image is the reference
    an attacker reaches without any update."""

    train: ImageSet
    test: ImageSet
    prior: ImageSet

    @classmethod
    def load(cls, name: str, size: int) -> "Data":
        return cls(*(load_medmnist(name, split, size=size) for split in ("train", "test", "val")))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def _model(config: BenchConfig, data: Data, defense: Spec) -> nn.Module:
    """The global model of ``defense``'s federation (the defense may swap layers it cannot train)."""
    channels, classes = data.train.channels, data.train.num_classes
    if config.model == "smallcnn":  # build_model has no width; the quick modes need a narrower CNN
        model = SmallCNN(channels, classes, width=config.width)
    else:
        model = build_model(config.model, in_channels=channels, num_classes=classes)
    return DEFENSES[defense.name].prepare_model(model, **defense.params)


def attacked_clients(config: BenchConfig, clients: Sequence[ClientSpec]) -> list[str]:
    """The ids of the clients whose updates are attacked (see :class:`BenchConfig`)."""
    ids = [c.client_id for c in clients]
    if config.clients is not None:
        unknown = [c for c in config.clients if c not in ids]
        if unknown:
            raise ValueError(f"clients {unknown} are not in the layout; its clients are {ids}")
        return list(config.clients)
    # Ties go to the later client: the layout's single-image client is its last one, while a
    # small scale also shrinks earlier clients to one image.
    smallest = min(reversed(clients), key=len)
    batched = [c for c in clients if c.batch_size > 1 and c is not smallest]
    return [smallest.client_id] + ([min(batched, key=len).client_id] if batched else [])


def fedavg(global_state: Mapping[str, Tensor], updates: Sequence[ProtectedUpdate]) -> dict[str, Tensor]:
    """FedAvg's step: ``global_state`` plus the mean of the updates' deltas weighted by their
    ``num_samples`` (accumulated in float64); entries no update carries (integer buffers) stay."""
    if not updates or any(u.kind != "delta" for u in updates):
        raise ValueError("FedAvg needs at least one update, and only weight deltas (kind='delta')")
    total = sum(u.num_samples for u in updates)
    result = dict(global_state)
    for name, value in global_state.items():
        if name in updates[0].tensors:
            mean = sum(u.tensors[name].double() * u.num_samples for u in updates) / total
            result[name] = (value.double() + mean).to(value.dtype)
    return result


def _client_batches(data: ImageSet, client: ClientSpec, *, seed: int, round_: int, index: int
                    ) -> tuple[list[tuple[Tensor, Tensor]], list[str]]:
    """One local epoch: the client's images shuffled (seeded by run, round and client), batched."""
    order = np.random.default_rng([seed, round_, index]).permutation(np.asarray(client.indices))
    batches = [(data.images[chunk], data.labels[chunk])
               for chunk in (torch.from_numpy(order[i:i + client.batch_size])
                             for i in range(0, len(order), client.batch_size))]
    return batches, [f"{data.name}:{i}" for i in order]


def _defense(spec: Spec, seed: int):
    """A fresh defense (its per-client state belongs to one run), seeded by the run's seed."""
    params = dict(spec.params)
    cls = DEFENSES[spec.name]
    if "seed" not in params and (issubclass(cls, GuardedDefense) or "seed" in inspect.signature(cls).parameters):
        params["seed"] = seed
    return build_defense(spec.name, **params)


@torch.no_grad()
def evaluate(model: nn.Module, test: ImageSet, *, device: torch.device, chunk: int = 256) -> dict[str, Any]:
    """Test-split utility of the global model, with the collapse check of DESIGN.md."""
    model.eval()
    preds = torch.cat([model(test.images[i:i + chunk].to(device)).argmax(1).cpu()
                       for i in range(0, len(test), chunk)])
    scores = utility(test.labels, preds, test.num_classes)
    majority = float(torch.bincount(test.labels, minlength=test.num_classes).max()) / len(test)
    constant = float(torch.bincount(preds, minlength=test.num_classes).max()) / len(test)
    collapsed = scores["accuracy"] <= majority + _COLLAPSE_MARGIN or constant >= _CONSTANT_SHARE
    return {**scores, "majority_accuracy": majority, "collapsed": bool(collapsed)}


def train_run(config: BenchConfig, data: Data, spec: Spec, seed: int, layout: Layout, *,
              capture: bool) -> dict[str, Any]:
    """FedAvg with ``spec``'s defense; the run's record (utility, epsilon, seconds).

    With ``capture``, the attacked clients' updates of the capture rounds are saved with the
    round's global model and the clients' images (one file per round, written atomically)."""
    device = torch.device(config.device)
    torch.manual_seed(seed)
    model = _model(config, data, spec).to(device)
    defense = _defense(spec, seed)
    clients = partition_clients(data.train.labels, scale=config.scale, distribution=config.distribution,
                                alpha=config.alpha, seed=seed)
    attacked = set(attacked_clients(config, clients)) if capture else set()
    start = time.perf_counter()
    rounds = tqdm(range(1, config.rounds + 1), desc=f"  train {spec.label} seed {seed}", leave=False,
                  disable=not config.progress)
    for round_ in rounds:
        global_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        updates = []
        for index, client in enumerate(clients):
            batches, ids = _client_batches(data.train, client, seed=seed, round_=round_, index=index)
            updates.append(defense.local_update(model, batches, lr=config.round_lr(round_), round=round_,
                                                total_rounds=config.rounds, client_id=client.client_id,
                                                sample_ids=ids))
        kept = {u.client_id: u for u in updates if u.client_id in attacked and round_ in config.rounds_attacked}
        if kept:
            _save_capture(layout.capture(data.train.name, spec, round_, seed=seed), global_state, kept, data.train,
                          clients)
        model.load_state_dict(fedavg(global_state, updates))
    seconds = time.perf_counter() - start
    epsilon = defense.epsilon(delta=defense.delta) if defense.delta is not None else None
    if epsilon is not None and not math.isfinite(epsilon):
        epsilon = None  # sigma = 0: no guarantee; JSON has no infinity, so a delta without epsilon means unbounded
    return {"dataset": data.train.name, "defense": spec.label, "defense_name": spec.name,
            "defense_params": dict(spec.params), "seed": seed, "rounds": config.rounds,
            **evaluate(model, data.test, device=device), "epsilon": epsilon, "delta": defense.delta,
            "seconds": seconds}


def _save_capture(path: Path, global_state: dict[str, Tensor], updates: dict[str, ProtectedUpdate],
                  train: ImageSet, clients: Sequence[ClientSpec]) -> None:
    by_id = {c.client_id: c for c in clients}
    record = {"global": global_state,
              "updates": {cid: dataclasses.asdict(u) for cid, u in updates.items()},
              "images": {cid: train.images[list(by_id[cid].indices)].clone() for cid in updates},
              "labels": {cid: train.labels[list(by_id[cid].indices)].clone() for cid in updates}}
    _atomic(path, lambda tmp: torch.save(record, tmp))


# ---------------------------------------------------------------------------- attacks
def attack_cell(config: BenchConfig, data: Data, defense: Spec, attack: Spec, round_: int, client: str,
                capture: dict[str, Any], lpips_metric: LPIPSMetric, images_path: Path, *, seed: int) -> dict[str, Any]:
    """Attack one captured update of seed ``seed``'s run; the record scores plain and adaptive
    results, the stronger counts. The attack's own randomness is seeded by ``seed`` too.

    The attacker gets the global model, the update and its metadata; it recovers the labels
    itself, and an attack that learns from data (a ``prior_images`` config field) gets
    ``data.prior``. The chosen reconstruction and, for each image, the client image it matches
    best are saved to ``images_path`` for the report's grids. ``mean_image`` scores the prior's
    mean image, the reference that needs no update."""
    model = _model(config, data, defense)
    model.load_state_dict(capture["global"])
    update = ProtectedUpdate(**capture["updates"][client])
    originals = capture["images"][client]
    overrides = {"device": config.device, "seed": seed, "progress": config.progress}
    if "prior_images" in {f.name for f in dataclasses.fields(ATTACKS[attack.name].config_class)}:
        overrides["prior_images"] = data.prior.images
    result = build_attack(attack.name, **{**overrides, **attack.params}).reconstruct(
        model=model, update=update, image_shape=data.image_shape, num_classes=data.train.num_classes)
    variants = adaptive_variants(result.images, data.prior.images)
    scores = {name: leakage(images, originals, lpips_metric=lpips_metric) for name, images in variants.items()}
    chosen = max(scores, key=lambda name: scores[name]["psnr_best"])
    reconstruction = variants[chosen]
    matched = originals[pairwise_psnr(reconstruction, originals).argmax(dim=1)]
    _atomic(images_path, lambda tmp: torch.save({"reconstruction": reconstruction, "original": matched}, tmp))
    return {"dataset": data.train.name, "defense": defense.label, "defense_name": defense.name,
            "defense_params": dict(defense.params), "attack": attack.label, "attack_name": attack.name,
            "attack_params": dict(attack.params), "seed": seed, "round": round_, "client": client,
            "client_images": len(originals), "client_batch_size": update.batch_size,
            "local_steps": update.num_steps, "reconstructed": len(reconstruction),
            "labels_recovered": sorted(result.labels.tolist()), **scores[chosen], "variant": chosen,
            "variants": scores, "attack_seconds": result.seconds,
            "mean_image": leakage(data.prior.images.mean(dim=0, keepdim=True), originals, lpips_metric=lpips_metric)}


# ---------------------------------------------------------------------------- the benchmark
@dataclass
class BenchOutcome:
    """What one invocation did: the results file and how many units it computed (0 on a full resume)."""

    results: Path
    trained: int
    attacked: int
    files: list[Path]


class _Runner:
    """One invocation over a cache: computes what is missing, counts it, reads back the rest."""

    def __init__(self, config: BenchConfig, layout: Layout, bar: tqdm):
        self.config, self.layout, self.bar = config, layout, bar
        self.trained = self.attacked = 0
        self._lpips: LPIPSMetric | None = None  # loaded when the first attack cell is computed

    def runs(self, data: Data, defense: Spec, targets: list[str]) -> list[dict[str, Any]]:
        """The training records of every seed; an attacked seed's run is redone when a capture
        that a missing attack cell needs is gone (or was never kept: a seed attacked only now)."""
        config, layout, name = self.config, self.layout, data.train.name
        records = []
        for seed in config.seeds:
            path = layout.train(name, defense, seed)
            capture = seed in config.seeds_attacked
            needed = {round_ for round_ in config.rounds_attacked for client in targets for attack in config.attacks
                      if not layout.attack(name, defense, attack, round_, client, seed=seed).is_file()
                      } if capture else set()
            lost = any(not layout.capture(name, defense, r, seed=seed).is_file() for r in needed)
            if not path.is_file() or lost:
                self.bar.set_postfix_str(f"{name} {defense.label} train seed {seed}")
                _write_json(path, train_run(config, data, defense, seed, layout, capture=capture))
                self.trained += 1
            records.append(_read_json(path))
            self.bar.update()
        return records

    def cells(self, data: Data, defense: Spec, targets: list[str]) -> list[dict[str, Any]]:
        """The attack records of every attacked seed's captured updates and every attack, with
        their images' path."""
        config, layout, name = self.config, self.layout, data.train.name
        records = []
        for seed in config.seeds_attacked:
            for round_ in config.rounds_attacked:
                capture = None  # loaded once per round, only if a cell of it is missing
                for client in targets:
                    for attack in config.attacks:
                        path = layout.attack(name, defense, attack, round_, client, seed=seed)
                        if not path.is_file():
                            self.bar.set_postfix_str(f"{name} {defense.label} {attack.label} seed {seed} "
                                                     f"r{round_} {client}")
                            if capture is None:
                                capture = torch.load(layout.capture(name, defense, round_, seed=seed),
                                                     weights_only=True)
                            self._lpips = self._lpips or LPIPSMetric(device=config.device)
                            _write_json(path, attack_cell(config, data, defense, attack, round_, client, capture,
                                                          self._lpips, path.with_suffix(".pt"), seed=seed))
                            self.attacked += 1
                        images = path.with_suffix(".pt").relative_to(layout.root)
                        # Cells from before several seeds were attacked carry no seed: the first one's.
                        records.append({**_read_json(path), "seed": seed, "images": str(images)})
                        self.bar.update()
        return records


def run_bench(config: BenchConfig, out: str | Path, *, report_dir: str | Path | None = None,
              command: str | None = None) -> BenchOutcome:
    """Run (or resume) the benchmark with its cache in ``out``; write results.json, tables and
    figures to ``report_dir`` (default ``out``)."""
    layout = Layout(Path(out), first_seed=config.seeds[0])
    _check_run(layout, config)
    datasets = {name: Data.load(name, config.image_size) for name in config.datasets}
    targets = {name: attacked_clients(config, partition_clients(
        data.train.labels, scale=config.scale, distribution=config.distribution, alpha=config.alpha,
        seed=config.seeds[0])) for name, data in datasets.items()}
    units = sum(len(config.defenses) * (len(config.seeds) + config.attack_seeds * len(config.rounds_attacked)
                                         * len(targets[name]) * len(config.attacks)) for name in datasets)
    runs: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    with tqdm(total=units, desc="bench", disable=not config.progress) as bar:
        runner = _Runner(config, layout, bar)
        for name, data in datasets.items():
            for defense in config.defenses:
                runs += runner.runs(data, defense, targets[name])
                cells += runner.cells(data, defense, targets[name])
    results = {"command": command, "config": config.to_dict(), "fingerprint": config.fingerprint(),
               "computed": {"train_runs": runner.trained, "attack_cells": runner.attacked},
               "runs": runs, "cells": cells}
    report_root = Path(report_dir) if report_dir is not None else layout.root
    files = write_report(results, report_root, cache=layout.root)
    return BenchOutcome(results=report_root / "results.json", trained=runner.trained, attacked=runner.attacked,
                        files=files)


# ---------------------------------------------------------------------------- CLI
def _auto_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gradguard bench: --device {name} asked for CUDA, but torch sees no GPU; use --device cpu")
    return name


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The mode's preset with every option the user gave applied on top."""
    config = mode_config(args.mode)
    if args.large:
        config = large(config)
    changes: dict[str, Any] = {"device": _auto_device(args.device), "progress": not args.no_progress}
    for option in ("datasets", "image_size", "model", "width", "scale", "distribution", "rounds", "lr", "lr_schedule",
                   "capture_rounds", "clients"):
        value = getattr(args, option)
        if value is not None:
            changes[option] = tuple(value) if isinstance(value, list) else value
    if args.defenses is not None:
        changes["defenses"] = _specs(*args.defenses)
    attacks = _specs(*args.attacks) if args.attacks is not None else config.attacks
    if args.attack_iterations is not None:
        attacks = tuple(Spec(a.name, {**a.params, "iterations": args.attack_iterations}) for a in attacks)
    changes["attacks"] = attacks
    if args.seed is not None or args.seeds is not None:
        first = args.seed if args.seed is not None else config.seeds[0]
        changes["seeds"] = tuple(range(first, first + (args.seeds or len(config.seeds))))
    if args.attack_seeds is not None:
        changes["attack_seeds"] = args.attack_seeds
    return dataclasses.replace(config, **changes)


def _main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"gradguard bench: {err}") from None
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        outcome = run_bench(config, args.out, report_dir=args.report_dir,
                            command="gradguard " + shlex.join(getattr(args, "argv", ["bench"])))
    except (DatasetError, RunMismatchError) as err:  # the message names the file or settings and the fix
        raise SystemExit(f"gradguard bench: {err}") from None
    print(f"gradguard bench: {outcome.trained} training runs and {outcome.attacked} attack cells computed "
          f"in {time.perf_counter() - start:.0f} s; results in {outcome.results}")
    for path in outcome.files:
        print(f"  {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the evaluation protocol: FedAvg, defenses, attacks, leakage and utility",
        description=__doc__.split("\n\n")[0] + " Options left out take the mode's values "
                    "(see gradguard.eval.bench.mode_config).")
    modes = parser.add_mutually_exclusive_group()
    for mode, text in (("smoke", "the test's plumbing check (about a minute)"),
                       ("quick", "every defense, small (the default; < 10 min on 2 CPU cores)"),
                       ("full", "both datasets, 28 defense settings, 3 attacks, 5 seeds (about 160 minutes per "
                                "dataset on a CPU core)")):
        modes.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=text)
    parser.set_defaults(mode="quick", func=_main)
    parser.add_argument("--large", action="store_true",
                        help="the GPU size: ResNet-18 at 64 px, 0.75 of the layout, 40 rounds, full-size attacks")
    parser.add_argument("--out", default="bench-out", help="results and cache directory; a rerun resumes it")
    parser.add_argument("--report-dir", help="write results.json, tables and figures here instead of --out "
                                             "(the cache of cells and captured updates stays in --out)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, help="first seed")
    parser.add_argument("--seeds", type=int, help="number of seeds (utility is averaged over them)")
    parser.add_argument("--attack-seeds", type=int, metavar="N",
                        help="attack the runs of the first N seeds (default 1); leakage is averaged over all "
                             "their captured updates")
    parser.add_argument("--datasets", nargs="+", metavar="NAME")
    parser.add_argument("--defenses", nargs="+", metavar="SPEC",
                        help=f"name or name:key=value,...; registered: {', '.join(sorted(DEFENSES))}")
    parser.add_argument("--attacks", nargs="+", metavar="SPEC",
                        help=f"name or name:key=value,...; registered: {', '.join(sorted(ATTACKS))}")
    parser.add_argument("--attack-iterations", type=int, help="iterations of every attack")
    parser.add_argument("--model", choices=("smallcnn", "resnet18"))
    parser.add_argument("--width", type=int, help="SmallCNN width")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--scale", type=float, help="fraction of the 9-client layout's dataset sizes")
    parser.add_argument("--distribution", choices=("iid", "dirichlet"))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--lr", type=float, help="clients' SGD learning rate")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), help="learning rate over the rounds")
    parser.add_argument("--capture-rounds", type=int, nargs="+", metavar="T", help="rounds attacked (1-based)")
    parser.add_argument("--clients", nargs="+", metavar="ID", help="attacked client ids, e.g. client9 client1")
    # The models and batches are small: one thread per process is as fast, and on a shared
    # machine several threads contend for busy cores (IG measured at 40 vs ~1 step/s).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
