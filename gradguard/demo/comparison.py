"""The attack: one image's update under each defense, attacked alike, scored against the image.

Fairness: every defense protects the same image (batch 1, one local step, the same global
model and learning rate), and the same Inverting Gradients attack (settings, seed, the true
label given) attacks each update. The defenses come from :mod:`gradguard.eval.defenses`, so the
demo measures what the benchmark measures; as there, each reconstruction is scored plain and
in each of the adaptive attacker's variants (:mod:`gradguard.eval.adaptive`), and the strongest
(higher PSNR) counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from gradguard.eval.adaptive import adaptive_variants
from gradguard.eval.attacks import Attack
from gradguard.eval.defenses import Defense
from gradguard.eval.metrics import LPIPSMetric, psnr, ssim

# The attacked update is one plain SGD step; its learning rate only scales the update (the
# attack divides it out), and 0.1 keeps float32 weight deltas far above rounding error.
UPDATE_LR = 0.1


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


def compare_defenses(defenses: dict[str, tuple[str, Defense]], *, model: nn.Module, image: Tensor, label: Tensor,
                     num_classes: int, attack: Attack, round: int, total_rounds: int, client_id: str,
                     lpips_metric: LPIPSMetric | None, prior: Tensor | None = None) -> list[Outcome]:
    """Attack ``image``'s update under each of ``defenses`` ({name: (report label, defense)}).

    ``prior``: images of the same kind held by the attacker; the adaptive attacker then also
    restores brightness and contrast (:func:`gradguard.eval.adaptive.calibrate`)."""
    image, label = image[None].cpu(), label.reshape(1).cpu()
    outcomes = []
    for name, (text, defense) in defenses.items():
        update = defense.local_update(model, [(image, label)], lr=UPDATE_LR, round=round, total_rounds=total_rounds,
                                      client_id=client_id)
        channels, height, width = image.shape[1:]
        result = attack.reconstruct(model=model, update=update, image_shape=(channels, height, width),
                                    num_classes=num_classes, labels=label)
        variants = adaptive_variants(result.images, prior)
        variant = max(variants, key=lambda v: psnr(variants[v], image).item())
        chosen = variants[variant]
        outcomes.append(Outcome(
            defense=name, label=text, reconstruction=chosen, variant=variant, psnr=psnr(chosen, image).item(),
            ssim=ssim(chosen, image).item(), lpips=lpips_metric(chosen, image).item() if lpips_metric else None,
            epsilon=update.epsilon, delta=update.delta, attack_seconds=result.seconds))
    return outcomes

