"""The leakage benchmark: leakage above the attacker's prior where undefended updates really leak.

For every dataset, setting (threat model and victim, :class:`LeakageSetting`) and defense, the
first ``attack_seeds`` seeds each draw a client's images, compute the update the defense shares
and attack it with every attack; a reconstruction is scored plain and in every adaptive
variant (denoised, calibrated; the attacker who knows the defense's noise model where it has
one), and per metric the strongest of all counts. Each is scored **above the attacker's prior**:
the better of the public mean image and the class-conditional mean image of the labels the
update reveals (iDLG), scored by the same protocol. Re-identification asks whether the
reconstruction's SSIM-nearest neighbour among the client's images and ``distractors`` other
training images is its own original.

Every GradGuard setting gets its **equal-energy twin**: the ``untargeted`` preset with the same
noise fields and seed (shadow and relevance map off). Both are attacked on the same updates'
images, so they are compared update by update (mean and sd of the difference, a sign test),
and their realised input-noise energy is measured on the update's own steps.

Utility comes from FedAvg over the client layout (:func:`train_run`) with the experiment's
``[utility]`` federation, over its seeds. Cells and runs are cached under ``out`` as in
``gradguard bench``, so a run resumes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from gradguard.config import GuardConfig, derive_seed
from gradguard.eval.adaptive import adaptive_variants
from gradguard.eval.attacks import ATTACKS, build_attack, observe, recover_labels
from gradguard.eval.bench.cache import Layout, _check_run, _read_json, _write_json
from gradguard.eval.bench.experiment import Experiment, LeakageSetting
from gradguard.eval.bench.federation import Data, _defense, cached_run, defense_settings, train_run
from gradguard.eval.bench.spec import Spec
from gradguard.eval.defenses import DEFENSES, GuardedDefense, UntargetedDefense
from gradguard.eval.known_noise import DenoiserConfig, KnownNoiseDenoiser, gradguard_noise
from gradguard.eval.metrics import (
    LPIPSMetric,
    above_prior,
    leakage,
    prior_guesses,
    reidentification,
    reidentification_chance,
    strongest_prior,
)
from gradguard.eval.models import build_model
from gradguard.progress import progress_bar
from gradguard.update import ProtectedUpdate

# A setting leaks when its undefended strongest attack beats the prior by at least this (PSNR).
LEAK_THRESHOLD_DB = 3.0
_CELL_FORMAT = 1
# GuardConfig fields that set how much noise an image gets and of which kind: what a twin copies.
_NOISE_FIELDS = ("noise_amplitude", "amplitude_growth", "batch_exponent", "update_exponent", "noise_kind",
                 "noise_smoothness", "total_rounds", "mask_normalization", "bn_statistics", "seed")


# ---------------------------------------------------------------------------- twins
def twin_spec(spec: Spec) -> Spec | None:
    """The equal-energy twin of a GradGuard setting: ``untargeted`` with the setting's noise fields.

    None for a defense that is not a targeted GradGuard setting (the twin itself, baselines, and
    ``shadowdef``, whose peak-normalised mask has no equal-energy uniform counterpart)."""
    cls = DEFENSES[spec.name]
    if not issubclass(cls, GuardedDefense) or cls is UntargetedDefense or spec.name == "shadowdef":
        return None
    config = GuardConfig.preset(cls.preset, **spec.params)
    if config.mask_normalization != "rms" or config.calibration.enabled:  # calibrated noise is untargeted already
        return None
    base = GuardConfig.preset(UntargetedDefense.preset)
    params = {name: getattr(config, name) for name in _NOISE_FIELDS if getattr(config, name) != getattr(base, name)}
    return Spec(UntargetedDefense.name, params)


def with_twins(defenses: Sequence[Spec]) -> list[tuple[Spec, str | None]]:
    """Every defense with the label of the setting it is the twin of (None: not a twin); twins
    missing from ``defenses`` are added right after their setting."""
    listed = {spec.label for spec in defenses}
    order: dict[str, Spec] = {}
    twin_of: dict[str, str] = {}
    for spec in defenses:
        order.setdefault(spec.label, spec)
        twin = twin_spec(spec)
        if twin is not None:
            twin_of.setdefault(twin.label, spec.label)
            if twin.label not in listed:
                order.setdefault(twin.label, twin)
    return [(spec, twin_of.get(label)) for label, spec in order.items()]


def _setting_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A defense's parameters without those that say how a run uses it, not what it does."""
    return {k: v for k, v in params.items() if k not in ("seed", "share")}


# ---------------------------------------------------------------------------- records
@dataclass
class VariantScore:
    """One attack's reconstruction in one adaptive variant, scored by the ``best`` protocol."""

    attack: str
    variant: str
    psnr: float
    ssim: float
    lpips: float


@dataclass
class LeakageCell:
    """One attacked update of one setting and defense.

    prior: the attacker's best guess without the update, per metric (``prior_name`` the guess
    with the highest PSNR). scores: every attack in every variant. reid_top1: re-identification
    by the attack whose reconstruction scored the highest PSNR. noise_energy: the mean squared
    input noise per image, relative to the image's mean square (0 for update-space defenses).
    estimated_psnr_above_prior: the defense's own leakage estimate for the update, worst sample
    (calibrated GradGuard only; None otherwise).
    """

    dataset: str
    setting: str
    defense: str
    twin_of: str | None
    seed: int
    client_images: int
    prior_name: str
    prior: dict[str, float]
    scores: list[VariantScore]
    reid_top1: float
    reid_chance: float
    noise_energy: float
    epsilon: float | None
    attack_seconds: float
    images: str = ""
    format: int = _CELL_FORMAT
    estimated_psnr_above_prior: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LeakageCell":
        return cls(**{**data, "scores": [VariantScore(**s) for s in data["scores"]]})

    def strongest(self) -> VariantScore:
        """Per metric the strongest of every attack and variant (highest PSNR and SSIM, lowest LPIPS)."""
        return VariantScore(attack="+".join(sorted({s.attack for s in self.scores})), variant="strongest",
                            psnr=max(s.psnr for s in self.scores), ssim=max(s.ssim for s in self.scores),
                            lpips=min(s.lpips for s in self.scores))

    def above_prior(self) -> dict[str, float]:
        best = self.strongest()
        return above_prior({"psnr_best": best.psnr, "ssim_best": best.ssim, "lpips_best": best.lpips},
                           {f"{k}_best": v for k, v in self.prior.items()})


@dataclass
class SummaryRow:
    """One row of ``summary.json``: a (dataset, setting, defense) over its attacked updates and
    utility seeds. Leakage figures are means over the attacked updates."""

    dataset: str
    setting: str
    defense: str
    twin_of: str | None
    attacks: list[str]
    psnr_above_prior: float
    ssim_above_prior: float
    lpips: float
    reid_top1: float
    reid_chance: float
    micro_f1: float | None
    macro_f1: float | None
    f1_seeds: int
    energy_ratio: float | None
    undefended_psnr_above_prior: float | None
    noise_energy: float = 0.0
    collapsed_runs: int = 0
    updates: int = 0
    report_conservative_rate: float | None = None
    # The same runs scored with BatchNorm statistics re-estimated on public images (None: some run has no BatchNorm).
    micro_f1_public_bn: float | None = None
    macro_f1_public_bn: float | None = None
    gradguard: bool = False  # a GradGuard setting (its summary row adds noise_energy and report_conservative_rate)


# ---------------------------------------------------------------------------- one cell
def _first_weighted_layer(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            return module
    raise ValueError("the model has no layer with parameters")


class _InputProbe:
    """Records what the model's first weighted layer receives in training forwards (with grad):
    the images after any input-space defense, so the realised noise can be measured.

    The hook is a plain closure, not a bound method: a defense trains a deep copy of the model,
    and deepcopy shares functions but would copy a method's object, and the records with it."""

    def __init__(self, model: nn.Module):
        inputs: list[Tensor] = []

        def record(module: nn.Module, args: tuple) -> None:
            if module.training and torch.is_grad_enabled() and args and torch.is_tensor(args[0]):
                inputs.append(args[0].detach().flatten(1).cpu())

        self.inputs = inputs
        self.handle = _first_weighted_layer(model).register_forward_pre_hook(record)


def noise_energy(clean: Tensor, seen: Tensor) -> Tensor:
    """Per image, the mean squared difference of what the model saw and the clean image, over the
    clean image's mean square: [N]."""
    clean, seen = clean.flatten(1).double(), seen.flatten(1).double()
    return (seen - clean).pow(2).mean(1) / clean.pow(2).mean(1).clamp_min(1e-12)


def realised_energy(batches: Sequence[Tensor], seen: Sequence[Tensor]) -> float:
    """Mean :func:`noise_energy` over every image of ``batches`` (the clean local steps), each step
    paired with the first recorded training input of its shape after the previous step's; a
    defense's extra forwards (Soteria's scoring passes) are passed over."""
    values, records = [], iter(seen)
    for batch in batches:
        clean = batch.flatten(1)
        match = next((x for x in records if x.shape == clean.shape), None)
        if match is None:
            break
        values.append(noise_energy(clean, match))
    return float(torch.cat(values).mean()) if values else 0.0


def _victim(experiment: Experiment, setting: LeakageSetting, data: Data, spec: Spec, seed: int,
            pretrain: Tensor, pretrain_labels: Tensor) -> nn.Module:
    torch.manual_seed(derive_seed(seed, setting.name, "init"))
    model = build_model(setting.model, in_channels=data.train.channels, num_classes=data.train.num_classes,
                        width=setting.width, image_size=data.train.images.shape[-1])
    if setting.trained_steps:  # an early-round global model: plain SGD on images the client does not hold
        optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr)
        generator = torch.Generator().manual_seed(derive_seed(seed, setting.name, "pretrain"))
        model.train()
        for _ in range(setting.trained_steps):
            pick = torch.randint(len(pretrain), (32,), generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(model(pretrain[pick]), pretrain_labels[pick]).backward()
            optimizer.step()
    if setting.threat == "malicious_server":
        model = _malicious(model, data)
    return DEFENSES[spec.name].prepare_model(model, **spec.params)


def _malicious(victim: nn.Module, data: Data) -> nn.Module:
    from gradguard.eval.attacks.imprint import imprint_model

    return imprint_model(victim, public=data.prior.images)


def _images(data: Data, setting: LeakageSetting, seed: int, distractors: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The client's image indices, the distractors' and the pre-training pool's, seeded."""
    order = np.random.default_rng([seed, derive_seed(0, setting.name) % (1 << 31)]).permutation(len(data.train))
    client = order[:setting.images]
    return client, order[setting.images:setting.images + distractors], order[setting.images + distractors:]


def known_noise_denoiser(experiment: Experiment, data: Data, setting: LeakageSetting, spec: Spec,
                         model: nn.Module) -> KnownNoiseDenoiser | None:
    """The attacker who knows ``spec``'s configuration: a denoiser trained on the public (val) images
    with the defense's exact noise for this setting's update (its round, its N), fresh seeds.

    None for defenses that add no input noise, and for ``shadowdef``: each of its noise draws runs
    the paper's generator shadow (about 2 s a batch, 10 minutes a fit on the CPU)."""
    cls = DEFENSES[spec.name]
    if not issubclass(cls, GuardedDefense) or spec.name == "shadowdef":
        return None
    config = GuardConfig.preset(cls.preset, **{"total_rounds": experiment.utility.rounds,
                                                **_setting_params(spec.params)})
    noise = gradguard_noise(config, model=model, round=1, dataset_size=setting.images)
    denoiser = KnownNoiseDenoiser(DenoiserConfig(steps=experiment.denoiser_steps, device=experiment.device,
                                                 seed=derive_seed(0, data.train.name, setting.name, spec.label)))
    return denoiser.fit(data.prior.images, noise)


def leakage_cell(experiment: Experiment, data: Data, setting: LeakageSetting, spec: Spec, twin_of: str | None,
                 seed: int, lpips_metric: LPIPSMetric, images_path: Path,
                 denoisers: dict[tuple[str, str, str], KnownNoiseDenoiser | None]) -> LeakageCell:
    """Compute ``spec``'s update for seed ``seed``'s client of ``setting`` and attack it; ``data`` is
    loaded at the setting's image size. ``denoisers`` caches the known-noise denoiser per
    (dataset, setting, defense), fitted on the first attacked seed's global model."""
    device = torch.device(experiment.device)
    train = data.train
    client, distractors, rest = _images(data, setting, seed, experiment.distractors)
    model = _victim(experiment, setting, data, spec, seed, train.images[rest], train.labels[rest]).to(device)
    originals, labels = train.images[client], train.labels[client]
    order = np.random.default_rng([seed, 1]).permutation(len(client))
    batches = []
    for _ in range(setting.local_epochs):
        for i in range(0, len(order), setting.batch_size):
            pick = torch.from_numpy(order[i:i + setting.batch_size])
            batches.append((originals[pick], labels[pick]))
    ids = [f"{data.train.name}:{client[j]}" for _ in range(setting.local_epochs) for j in order]
    defense = _defense(Spec(spec.name, {**spec.params, "share": setting.share}), seed)
    if isinstance(defense, GuardedDefense) and defense.config.calibration.enabled:
        # A calibrated guard's probe mixes the images of the rounds it has seen into a delta's
        # gradient: the attacked round is the client's second, as in a federation past its first.
        defense.local_update(model, batches, lr=setting.lr, round=0,
                             total_rounds=experiment.utility.rounds, client_id="client", sample_ids=ids)
    probe = _InputProbe(model)
    try:
        update = defense.local_update(model, batches, lr=setting.lr, round=1,
                                      total_rounds=experiment.utility.rounds, client_id="client", sample_ids=ids)
    finally:
        probe.handle.remove()
    key = (data.train.name, setting.name, spec.label)
    if key not in denoisers:
        denoisers[key] = known_noise_denoiser(experiment, data, setting, spec, model)
    energy = realised_energy([b[0] for b in batches], probe.inputs)
    return _attack(experiment, data, setting, spec, twin_of, seed, model, update, originals,
                   train.images[distractors], energy, lpips_metric, images_path, train.images.shape[1:],
                   denoisers[key])


def _attack(experiment: Experiment, data: Data, setting: LeakageSetting, spec: Spec, twin_of: str | None,
            seed: int, model: nn.Module, update: ProtectedUpdate, originals: Tensor, distractors: Tensor,
            energy: float, lpips_metric: LPIPSMetric, images_path: Path, image_shape: Any,
            denoiser: KnownNoiseDenoiser | None) -> LeakageCell:
    public = data.prior
    num_classes = data.train.num_classes
    obs = observe(copy.deepcopy(model), update, image_shape=tuple(image_shape), num_classes=num_classes)
    revealed = recover_labels(obs).cpu()
    guesses = prior_guesses(public.images, public.labels, revealed, num_classes=num_classes)
    prior_scores = {name: leakage(g, originals, lpips_metric=lpips_metric) for name, g in guesses.items()}
    prior_name, prior = strongest_prior(prior_scores)
    scores: list[VariantScore] = []
    best: tuple[float, Tensor] | None = None
    seconds = 0.0
    for attack in experiment.attacks_of(setting):
        overrides: dict[str, Any] = {"device": experiment.device, "seed": seed, "progress": experiment.progress}
        if "prior_images" in {f.name for f in dataclasses.fields(ATTACKS[attack.name].config_class)}:
            overrides["prior_images"] = public.images
        result = build_attack(attack.name, **{**overrides, **attack.params}).reconstruct(
            model=model, update=update, image_shape=tuple(image_shape), num_classes=num_classes)
        seconds += result.seconds
        for variant, images in adaptive_variants(result.images, public.images, known_noise=denoiser).items():
            s = leakage(images, originals, lpips_metric=lpips_metric)
            scores.append(VariantScore(attack.label, variant, s["psnr_best"], s["ssim_best"], s["lpips_best"]))
            if best is None or s["psnr_best"] > best[0]:
                best = (s["psnr_best"], images)
    assert best is not None  # a setting runs at least one attack (checked when the experiment is read)
    save_file({"reconstruction": best[1].contiguous(), "original": originals.contiguous()}, str(images_path))
    return LeakageCell(dataset=data.train.name, setting=setting.name, defense=spec.label, twin_of=twin_of, seed=seed,
                       client_images=len(originals), prior_name=prior_name,
                       prior={k.removesuffix("_best"): v for k, v in prior.items() if k.endswith("_best")},
                       scores=scores, reid_top1=reidentification(best[1], originals, distractors),
                       reid_chance=reidentification_chance(len(originals), len(distractors)),
                       noise_energy=energy, epsilon=update.epsilon, attack_seconds=seconds,
                       estimated_psnr_above_prior=None if update.leakage is None
                       else update.leakage.psnr_above_prior_max)


# ---------------------------------------------------------------------------- summary
def conservative_rate(cells: Sequence[LeakageCell]) -> float | None:
    """The fraction of attacked updates whose own leakage estimate is at least the strongest
    attack's PSNR above the prior minus 1 dB (None when no update carried an estimate)."""
    pairs = [(c.estimated_psnr_above_prior, c.above_prior()["psnr"]) for c in cells
             if c.estimated_psnr_above_prior is not None]
    if not pairs:
        return None
    return float(np.mean([estimate >= attack - 1.0 for estimate, attack in pairs]))


def sign_test(differences: Sequence[float]) -> float:
    """Two-sided exact sign test p-value of ``differences`` against a median of 0 (ties dropped)."""
    pos, neg = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    n, k = pos + neg, min(pos, neg)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(cells: Sequence[LeakageCell], of: str, twin: str, *, dataset: str | None = None,
           settings: Sequence[str] | None = None) -> dict[str, Any]:
    """GradGuard setting ``of`` against its twin on the same updates' images: PSNR above prior
    (setting minus twin; < 0 means the targeting protects more), energy ratio (twin over setting).
    ``dataset`` and ``settings`` restrict the pairs (e.g. to the settings that leak)."""
    by = {(c.dataset, c.setting, c.seed, c.defense): c for c in cells
          if (dataset is None or c.dataset == dataset) and (settings is None or c.setting in settings)}
    diffs, energy = [], []
    for (dataset, setting, seed, defense), cell in by.items():
        other = by.get((dataset, setting, seed, twin))
        if defense == of and other is not None:
            diffs.append(cell.above_prior()["psnr"] - other.above_prior()["psnr"])
            if cell.noise_energy > 0:
                energy.append(other.noise_energy / cell.noise_energy)
    return {"dataset": dataset, "defense": of, "twin": twin, "pairs": len(diffs),
            "psnr_difference_mean": float(np.mean(diffs)) if diffs else None,
            "psnr_difference_sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
            "setting_leaks_less": sum(d < 0 for d in diffs), "twin_leaks_less": sum(d > 0 for d in diffs),
            "sign_test_p": sign_test(diffs), "energy_ratio": float(np.mean(energy)) if energy else None}


def summarize(cells: Sequence[LeakageCell], runs: Sequence[dict[str, Any]],
              defenses: Sequence[tuple[Spec, str | None]]) -> list[SummaryRow]:
    """One row per (dataset, setting, defense) present in ``cells``."""
    rows = []
    setting_order = {s: i for i, s in enumerate(dict.fromkeys(c.setting for c in cells))}
    keys = sorted({(c.dataset, c.setting) for c in cells}, key=lambda k: (k[0], setting_order[k[1]]))
    for dataset, setting in keys:
        undefended = [c.above_prior()["psnr"] for c in cells
                      if (c.dataset, c.setting, c.defense) == (dataset, setting, "none")]
        for spec, twin_of in defenses:
            mine = [c for c in cells if (c.dataset, c.setting, c.defense) == (dataset, setting, spec.label)]
            if not mine:
                continue
            above = [c.above_prior() for c in mine]
            utility = [r for r in runs if r["dataset"] == dataset and r["defense"] == spec.label]
            # The public-BN score counts only where every run has one.
            public = [] if any(r.get("bn_public") is None for r in utility) else [r["bn_public"] for r in utility]
            energy_ratio = None
            if twin_of is not None:
                energy_ratio = paired(cells, twin_of, spec.label, dataset=dataset, settings=[setting])["energy_ratio"]
            rows.append(SummaryRow(
                dataset=dataset, setting=setting, defense=spec.label, twin_of=twin_of,
                attacks=sorted({s.attack for c in mine for s in c.scores}),
                psnr_above_prior=float(np.mean([a["psnr"] for a in above])),
                ssim_above_prior=float(np.mean([a["ssim"] for a in above])),
                lpips=float(np.mean([c.strongest().lpips for c in mine])),
                reid_top1=float(np.mean([c.reid_top1 for c in mine])), reid_chance=mine[0].reid_chance,
                micro_f1=float(np.mean([r["micro_f1"] for r in utility])) if utility else None,
                macro_f1=float(np.mean([r["macro_f1"] for r in utility])) if utility else None,
                f1_seeds=len(utility), energy_ratio=energy_ratio,
                undefended_psnr_above_prior=float(np.mean(undefended)) if undefended else None,
                noise_energy=float(np.mean([c.noise_energy for c in mine])),
                collapsed_runs=sum(bool(r["collapsed"]) for r in utility), updates=len(mine),
                report_conservative_rate=conservative_rate(mine),
                micro_f1_public_bn=float(np.mean([p["micro_f1"] for p in public])) if public else None,
                macro_f1_public_bn=float(np.mean([p["macro_f1"] for p in public])) if public else None,
                gradguard=issubclass(DEFENSES[spec.name], GuardedDefense)))
    return rows


def datasets_of(cells: Sequence[LeakageCell]) -> list[str]:
    return list(dict.fromkeys(c.dataset for c in cells))


def defense_key(name: str, params: dict[str, Any], settings: dict[str, Any] | None = None) -> str:
    """What a defense setting does, whatever its spelling: GradGuard settings by the configuration
    they resolve to (``chest_xray`` is ``gradguard`` with the preset's fields; ``settings``, the one a
    run recorded, where given), others by name and parameters; seeds and the share kind do not count."""
    if issubclass(DEFENSES[name], GuardedDefense):
        resolved = settings if settings is not None else defense_settings(Spec(name, params))
        return "gradguard:" + json.dumps(resolved, sort_keys=True)
    return f"{name}:" + json.dumps(_setting_params(params), sort_keys=True)


def measured_runs(paths: Sequence[Path], datasets: Sequence[str],
                  defenses: Sequence[tuple[Spec, str | None]]) -> list[dict[str, Any]]:
    """Each defense's utility runs from federation reports' ``results.json``: per dataset, the
    file that measured the setting over the most seeds; the runs are relabelled to the defense. A
    run that recorded its defense's settings is matched by them, so a run of ``gradguard`` from
    before a default changed is not taken for the new default."""
    found: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
    for path in paths:
        by: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for run in _read_json(path)["runs"]:
            if run["defense_name"] in DEFENSES:
                setting = defense_key(run["defense_name"], run["defense_params"], run.get("defense_settings"))
                by.setdefault((run["dataset"], setting), []).append(run)
        for key, runs in by.items():
            found.setdefault(key, []).append(runs)
    out = []
    for dataset in datasets:
        for spec, _ in defenses:
            candidates = found.get((dataset, defense_key(spec.name, dict(spec.params))), [])
            if candidates:
                out += [{**run, "defense": spec.label} for run in max(candidates, key=len)]
    return out


# ---------------------------------------------------------------------------- the run
@dataclass
class LeakageOutcome:
    """What one invocation did: where the report is and how many units it computed."""

    report: Path
    trained: int
    attacked: int
    files: list[Path] = field(default_factory=list)


def run_leakage(experiment: Experiment, out: str | Path, *, report_dir: str | Path | None = None,
                command: str | None = None, compute: bool = True) -> LeakageOutcome:
    """Run (or resume) ``experiment`` with its cache in ``out``; write the report to ``report_dir``.
    With ``compute=False`` the report covers the cached cells only and nothing is computed."""
    from gradguard.eval.leakage_report import write_leakage_report

    root = Path(out)
    utility_layout = Layout(root / "utility")
    if not experiment.utility_results:
        _check_run(utility_layout, experiment.utility)
    defenses = with_twins(experiment.defenses)
    datasets = {name: Data.load(name, experiment.image_size) for name in experiment.datasets}
    sized: dict[tuple[str, int], Data] = {}

    def at_size(name: str, setting: LeakageSetting) -> Data:
        size = setting.image_size or experiment.image_size
        if size == experiment.image_size:
            return datasets[name]
        return sized.setdefault((name, size), Data.load(name, size))

    seeds = () if experiment.utility_results else experiment.utility.seeds
    total = len(datasets) * sum(len(seeds) + experiment.attack_seeds
                                * sum(s.runs(spec, of) for s in experiment.settings)
                                for spec, of in defenses)
    cells: list[LeakageCell] = []
    runs = measured_runs(experiment.utility_results, [d.train.name for d in datasets.values()], defenses)
    trained = attacked = 0
    lpips_metric: LPIPSMetric | None = None
    denoisers: dict[tuple[str, str, str], KnownNoiseDenoiser | None] = {}
    start = time.perf_counter()
    with progress_bar(total=total, desc=experiment.name, enabled=experiment.progress) as bar:
        for name, data in datasets.items():
            for spec, twin_of in defenses:
                settings = defense_settings(spec)
                for seed in seeds:
                    path = utility_layout.train(data.train.name, spec, seed)
                    run = cached_run(path, settings)
                    if run is None and not compute:
                        continue
                    if run is None:
                        bar.set_postfix_str(f"{data.train.name} {spec.label} utility seed {seed}")
                        _write_json(path, train_run(experiment.utility, data, spec, seed, utility_layout,
                                                    capture=False))
                        trained += 1
                        run = _read_json(path)
                    runs.append(run)
                    bar.update()
                for setting in (s for s in experiment.settings if s.runs(spec, twin_of)):
                    for seed in range(experiment.attack_seeds):
                        path = (root / "cells" / data.train.name / setting.name / spec.slug / f"seed{seed}.json")
                        if not path.is_file() and not compute:
                            continue
                        if not path.is_file():
                            bar.set_postfix_str(f"{data.train.name} {setting.name} {spec.label} seed {seed}")
                            lpips_metric = lpips_metric or LPIPSMetric(device=experiment.device)
                            path.parent.mkdir(parents=True, exist_ok=True)
                            cell = leakage_cell(experiment, at_size(name, setting), setting, spec, twin_of, seed,
                                                lpips_metric, path.with_suffix(".safetensors"), denoisers)
                            _write_json(path, dataclasses.asdict(cell))
                            attacked += 1
                        cell = LeakageCell.from_dict(_read_json(path))
                        cell.images = str(path.with_suffix(".safetensors").relative_to(root))
                        cell.twin_of = twin_of
                        cells.append(cell)
                        bar.update()
    report_root = Path(report_dir) if report_dir is not None else root
    rows = summarize(cells, runs, defenses)
    leaking = {d: [r.setting for r in rows if r.dataset == d and r.defense == "none"
                   and (r.undefended_psnr_above_prior or 0.0) >= LEAK_THRESHOLD_DB] for d in datasets_of(cells)}
    twins = [paired(cells, of, spec.label, dataset=d, settings=names)
             for d, names in leaking.items() for spec, of in defenses if of is not None]
    files = write_leakage_report(experiment=experiment, cells=cells, runs=runs, rows=rows, twins=twins,
                                 out=report_root, cache=root, command=command,
                                 seconds=time.perf_counter() - start)
    return LeakageOutcome(report=report_root, trained=trained, attacked=attacked, files=files)
