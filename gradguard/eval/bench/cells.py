"""One attack cell: an attack on one captured update, scored plain and in the adaptive variants."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from gradguard.eval.adaptive import adaptive_variants
from gradguard.eval.attacks import ATTACKS, build_attack
from gradguard.eval.bench.cache import _atomic
from gradguard.eval.bench.federation import Data, _model
from gradguard.eval.bench.spec import BenchConfig, Spec
from gradguard.eval.metrics import LPIPSMetric, leakage, pairwise_psnr
from gradguard.update import ProtectedUpdate

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

