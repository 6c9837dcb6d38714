"""Experiment files: the leakage benchmark's settings, defenses and attacks as TOML.

An experiment file (``benchmarks/experiments/*.toml``) names everything one report covers, so a
report is rerun by ``gradguard bench --experiment FILE`` and its settings are read, not
reconstructed from a command line. Layout::

    name = "leakage"
    datasets = ["pneumoniamnist", "retinamnist"]   # MedMNIST names or paths of .npz files
    image_size = 32
    attack_seeds = 3          # client draws attacked per setting and defense
    distractors = 100         # re-identification gallery: the client's images plus these
    defenses = ["none", "gradguard", "dpsgd:noise_multiplier=0.5,max_grad_norm=5", ...]
    attacks = ["inverting_gradients:iterations=1000"]

    [utility]                 # F1 of every defense: FedAvg over the 9-client layout
    model = "convnet"
    rounds = 20
    seeds = 5

    [[settings]]              # one threat model and victim
    name = "fedsgd-b1-convnet-untrained"
    share = "gradient"
    images = 1
    batch_size = 1

A file with ``kind = "federation"`` describes a report of the federation benchmark instead
(``gradguard bench`` without an experiment: FedAvg over the client layout, captured updates
attacked): ``mode`` ("smoke", "quick" or "full") and any :class:`BenchConfig` field, with
``seeds`` a count; options given on the command line still apply on top.

Every key is checked when the file is read; a typo is named with the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gradguard.eval.attacks import ATTACKS
from gradguard.eval.bench.spec import BenchConfig, Spec
from gradguard.eval.defenses import DEFENSES
from gradguard.eval.models import MODELS

Threat = Literal["honest_server", "malicious_server"]
THREATS: tuple[Threat, ...] = ("honest_server", "malicious_server")


class ExperimentError(ValueError):
    """An experiment file that cannot be run; the message lists every problem and its fix."""


@dataclass(frozen=True)
class LeakageSetting:
    """One threat model and victim: whose update is attacked, on which model, after what training.

    name: how tables name the row, e.g. ``fedsgd-b1-convnet-untrained``.
    threat: "honest_server" attacks the update of the federation's model; "malicious_server"
        hands the client a model with an imprint module in front of the victim (Fowl et al.,
        "Robbing the Fed", ICLR 2022), which recovers its inputs exactly.
    model, width: the victim (:data:`gradguard.eval.models.MODELS`); width None: the model's own.
    image_size: None takes the experiment's.
    share: "gradient" (FedSGD: one gradient over ``images``) or "delta" (FedAvg: the weight
        change after ``local_epochs`` epochs over ``images`` in batches of ``batch_size``).
    trained_steps: plain SGD steps (batch 32, on training images no client of the setting holds)
        before the attacked round: 0 attacks an untrained model, a few dozen an early-round one.
    lr: the client's learning rate in the attacked round (and of the pre-training).
    attacks: None runs the experiment's attacks; a list replaces them for this setting.
    defenses: None runs every defense of the experiment; a list runs only those (and their twins),
        e.g. the baselines alone on a setting that leaks nothing undefended.
    """

    name: str
    threat: Threat = "honest_server"
    model: str = "convnet"
    width: int | None = None
    image_size: int | None = None
    share: Literal["gradient", "delta"] = "gradient"
    images: int = 1
    batch_size: int = 1
    local_epochs: int = 1
    trained_steps: int = 0
    lr: float = 0.05
    attacks: tuple[Spec, ...] | None = None
    defenses: tuple[Spec, ...] | None = None

    def problems(self) -> list[str]:
        found = []
        if self.threat not in THREATS:
            found.append(f"setting {self.name!r}: threat {self.threat!r} is not one of {THREATS}")
        if self.model not in MODELS:
            found.append(f"setting {self.name!r}: model {self.model!r} is not one of {MODELS}")
        if self.share not in ("gradient", "delta"):
            found.append(f"setting {self.name!r}: share must be 'gradient' or 'delta', got {self.share!r}")
        if self.images < 1 or not 1 <= self.batch_size <= self.images:
            found.append(f"setting {self.name!r}: need images >= 1 and 1 <= batch_size <= images")
        if self.share == "gradient" and (self.batch_size != self.images or self.local_epochs != 1):
            found.append(f"setting {self.name!r}: a gradient is one step, so batch_size must equal images "
                         "and local_epochs be 1; use share = \"delta\" for several steps")
        if self.local_epochs < 1 or self.trained_steps < 0 or self.lr <= 0:
            found.append(f"setting {self.name!r}: need local_epochs >= 1, trained_steps >= 0 and lr > 0")
        found += _unknown_specs(self.attacks or (), ATTACKS, f"setting {self.name!r}: attack")
        found += _unknown_specs(self.defenses or (), DEFENSES, f"setting {self.name!r}: defense")
        return found

    def runs(self, defense: Spec, twin_of: str | None) -> bool:
        """Whether this setting attacks ``defense`` (the twin of ``twin_of``, if any)."""
        if self.defenses is None:
            return True
        labels = {spec.label for spec in self.defenses}
        return defense.label in labels or twin_of in labels

    @property
    def steps(self) -> int:
        return self.local_epochs * -(-self.images // self.batch_size)


@dataclass(frozen=True)
class Experiment:
    """A leakage report: datasets, settings, defenses (twins are added), attacks and the utility run.

    utility: the federation (a :class:`BenchConfig`) whose final test F1 every defense is scored
    by, over ``utility.seeds``; its ``defenses`` and ``attacks`` are unused.
    utility_results: ``results.json`` files of federation reports (paths relative to the
        experiment file) whose measured runs give each defense's F1 instead of training it
        again; a defense none of them measured gets no F1. Empty: train ``utility``.
    denoiser_steps: training steps of the attacker's known-noise denoiser (one per dataset,
        setting and input-noise defense).
    """

    name: str
    datasets: tuple[str, ...]
    settings: tuple[LeakageSetting, ...]
    defenses: tuple[Spec, ...]
    attacks: tuple[Spec, ...]
    utility: BenchConfig
    image_size: int = 32
    attack_seeds: int = 3
    distractors: int = 100
    denoiser_steps: int = 300
    utility_results: tuple[Path, ...] = ()
    device: str = "cpu"
    progress: bool = True
    source: str | None = field(default=None, compare=False)

    def attacks_of(self, setting: LeakageSetting) -> tuple[Spec, ...]:
        return setting.attacks if setting.attacks is not None else self.attacks


_TOP_KEYS = {"kind", "name", "datasets", "image_size", "attack_seeds", "distractors", "denoiser_steps", "defenses",
             "attacks", "utility", "settings"}
_UTILITY_KEYS = {"model", "width", "scale", "distribution", "alpha", "rounds", "lr", "lr_schedule", "seeds", "results"}


def _unknown(keys: set[str], valid: set[str], where: str) -> list[str]:
    out = []
    for key in sorted(keys - valid):
        close = difflib.get_close_matches(key, sorted(valid), n=1)
        out.append(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                      f"; valid keys: {sorted(valid)}"))
    return out


def _unknown_specs(specs: tuple[Spec, ...], registry: Any, what: str) -> list[str]:
    out = []
    for spec in specs:
        if spec.name not in registry:
            close = difflib.get_close_matches(spec.name, sorted(registry), n=1)
            out.append(f"{what} {spec.name!r} is not registered" + (f" (did you mean {close[0]!r}?)" if close else
                                                                    f"; registered: {sorted(registry)}"))
    return out


def _specs(values: Any, where: str, problems: list[str]) -> tuple[Spec, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        problems.append(f"{where} must be a list of strings like \"name:key=value\"")
        return ()
    out = []
    for text in values:
        try:
            out.append(Spec.parse(text))
        except ValueError as err:
            problems.append(f"{where}: {err}")
    return tuple(out)


def _read(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} not found; the shipped ones are in benchmarks/experiments/")
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ExperimentError(f"{path} is not valid TOML: {err}") from None


def experiment_kind(path: str | Path) -> Literal["leakage", "federation"]:
    """What an experiment file describes: the leakage benchmark (the default) or a federation report."""
    path, raw = _read(path)
    kind = raw.get("kind", "leakage")
    if kind not in ("leakage", "federation"):
        raise ExperimentError(f"{path}: kind must be \"leakage\" or \"federation\", got {kind!r}")
    return kind


_FEDERATION_KEYS = {"kind", "name", "mode", "seeds", "attack_seeds", "datasets", "clients", "defenses", "attacks",
                    "image_size", "model", "width", "scale", "distribution", "alpha", "rounds", "lr", "lr_schedule",
                    "capture_rounds"}


def load_federation(path: str | Path) -> BenchConfig:
    """A federation report's configuration: its mode's preset with the file's fields on top."""
    from gradguard.eval.bench.spec import mode_config

    path, raw = _read(path)
    problems = _unknown(set(raw), _FEDERATION_KEYS, str(path))
    changes: dict[str, Any] = {}
    for key in ("defenses", "attacks"):
        if key in raw:
            changes[key] = _specs(raw[key], f"{path}: {key}", problems)
    problems += _unknown_specs(changes.get("defenses", ()), DEFENSES, f"{path}: defense")
    problems += _unknown_specs(changes.get("attacks", ()), ATTACKS, f"{path}: attack")
    for key in _FEDERATION_KEYS - {"kind", "name", "mode", "defenses", "attacks"}:
        if key in raw:
            value = raw[key]
            changes[key] = tuple(range(value)) if key == "seeds" else (tuple(value) if isinstance(value, list)
                                                                        else value)
    try:
        base = mode_config(raw.get("mode", "quick"))
    except KeyError as err:
        problems.append(f"{path}: {err}")
    if problems:
        raise ExperimentError("the experiment cannot run:\n  - " + "\n  - ".join(problems))
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as err:
        raise ExperimentError(f"{path}: {err}") from None


def load_experiment(path: str | Path, *, device: str = "cpu", progress: bool = True,
                    datasets: tuple[str, ...] | None = None) -> Experiment:
    """Read and check an experiment file; ``datasets`` replaces the file's (``--data``)."""
    path, raw = _read(path)
    problems = _unknown(set(raw), _TOP_KEYS, str(path))
    defenses = _specs(raw.get("defenses", ["none"]), f"{path}: defenses", problems)
    attacks = _specs(raw.get("attacks", []), f"{path}: attacks", problems)
    problems += _unknown_specs(defenses, DEFENSES, f"{path}: defense")
    problems += _unknown_specs(attacks, ATTACKS, f"{path}: attack")
    utility_raw = raw.get("utility", {})
    problems += _unknown(set(utility_raw), _UTILITY_KEYS, f"{path} [utility]")
    settings = []
    for i, entry in enumerate(raw.get("settings", [])):
        where = f"{path} [[settings]] #{i + 1}"
        valid = {f.name for f in dataclasses.fields(LeakageSetting)}
        problems += _unknown(set(entry), valid, where)
        if "name" not in entry:
            problems.append(f"{where}: every setting needs a name")
            continue
        entry = {k: v for k, v in entry.items() if k in valid}
        for key in ("attacks", "defenses"):
            if key in entry:
                entry[key] = _specs(entry[key], f"{where}: {key}", problems)
        try:
            setting = LeakageSetting(**entry)
        except TypeError as err:
            problems.append(f"{where}: {err}")
            continue
        problems += setting.problems()
        settings.append(setting)
    if not settings:
        problems.append(f"{path}: no [[settings]]; add at least one threat model and victim")
    if len({s.name for s in settings}) != len(settings):
        problems.append(f"{path}: two settings share a name")
    if not attacks and any(s.attacks is None for s in settings):
        problems.append(f"{path}: attacks is empty and a setting names none of its own")
    image_size = raw.get("image_size", 32)
    utility = None
    if not problems:
        seeds = int(utility_raw.get("seeds", 5))
        fields = {k: v for k, v in utility_raw.items() if k not in ("seeds", "results")}
        try:
            utility = BenchConfig(datasets=datasets or tuple(raw.get("datasets", ())), image_size=image_size,
                                  seeds=tuple(range(seeds)), device=device, progress=progress,
                                  defenses=defenses, attacks=attacks or (Spec("inverting_gradients"),), **fields)
        except (TypeError, ValueError) as err:
            problems.append(f"{path} [utility]: {err}")
    results = tuple(path.parent / p for p in utility_raw.get("results", []))
    problems += [f"{path} [utility] results: {p} not found" for p in results if not p.is_file()]
    if problems:
        raise ExperimentError("the experiment cannot run:\n  - " + "\n  - ".join(problems))
    assert utility is not None
    return Experiment(name=str(raw.get("name", path.stem)), datasets=utility.datasets, settings=tuple(settings),
                      defenses=defenses, attacks=attacks, utility=utility, image_size=image_size,
                      attack_seeds=int(raw.get("attack_seeds", 3)), distractors=int(raw.get("distractors", 100)),
                      denoiser_steps=int(raw.get("denoiser_steps", 300)), utility_results=results,
                      device=device, progress=progress,
                      source=str(path))
