"""Configuration of the guard: four validated groups (noise, masks, shadow, DP) and named presets.

Every field is checked when a config is built: a choice must be one of its ``Literal``'s values
(the nearest valid name is suggested), numbers must be numbers and in range, and every problem
is listed at once. The flat keyword names (``GuardConfig(noise_amplitude=0.2, shadow="none")``)
are accepted and readable too, so specs such as ``gradguard:noise_amplitude=0.5`` and Flower's
``gradguard.noise-amplitude`` keys set the same fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from gradguard.errors import ConfigError
from gradguard.leakage import Threat
from gradguard.update import UpdateKind

NoiseKind = Literal["gaussian", "smooth", "uniform", "mask"]
CombineRule = Literal["product", "subtract"]
RelevanceClass = Literal["label", "predicted"]
Normalization = Literal["rms", "peak"]
Accountant = Literal["rdp", "prv", "gdp"]
BatchNormStatistics = Literal["noised", "clean", "local"]
OnTargetMissed = Literal["flag", "raise"]

Checks = dict[str, tuple[bool, str]]
"""field name -> (holds, what the valid range is)."""


def suggestion(value: object, choices: Iterable[str]) -> str:
    """'; did you mean X?' naming the valid choice nearest to ``value``, or ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_problem(value: object, hint: object) -> str | None:
    """Why ``value`` does not have the annotated type (a Literal, float, int, str, or X | None)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        return None if type(None) in options else "must not be None"
    for option in options:
        if typing.get_origin(option) is Literal:
            choices = typing.get_args(option)
            return None if value in choices else f"choose one of {list(choices)}{suggestion(value, choices)}"
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if math.isfinite(value) else "must be a finite number"
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option is str and isinstance(value, str):
            return None
        if isinstance(option, type) and dataclasses.is_dataclass(option) and isinstance(value, option):
            return None
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    return f"must be {wanted}, got {type(value).__name__} {value!r}"


def _registered(value: str, names: Iterable[str]) -> tuple[bool, str]:
    choices = sorted({*names, "none"})
    return value in choices, f"choose one of {choices}{suggestion(value, choices)}"


def _validate(group: object, checks: Callable[[], Checks]) -> None:
    """Raise ConfigError listing every field of ``group`` of the wrong type, then every one out of range."""
    hints = typing.get_type_hints(type(group))
    values = {f.name: getattr(group, f.name) for f in fields(group)}  # type: ignore[arg-type]
    problems = [(name, p) for name, value in values.items() if (p := _type_problem(value, hints[name])) is not None]
    if not problems:
        problems = [(name, message) for name, (ok, message) in checks().items() if not ok]
    if problems:
        group_name = GROUP_OF[type(group).__name__]
        raise ConfigError("invalid GuardConfig:\n" + "\n".join(
            f"  - {_field_name(group_name, name)}={values[name]!r}: {message}" for name, message in problems))


def _field_name(group: str, name: str) -> str:
    """'noise.kind (noise_kind)': the grouped name and the flat one, where they differ."""
    if not group:
        return name
    flat = FLAT_NAME.get((group, name), name)
    return f"{group}.{name}" + (f" ({flat})" if flat != f"{group}.{name}" else "")


@dataclass(frozen=True)
class NoiseConfig:
    """What is added to each training input: x + w_t B^(-batch_exponent) N^(-update_exponent) max|x| M noise.

    amplitude: w_0, the noise's RMS (mask RMS 1, unit-variance noise) as a fraction of the image's max |x|.
    growth: w_t = w_0 exp(growth t / T). The paper (``shadowdef``) uses w_0 = 0.19 and growth 1.0 (noise
        grows 2.7x over training); a negative growth decays it (keeps F1, protects less).
    batch_exponent: a step's batch of B images is noised at w_t B^(-batch_exponent). An image's share of a
        batch-averaged gradient is 1/B while B noises average down as 1/sqrt(B): 0.5 keeps each image's
        signal-to-noise ratio about equal across batch sizes. 0 noises every batch alike.
    update_exponent: the same one level up: a client whose update covers N images (``wrap(...,
        dataset_size=N)``) noises them at w_t N^(-update_exponent), so the noise goes to clients that share
        few images, the ones attacks invert. 0 ignores N.
    kind: "smooth" (Gaussian noise low-passed over ``smoothness`` pixels, fresh each step: denoising
        attackers cannot strip it), "gaussian"/"uniform" (white), or "mask" (the mask itself).
    smoothness: the low-pass filter's sigma in pixels (voxels for volumes) for kind="smooth".
    """

    # Measured: smooth noise survives the adaptive attacker's denoising where white noise of the same
    # energy does not, and 0.3 keeps PneumoniaMNIST F1 within a point.
    amplitude: float = 0.3
    growth: float = 0.0
    batch_exponent: float = 0.0
    update_exponent: float = 0.0
    kind: NoiseKind = "smooth"
    smoothness: float = 1.5

    def __post_init__(self) -> None:
        _validate(self, lambda: {
            "amplitude": (self.amplitude >= 0, "must be >= 0"),
            "batch_exponent": (self.batch_exponent >= 0, "must be >= 0"),
            "update_exponent": (self.update_exponent >= 0, "must be >= 0"),
            "smoothness": (self.smoothness > 0, "must be > 0"),
        })


@dataclass(frozen=True)
class MaskConfig:
    """Where the noise goes: M = floor + (1 - floor) V (1 - a_t R), per sample, smoothed over refreshes.

    refresh_every: k; a sample's mask is computed when it is first seen, then for the whole batch every
        k local steps.
    momentum: weight of the previous mask when a refreshed one arrives (paper: 0.1).
    vulnerability_temperature: softmax temperature on the rank-equalised inverse shadow error (values in
        [0, 1]); lower is sharper. The paper uses 20 on raw values.
    relevance_method: how the global model's relevance map is computed: "gradcam" (the last convolution,
        2-D or 3-D), "guided_gradcam", "saliency", "integrated_gradients" (captum), a registered method,
        or "none".
    relevance_class: the class the map explains: "label" (the class given to ``set_sample_ids``, else the
        prediction) or "predicted" (always the prediction; label-free, so where the noise is weak cannot
        reveal the label to the model).
    relevance_top_fraction: only the top fraction of relevance pixels count (paper: 0.3).
    relevance_temperature: kept pixels weigh exp((rank - 1) / T): with T = 1 every kept pixel weighs
        0.74..1, so the diagnostic region is spared strongly (the paper's T = 20 spares it by about 5%).
    relevance_weight_min / relevance_weight_max: a_t = clip(t / T, min, max), how strongly relevant pixels
        are spared (paper: 0.1 / 0.5).
    combine: "product": V (1 - a_t R); "subtract": V - a_t R (the paper's rule).
    floor: every pixel gets at least this fraction of the peak, so no region is left bare.
    normalization: "rms" (unit root-mean-square: the amplitude fixes the noise energy whatever the mask's
        shape) or "peak" (max 1, the paper's convention).
    """

    refresh_every: int = 10
    momentum: float = 0.1
    vulnerability_temperature: float = 0.25
    relevance_method: str = "none"
    relevance_class: RelevanceClass = "label"
    relevance_top_fraction: float = 0.3
    relevance_weight_min: float = 0.5
    relevance_weight_max: float = 0.9
    relevance_temperature: float = 1.0
    combine: CombineRule = "product"
    floor: float = 0.1
    normalization: Normalization = "rms"

    def __post_init__(self) -> None:
        from gradguard.relevance import RELEVANCE_METHODS

        _validate(self, lambda: {
            "refresh_every": (self.refresh_every >= 1, "must be >= 1"),
            "momentum": (0 <= self.momentum < 1, "must be in [0, 1)"),
            "vulnerability_temperature": (self.vulnerability_temperature > 0, "must be > 0"),
            "relevance_method": _registered(self.relevance_method, RELEVANCE_METHODS),
            "relevance_top_fraction": (0 < self.relevance_top_fraction <= 1, "must be in (0, 1]"),
            "relevance_weight_min": (0 <= self.relevance_weight_min <= self.relevance_weight_max,
                                     "must be in [0, relevance_weight_max]"),
            "relevance_weight_max": (self.relevance_weight_max <= 1, "must be in [relevance_weight_min, 1]"),
            "relevance_temperature": (self.relevance_temperature > 0, "must be > 0"),
            "floor": (0 <= self.floor <= 1, "must be in [0, 1]"),
        })


@dataclass(frozen=True)
class ShadowConfig:
    """The stand-in attacker whose per-pixel error says where an image is recovered.

    kind: "feature_inverter" (a small decoder from what the final Linear's gradient reveals back to the
        image, co-trained on the client's data), "generator" (the paper's latent-code generator matching
        gradients and BatchNorm statistics; 2-D images), "gradient_attack" (no model: the probe's
        gradient-inversion attack itself, run on the batch's clean gradient whenever a mask is made;
        noise goes where it recovers the image better than the prior), a registered shadow, or "none".
    lr, steps_per_batch, width: its Adam learning rate, steps per observed batch and channel width
        (for "gradient_attack": the attack's iterations per mask; lr and width are unused).
    train_every: co-train on every n-th local step's batch (masks change only every refresh anyway).
    """

    kind: str = "none"
    lr: float = 2e-3
    steps_per_batch: int = 1
    train_every: int = 4
    width: int = 16

    def __post_init__(self) -> None:
        from gradguard.shadow import SHADOWS

        _validate(self, lambda: {
            "kind": _registered(self.kind, SHADOWS),
            "lr": (self.lr > 0, "must be > 0"),
            "steps_per_batch": (self.steps_per_batch >= 0, "must be >= 0"),
            "train_every": (self.train_every >= 1, "must be >= 1"),
            "width": (self.width >= 1, "must be >= 1"),
        })


@dataclass(frozen=True)
class DPConfig:
    """Hybrid differential privacy: Opacus DP-SGD on top of the masks, off while noise_multiplier is None.

    With it on, ``wrap`` needs the DataLoader and returns a Poisson-sampling one (as Opacus'
    ``make_private`` does), so the accountant's (epsilon, delta) holds for the steps taken.
    noise_multiplier: sigma of DP-SGD's Gaussian noise relative to max_grad_norm.
    max_grad_norm: the per-sample gradient clipping norm.
    delta: the delta epsilon is reported at; below 1 / dataset size.
    accountant: Opacus' accountant, "rdp", "prv" or "gdp".
    """

    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: Accountant = "rdp"

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None

    def __post_init__(self) -> None:
        _validate(self, lambda: {
            "noise_multiplier": (self.noise_multiplier is None or self.noise_multiplier >= 0, "must be >= 0"),
            "max_grad_norm": (self.max_grad_norm > 0, "must be > 0"),
            "delta": (0 < self.delta < 1, "must be in (0, 1)"),
        })


@dataclass(frozen=True)
class CalibrationConfig:
    """Noise calibrated to what each sample would leak (the default), or the fixed rules of NoiseConfig.

    With ``leakage_target_db`` set, every sample of a round gets the smallest noise whose estimated
    leakage above the attacker's prior is at most the target (``gradguard.calibration``); its draw
    is fixed for the round, so an update over several local steps holds one noised copy per image,
    not several to average. NoiseConfig's amplitude, growth and exponents are then unused; its
    kind and smoothness still shape the noise.

    threat: who attacks the update. "honest_server" inverts what it receives: a round whose clean
        gradient a short attack (the client's own probe) does not invert, and in which no Linear
        layer on the flattened image hands over its input exactly, gets no noise. A delta's probe
        mixes the images of earlier rounds into the first batch's gradient (up to 16, at most
        ``wrap(dataset_size=...)``), as the delta mixes every image of the round.
        "malicious_server" can plant a module that reveals the noised inputs exactly, so every
        sample gets the noise that bounds any estimate from its noised copy.
    leakage_target_db: the bound's allowed leakage above the prior, in dB; None turns calibration
        off (the fixed amplitude rules, e.g. the ``chest_xray`` and ``fundus`` presets). The bound is
        the oracle Wiener filter's (it knows the image's own spectrum). At the amplitudes it sets for
        1 dB, a known-noise denoiser trained 1500 steps recovered at most +0.93 dB from the exactly
        recovered noised images (median -0.9 on chest X-rays, -1.7 on fundus photos;
        ``benchmarks/bound_tightness.py``); with weaker noise such a denoiser can beat the bound.
    max_amplitude: the most noise a sample may get (RMS relative to max |x|); a sample that needs
        more misses the target. Measured at 32 px with a 1 dB target: 95% of chest X-rays need at
        most 1.7, fundus photos 2.4; about 1 in 100 needs more than 3 (images close to the prior).
    on_target_missed: "flag" (protected_update() returns the update with ``update.leakage.met``
        False and warns; an aggregator with ``--max-leakage-db`` refuses it) or "raise" (it refuses
        to return the update).
    probe_steps: iterations of the honest server's probe attack: the leakage benchmark's attack budget
        (500), against which the report's conservativeness is measured. At 100 the probe fell 4 to 9 dB
        short of a 1000-step attack on a trained SmallCNN's one-image updates; a probe that finds the
        update leaking stops there, so only a round that leaks nothing pays the whole budget.
    probe_every: the probe runs in the first round and then every n-th round (and when the first
        batch's size or the images it mixes change); the rounds between reuse its result, as the
        model changes slowly.
    """

    threat: Threat = "honest_server"
    leakage_target_db: float | None = 1.0
    max_amplitude: float = 10.0
    on_target_missed: OnTargetMissed = "flag"
    probe_steps: int = 500
    probe_every: int = 5

    @property
    def enabled(self) -> bool:
        return self.leakage_target_db is not None

    def __post_init__(self) -> None:
        _validate(self, lambda: {
            "leakage_target_db": (self.leakage_target_db is None or self.leakage_target_db > 0,
                                  "must be > 0 dB (the bound reaches 0 only with infinite noise) or None"),
            "max_amplitude": (self.max_amplitude > 0, "must be > 0"),
            "probe_steps": (self.probe_steps >= 1, "must be >= 1"),
            "probe_every": (self.probe_every >= 1, "must be >= 1"),
        })


# flat keyword name -> (group, field): the names GuardConfig also accepts and reads.
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "noise_amplitude": ("noise", "amplitude"), "amplitude_growth": ("noise", "growth"),
    "batch_exponent": ("noise", "batch_exponent"), "update_exponent": ("noise", "update_exponent"),
    "noise_kind": ("noise", "kind"), "noise_smoothness": ("noise", "smoothness"),
    "refresh_every": ("masks", "refresh_every"), "mask_momentum": ("masks", "momentum"),
    **{name: ("masks", name) for name in (
        "vulnerability_temperature", "relevance_method", "relevance_class", "relevance_top_fraction",
        "relevance_weight_min", "relevance_weight_max", "relevance_temperature", "combine")},
    "mask_floor": ("masks", "floor"), "mask_normalization": ("masks", "normalization"),
    "shadow": ("shadow", "kind"), "shadow_lr": ("shadow", "lr"),
    "shadow_steps_per_batch": ("shadow", "steps_per_batch"), "shadow_train_every": ("shadow", "train_every"),
    "shadow_width": ("shadow", "width"),
    "dp_noise_multiplier": ("dp", "noise_multiplier"), "dp_max_grad_norm": ("dp", "max_grad_norm"),
    "dp_delta": ("dp", "delta"), "dp_accountant": ("dp", "accountant"),
    **{name: ("calibration", name) for name in (
        "threat", "leakage_target_db", "max_amplitude", "on_target_missed", "probe_steps", "probe_every")},
}
FLAT_NAME = {where: flat for flat, where in FLAT_FIELDS.items()}
GROUPS: dict[str, type] = {"noise": NoiseConfig, "masks": MaskConfig, "shadow": ShadowConfig, "dp": DPConfig,
                           "calibration": CalibrationConfig}
GROUP_OF = {cls.__name__: name for name, cls in GROUPS.items()} | {"GuardConfig": ""}


@dataclass(frozen=True, init=False)
class GuardConfig:
    """Every knob of GradGuard, in five groups; the defaults are the ``default`` preset: noise
    calibrated per sample to the honest server's leakage, no spatial targeting (it did not beat
    untargeted noise of equal energy on the leakage benchmark, RESULTS.md), no clean statistic shared.

    noise (:class:`NoiseConfig`), masks (:class:`MaskConfig`), shadow (:class:`ShadowConfig`),
    dp (:class:`DPConfig`), calibration (:class:`CalibrationConfig`), and:

    total_rounds: T, the number of FL rounds the noise and relevance schedules run over.
    bn_statistics: "local" (the default): BatchNorm running statistics are updated from the inputs as
        trained (noised where noise was added), but a delta whose round noised any input shares no
        running statistic (their delta is zero, FedBN's rule for that round), so the global model's
        statistics come only from rounds shared without noise, whose inputs are what the rest of the
        update reveals anyway; where every round is noised (a fixed noise rule, the malicious server)
        the global model keeps its first statistics. "noised" shares every round's statistics, those of
        the noised inputs, which tell an attacker no more than the rest of the update but skew the
        global model's normalisation of clean images. "clean" updates them from an extra no-grad
        forward of the clean batch instead, so the global model's statistics match the clean images
        it is used on; but the shared delta then carries momentum x the clean batch's per-channel
        means and variances exactly, a channel the noise does not cover.
    update_kind: what ``protected_update()`` returns: the weight "delta" of the round (FedAvg), or the
        "gradient" at the weights the round started from (FedSGD: one local step per round).
    seed: seeds the noise and the shadow. None (the default) draws a secret seed per guard: whoever knows
        it can regenerate the noise, so it never leaves the client. Set it only for reproducible experiments.

    Groups are given as objects or field by field under their flat names, e.g.
    ``GuardConfig(noise=NoiseConfig(amplitude=0.2))`` equals ``GuardConfig(noise_amplitude=0.2)``.
    """

    noise: NoiseConfig = field(default_factory=NoiseConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    total_rounds: int = 100
    bn_statistics: BatchNormStatistics = "local"
    update_kind: UpdateKind = "delta"
    seed: int | None = None

    @property
    def noises_every_round(self) -> bool:
        """Whether every round's inputs get noise: the malicious-server threat (the bound never reaches
        zero), or a fixed rule at a non-zero amplitude; the honest server's probe can leave a round clean."""
        return self.calibration.threat == "malicious_server" if self.calibration.enabled else self.noise.amplitude > 0

    def __init__(self, *, noise: NoiseConfig | None = None, masks: MaskConfig | None = None,
                 shadow: ShadowConfig | str | None = None, dp: DPConfig | None = None,
                 calibration: CalibrationConfig | None = None, total_rounds: int = 100,
                 bn_statistics: BatchNormStatistics = "local", update_kind: UpdateKind = "delta",
                 seed: int | None = None, **flat: Any) -> None:
        if isinstance(shadow, str):  # the flat name of shadow.kind
            flat["shadow"], shadow = shadow, None
        groups: dict[str, Any] = {"noise": noise, "masks": masks, "shadow": shadow, "dp": dp,
                                  "calibration": calibration}
        changes: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for name, value in flat.items():
            if name not in FLAT_FIELDS:
                valid = [*FLAT_FIELDS, *(f.name for f in fields(GuardConfig))]
                raise ConfigError(f"GuardConfig has no field {name!r}{suggestion(name, valid)}; "
                                  f"valid: {sorted(set(valid))}")
            group, key = FLAT_FIELDS[name]
            changes[group][key] = value
        for name, cls in GROUPS.items():
            given = groups[name]
            if given is not None and not isinstance(given, cls):
                raise ConfigError(f"GuardConfig({name}=...) must be a {cls.__name__}, got {type(given).__name__}")
            base: Any = given if given is not None else cls()
            object.__setattr__(self, name, replace(base, **changes[name]) if changes[name] else base)
        for name, value in (("total_rounds", total_rounds), ("bn_statistics", bn_statistics),
                            ("update_kind", update_kind), ("seed", seed)):
            object.__setattr__(self, name, value)
        untargeted = self.shadow.kind == "none" and self.masks.relevance_method == "none" and self.noise.kind != "mask"
        _validate(self, lambda: {
            "total_rounds": (self.total_rounds >= 1, "must be >= 1"),
            "calibration": (not self.calibration.enabled or untargeted,
                            "calibrated noise is spatially uniform random noise, which its bound covers; fix: "
                            "shadow='none', relevance_method='none' and a random noise kind, or leakage_target_db=None "
                            "for masks at a fixed amplitude"),
        })

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the flat names read through their group.
        where = FLAT_FIELDS.get(name)
        if where is None or name == "shadow":
            raise AttributeError(f"GuardConfig has no attribute {name!r}")
        return getattr(object.__getattribute__(self, where[0]), where[1])

    def with_(self, **changes: Any) -> GuardConfig:
        """A copy with fields changed, by group or by flat name (validated like a new config)."""
        current: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(changes.get("shadow"), str):  # the flat name of shadow.kind keeps the other shadow fields
            current["shadow"] = replace(self.shadow, kind=changes.pop("shadow"))
        return GuardConfig(**{**current, **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """Every field but the seed: what may travel with an update."""
        return {k: v for k, v in asdict(self).items() if k != "seed"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuardConfig:
        """The config that :meth:`to_dict` or :meth:`public_dict` wrote (e.g. an update's
        ``metadata["config"]``), validated like a new one."""
        data = dict(data)
        groups = {name: GROUPS[name](**data.pop(name)) for name in GROUPS if isinstance(data.get(name), dict)}
        return cls(**groups, **data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GuardConfig:
        """A named preset: default, malicious_server, targeted, attack_targeted, chest_xray, fundus, shadowdef,
        shadow_only, relevance_only, untargeted."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}{suggestion(name, PRESETS)}; choose from {sorted(PRESETS)}") \
                from None
        return base.with_(**overrides)


def derive_seed(seed: int, *parts: object) -> int:
    """A reproducible seed per (seed, client, round, ...): guards restarted with the same base
    seed would otherwise all draw the same noise sequence."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


# The spatially targeted noise of the seed paper's kind at fixed amplitudes: shadow and Grad-CAM
# masks, clean BatchNorm statistics. What the leakage benchmark compares the calibrated default with.
_TARGETED = GuardConfig(shadow="feature_inverter", relevance_method="gradcam", leakage_target_db=None,
                        bn_statistics="clean")

PRESETS: dict[str, GuardConfig] = {
    "default": GuardConfig(),
    "malicious_server": GuardConfig(threat="malicious_server"),
    # The seed paper's formulas (Jiang et al. 2025): generator shadow, temperature 20 on raw
    # maps, top-30% Grad-CAM subtracted with a_t = clip(t/T, 0.1, 0.5), w_t = 0.19 exp(t/T),
    # mask momentum 0.1, the mask itself as the perturbation.
    "shadowdef": GuardConfig(
        noise=NoiseConfig(amplitude=0.19, growth=1.0, kind="mask"),
        masks=MaskConfig(refresh_every=1, vulnerability_temperature=20.0, relevance_temperature=20.0,
                         relevance_weight_min=0.1, relevance_weight_max=0.5, combine="subtract", floor=0.0,
                         normalization="peak", relevance_method="gradcam"),
        shadow=ShadowConfig(kind="generator", steps_per_batch=5),
        leakage_target_db=None,
        bn_statistics="noised",  # as measured; every round is noised, so "local" would share none
    ),
    "targeted": _TARGETED,
    # Measured per modality on the federation benchmark (RESULTS.md). Both spend the noise on updates that cover few
    # images (update_exponent; wrap needs dataset_size), which the attacks invert, so the clients
    # holding most of the data train almost clean and F1 is kept. Chest X-rays: a label-free
    # relevance map and a flatter vulnerability map ("GradGuard-P1U"). Fundus images: a flatter
    # mask; the targeted preset's concentrated noise cost RetinaMNIST 2 F1 points ("GradGuard-F7U").
    "chest_xray": _TARGETED.with_(relevance_class="predicted", vulnerability_temperature=1.0, update_exponent=0.5,
                                  noise_amplitude=0.9),
    "fundus": _TARGETED.with_(mask_floor=0.7, update_exponent=0.5, noise_amplitude=1.0),
    # The vulnerability map taken from what the attack itself recovers, with the Grad-CAM relevance
    # map for utility. A map is made when a sample is first seen (refreshes would repeat the attack
    # every few steps; at 100 iterations one map of a batch of 8 takes seconds on a CPU).
    "attack_targeted": _TARGETED.with_(shadow="gradient_attack", shadow_steps_per_batch=100, refresh_every=1000),
    # Ablations the benchmark reports.
    "shadow_only": _TARGETED.with_(relevance_method="none"),
    "relevance_only": _TARGETED.with_(shadow="none"),
    "untargeted": _TARGETED.with_(shadow="none", relevance_method="none"),
}
