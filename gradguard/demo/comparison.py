"""The attack: one image's update under each defense, attacked alike, scored against the image.

Fairness: every defense protects the same image (batch 1, one local step, the same global
model and learning rate), and the same Inverting Gradients attack (settings, seed, the true
label given) attacks each update. The defenses come from :mod:`gradguard.eval.defenses`, so the
demo measures what the benchmark measures; as there, each reconstruction is scored plain and
in each of the adaptive attacker's variants (:mod:`gradguard.eval.adaptive`), and the strongest
(higher PSNR) counts. It is also scored above the attacker's prior (:func:`score_prior`): an
absolute PSNR says little where the public mean image alone already scores well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from gradguard.eval.adaptive import adaptive_variants
from gradguard.eval.attacks import Attack
from gradguard.eval.datasets import ImageSet
from gradguard.eval.defenses import Defense
from gradguard.eval.metrics import LPIPSMetric, above_prior, prior_guesses, psnr, ssim, strongest_prior

# The attacked update is one plain SGD step; its learning rate only scales the update (the
# attack divides it out), and 0.1 keeps float32 weight deltas far above rounding error.
UPDATE_LR = 0.1


@dataclass
class Prior:
    """What the attacker knows without any update: the mean image of its public images and the
    mean image of the attacked image's class among them (the attack is given the true label),
    scored against the attacked image like a reconstruction; per metric the better guess counts,
    as in ``make bench-leakage``."""

    guess: str  # the guess with the higher PSNR: "mean" or "class_mean"
    psnr: float
    ssim: float
    lpips: float | None


@dataclass
class Outcome:
    """One defense's row: the attack's reconstruction and how close it came to the image."""

    defense: str
    label: str  # how the report names the defense and its setting
    reconstruction: Tensor  # [1, C, H, W] in [0, 1]: the variant that was scored
    variant: str  # "plain", or the adaptive variant ("tv", "nlm+calibrated", ...) with the highest PSNR
    psnr: float
    ssim: float
    lpips: float | None  # None when LPIPS could not be loaded
    epsilon: float | None  # DP-SGD's (epsilon, delta) guarantee, else None
    delta: float | None
    attack_seconds: float
    # The reconstruction's PSNR and SSIM minus the prior's: > 0 means the update told the attacker
    # more than it knew. None without public images (the offline fallback).
    psnr_above_prior: float | None = None
    ssim_above_prior: float | None = None


def _scores(images: Tensor, image: Tensor, lpips_metric: LPIPSMetric | None) -> dict[str, float]:
    """One image's PSNR, SSIM and LPIPS (NaN without LPIPS) under the names of :func:`leakage`."""
    return {"psnr_best": psnr(images, image).item(), "ssim_best": ssim(images, image).item(),
            "lpips_best": lpips_metric(images, image).item() if lpips_metric else math.nan}


def score_prior(public: ImageSet, image: Tensor, label: Tensor, lpips_metric: LPIPSMetric | None) -> Prior:
    """The attacker's prior for ``image`` [C, H, W] of class ``label``, from its ``public`` images."""
    guesses = prior_guesses(public.images, public.labels, label.reshape(1).cpu(), num_classes=public.num_classes)
    guess, best = strongest_prior({name: _scores(g, image[None].cpu(), lpips_metric) for name, g in guesses.items()})
    return Prior(guess=guess, psnr=best["psnr_best"], ssim=best["ssim_best"],
                 lpips=None if math.isnan(best["lpips_best"]) else best["lpips_best"])


def compare_defenses(defenses: dict[str, tuple[str, Defense]], *, model: nn.Module, image: Tensor, label: Tensor,
                     num_classes: int, attack: Attack, round: int, total_rounds: int, client_id: str,
                     lpips_metric: LPIPSMetric | None, public: Tensor | None = None,
                     prior: Prior | None = None) -> list[Outcome]:
    """Attack ``image``'s update under each of ``defenses`` ({name: (report label, defense)}).

    ``public``: images of the same kind held by the attacker; the adaptive attacker then also
    restores brightness and contrast (:func:`gradguard.eval.adaptive.calibrate`). ``prior``: the
    attacker's guess without an update, which each reconstruction is also scored above."""
    image, label = image[None].cpu(), label.reshape(1).cpu()
    outcomes = []
    for name, (text, defense) in defenses.items():
        update = defense.local_update(model, [(image, label)], lr=UPDATE_LR, round=round, total_rounds=total_rounds,
                                      client_id=client_id)
        channels, height, width = image.shape[1:]
        result = attack.reconstruct(model=model, update=update, image_shape=(channels, height, width),
                                    num_classes=num_classes, labels=label)
        variants = adaptive_variants(result.images, public)
        variant = max(variants, key=lambda v: psnr(variants[v], image).item())
        chosen = variants[variant]
        scores = _scores(chosen, image, lpips_metric)
        above = None if prior is None else above_prior(
            # The report gives LPIPS as it is; only PSNR and SSIM are set against the prior.
            scores, {"psnr_best": prior.psnr, "ssim_best": prior.ssim, "lpips_best": math.nan})
        outcomes.append(Outcome(
            defense=name, label=text, reconstruction=chosen, variant=variant, psnr=scores["psnr_best"],
            ssim=scores["ssim_best"], lpips=None if lpips_metric is None else scores["lpips_best"],
            epsilon=update.epsilon, delta=update.delta, attack_seconds=result.seconds,
            psnr_above_prior=None if above is None else above["psnr"],
            ssim_above_prior=None if above is None else above["ssim"]))
    return outcomes
