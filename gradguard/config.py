"""Configuration of the guard: one dataclass, documented defaults, named presets."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

NoiseKind = Literal["gaussian", "smooth", "uniform", "mask"]
ShadowKind = Literal["feature_inverter", "generator", "none"]
RelevanceMethod = Literal["gradcam", "guided_gradcam", "saliency", "integrated_gradients", "none"]
CombineRule = Literal["product", "subtract"]


@dataclass(frozen=True)
class GuardConfig:
    """Every knob of GradGuard. Defaults are the measured ``default`` preset.

    Noise
        noise_amplitude: w_0, the noise's peak amplitude as a fraction of the image's max |x|.
        amplitude_growth: w_t = w_0 * exp(amplitude_growth * t / T). The paper (``shadowdef``)
            uses w_0 = 0.19 and growth 1.0 (noise grows 2.7x over training). A negative growth
            decays the noise; it keeps F1 but protects less (RESULTS.md, session 6).
        batch_exponent: a step's batch of B images is noised at w_t * B^(-batch_exponent), so
            with a non-zero exponent noise_amplitude is the amplitude for a single image. In a
            batch-averaged gradient an image's share is 1/B while B independent noises average
            down as 1/sqrt(B): 0.5 keeps each image's signal-to-noise ratio in the update about
            the same whatever the batch, and spends the noise on small batches, the ones attacks
            invert. 0 (the default) noises every batch alike.
        update_exponent: the same rule one level up: a client whose shared update covers N images
            (``wrap(..., dataset_size=N)``) noises them at w_t * N^(-update_exponent), on top of the
            batch rule. Over several local steps each image's share of the update is 1/N and
            the N noises add up as sqrt(N), so 0.5 keeps each image's signal-to-noise ratio in
            the update about the same whatever N, and spends the noise on the clients that
            share few images. 0 (the default) ignores N.
        noise_kind: "gaussian"/"uniform" draw fresh white noise shaped by the mask at every step;
            "smooth" draws Gaussian noise low-passed over ``noise_smoothness`` pixels (a denoising
            attacker cannot strip it); "mask" adds the mask itself (deterministic, sample-specific).
        noise_smoothness: the low-pass filter's sigma in pixels for noise_kind="smooth".
        total_rounds: T, the number of FL rounds the schedules run over.
    Masks
        refresh_every: k; a sample's mask is computed when it is first seen and then every k
            local steps (masks of unseen samples are computed in the same step).
        mask_momentum: weight of the previous mask when a refreshed one arrives (paper: 0.1).
        vulnerability_temperature: softmax temperature applied to the rank-equalised inverse
            shadow error (values in [0, 1]); lower means sharper. The paper uses 20 on raw values.
        relevance_method: captum attribution of the global model for the sample's class.
        relevance_class: which class the attribution explains: "label" (the class given to
            ``set_sample_ids``, the global model's prediction where none is given) or
            "predicted" (always the prediction). A label-conditioned map makes where the noise
            is weak depend on the label, a shortcut the model can learn (measured on RetinaMNIST).
        relevance_top_fraction: only the top fraction of relevance pixels count (paper: 0.3).
        relevance_temperature: kept pixels weigh exp((rank - 1) / T): with T = 1 every kept pixel
            weighs 0.74..1, so the diagnostic region is spared strongly (the paper's T = 20 on raw
            CAM values spares it by about 5%).
        relevance_weight_min / relevance_weight_max: a_t = clip(t / T, min, max), how strongly
            relevant pixels are spared (paper: 0.1 / 0.5).
        combine: "product": M = V * (1 - a_t R) (relevant pixels get proportionally less noise);
            "subtract": M = V - a_t R (the paper's rule).
        mask_floor: every pixel gets at least this fraction of the peak, so no region is left
            noise-free for an attacker to read.
        mask_normalization: "rms" scales each mask to unit root-mean-square, so noise_amplitude
            fixes the noise energy per image whatever the mask's shape (equal-energy ablations
            are then exact); "peak" scales it to max 1 (the paper's convention).
    Shadow
        shadow: "feature_inverter" (ours: a small decoder from what the last layer's gradient
            reveals back to the image, co-trained on the client's data), "generator" (the paper's
            latent-code generator with gradient + BN-statistics matching) or "none".
        shadow_lr, shadow_steps_per_batch, shadow_width: its optimiser and size.
        shadow_train_every: co-train the shadow on every n-th local step's batch (its cost is
            then 1/n of a small decoder step per step; masks change only every refresh anyway).
    Hybrid differential privacy (off when dp_noise_multiplier is None)
        dp_noise_multiplier, dp_max_grad_norm, dp_delta, dp_accountant: Opacus DP-SGD on top
            of the masks; the update then carries (epsilon, delta).
    Other
        bn_statistics: "clean" updates BatchNorm running statistics from an extra no-grad
            forward of the clean batch (the noised forward leaves them alone), so the global
            model's statistics match the clean images it is used on; costs one forward per
            step and shares clean batch statistics (per channel) in the update. "noised" keeps
            the statistics of the noised inputs (the paper's behaviour; the model then sees
            other statistics at test time).
        update_kind: what ``protected_update()`` returns, a weight "delta" or the "gradient".
        seed: seeds the noise and the shadow. None (the default) draws a secret seed per guard:
            whoever knows the seed can regenerate the noise, so it never leaves the client
            (it is not in the update's metadata). Set it only for reproducible experiments.
    """

    # Measured (RESULTS.md): smooth noise survives the adaptive attacker's denoising where white
    # noise of the same energy does not, and 0.3 keeps PneumoniaMNIST F1 within a point.
    noise_amplitude: float = 0.3
    amplitude_growth: float = 0.0
    batch_exponent: float = 0.0
    update_exponent: float = 0.0
    noise_kind: NoiseKind = "smooth"
    noise_smoothness: float = 1.5
    total_rounds: int = 100

    refresh_every: int = 10
    mask_momentum: float = 0.1
    vulnerability_temperature: float = 0.25
    relevance_method: RelevanceMethod = "gradcam"
    relevance_class: Literal["label", "predicted"] = "label"
    relevance_top_fraction: float = 0.3
    relevance_weight_min: float = 0.5
    relevance_weight_max: float = 0.9
    relevance_temperature: float = 1.0
    combine: CombineRule = "product"
    mask_floor: float = 0.1
    mask_normalization: Literal["rms", "peak"] = "rms"

    shadow: ShadowKind = "feature_inverter"
    shadow_lr: float = 2e-3
    shadow_steps_per_batch: int = 1
    shadow_train_every: int = 4
    shadow_width: int = 16

    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"

    bn_statistics: Literal["clean", "noised"] = "clean"
    update_kind: Literal["delta", "gradient"] = "delta"
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "noise_amplitude": self.noise_amplitude >= 0,
            "batch_exponent": self.batch_exponent >= 0,
            "update_exponent": self.update_exponent >= 0,
            "noise_smoothness": self.noise_smoothness > 0,
            "total_rounds": self.total_rounds >= 1,
            "refresh_every": self.refresh_every >= 1,
            "mask_momentum": 0 <= self.mask_momentum < 1,
            "vulnerability_temperature": self.vulnerability_temperature > 0,
            "relevance_temperature": self.relevance_temperature > 0,
            "relevance_top_fraction": 0 < self.relevance_top_fraction <= 1,
            "relevance_weight_min": 0 <= self.relevance_weight_min <= self.relevance_weight_max <= 1,
            "mask_floor": 0 <= self.mask_floor <= 1,
            "shadow_steps_per_batch": self.shadow_steps_per_batch >= 0,
            "shadow_train_every": self.shadow_train_every >= 1,
            "dp_max_grad_norm": self.dp_max_grad_norm > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid GuardConfig field(s) {bad}: see the GuardConfig docstring for ranges")

    def with_(self, **changes: Any) -> "GuardConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """Every field but the seed: what may travel with an update."""
        return {k: v for k, v in asdict(self).items() if k != "seed"}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GuardConfig":
        """A named preset: default, chest_xray, fundus, shadowdef, shadow_only, relevance_only, untargeted."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
        return replace(base, **overrides)


def derive_seed(seed: int, *parts: object) -> int:
    """A reproducible seed per (seed, client, round, ...): guards restarted with the same base
    seed would otherwise all draw the same noise sequence."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


PRESETS: dict[str, GuardConfig] = {
    "default": GuardConfig(),
    # The seed paper's formulas (Jiang et al. 2025): generator shadow, temperature 20 on raw
    # maps, top-30% Grad-CAM subtracted with a_t = clip(t/T, 0.1, 0.5), w_t = 0.19 exp(t/T),
    # mask momentum 0.1, the mask itself as the perturbation.
    "shadowdef": GuardConfig(
        noise_amplitude=0.19,
        amplitude_growth=1.0,
        noise_kind="mask",
        refresh_every=1,
        vulnerability_temperature=20.0,
        relevance_temperature=20.0,
        relevance_weight_min=0.1,
        relevance_weight_max=0.5,
        combine="subtract",
        mask_floor=0.0,
        mask_normalization="peak",
        bn_statistics="noised",
        shadow="generator",
        shadow_steps_per_batch=5,
    ),
    # Measured per modality (RESULTS.md, session 8). Both spend the noise on updates that cover few
    # images (update_exponent; wrap needs dataset_size), which the attacks invert, so the clients
    # holding most of the data train almost clean and F1 is kept. Chest X-rays: a label-free
    # relevance map and a flatter vulnerability map ("GradGuard-P1U"). Fundus images: a flatter
    # mask; the default's concentrated noise cost RetinaMNIST 2 F1 points ("GradGuard-F7U").
    "chest_xray": GuardConfig(relevance_class="predicted", vulnerability_temperature=1.0, update_exponent=0.5,
                              noise_amplitude=0.9),
    "fundus": GuardConfig(mask_floor=0.7, update_exponent=0.5, noise_amplitude=1.0),
    # Ablations the benchmark reports.
    "shadow_only": GuardConfig(relevance_method="none"),
    "relevance_only": GuardConfig(shadow="none"),
    "untargeted": GuardConfig(shadow="none", relevance_method="none"),
}
