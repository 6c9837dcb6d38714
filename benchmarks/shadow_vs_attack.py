"""Does the shadow predict a real attacker? Spearman(shadow vulnerability, -IG per-pixel error).

A client co-trains GradGuard's shadow during ordinary local training on its own PneumoniaMNIST
images (32 px, SmallCNN with BatchNorm). Then, for each of N of its images, an Inverting
Gradients attack (cosine + TV, signed Adam) inverts the undefended batch-1 gradient of the same
model; the attack's per-pixel squared error is compared, by Spearman rank correlation, with each
shadow's vulnerability map of that image alone (high = the attacker recovers the pixel = low
error): the co-trained ``feature_inverter`` and ``gradient_attack`` (the guard's own short attack,
whose map is where it beats the prior).

    python benchmarks/shadow_vs_attack.py [--images 16] [--iterations 1000]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from _common import write_result
from gradguard import GradGuard, GuardConfig, ProtectedUpdate
from gradguard.eval.attacks import build_attack
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.models import SmallCNN
from gradguard.progress import progress_bar


def _maps(guard: GradGuard, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The guard's vulnerability map of each image on its own, as the batch-1 gradient attacked below."""
    return torch.cat([guard.explain(images[i:i + 1], labels[i:i + 1]).vulnerability
                      for i in progress_bar(range(len(images)), desc="vulnerability maps")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--client-images", type=int, default=512, help="the client's local data set")
    parser.add_argument("--epochs", type=int, default=2, help="local training that co-trains the shadow")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = load_medmnist("pneumoniamnist", "train", size=32)
    images, labels = data.images[:args.client_images], data.labels[:args.client_images]

    model = SmallCNN(1, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # The shadow trains on every step here; the masks' noise is switched off so that the attack
    # below sees exactly the model the shadow learnt on.
    guard = GradGuard(GuardConfig.preset("shadow_only", noise_amplitude=0.0, shadow_train_every=1, seed=args.seed))
    guard.wrap(model, optimizer)
    for _ in progress_bar(range(args.epochs), desc="co-training the shadow"):
        for i in range(0, len(images), 8):
            optimizer.zero_grad()
            F.cross_entropy(model(images[i:i + 8]), labels[i:i + 8]).backward()
            optimizer.step()
    guard.protected_update()
    targets = images[:args.images]
    maps = {"feature_inverter": _maps(guard, targets, labels[:args.images])}
    guard.cleanup()
    attacker = GradGuard(GuardConfig.preset("attack_targeted", relevance_method="none", seed=args.seed))
    attacker.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0))
    maps["gradient_attack"] = _maps(attacker, targets, labels[:args.images])
    attacker.cleanup()  # unwrapped, or every forward of the attack below would noise its input and make a map

    attack = build_attack("inverting_gradients", iterations=args.iterations, restarts=1, progress=False,
                          seed=args.seed)
    params = dict(model.named_parameters())
    correlations: dict[str, list[float]] = {name: [] for name in maps}
    psnrs = []
    model.train()
    for i in progress_bar(range(args.images), desc="IG attacks"):
        x, y = targets[i:i + 1], labels[i:i + 1]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
        update = ProtectedUpdate(tensors={n: g.detach() for n, g in zip(params, grads)}, kind="gradient",
                                 num_samples=1, num_steps=1, round=0, batch_size=1)
        result = attack.reconstruct(model=model, update=update, image_shape=tuple(x.shape[1:]),
                                    num_classes=2, labels=y)
        error = (result.images - x).pow(2).mean(dim=1)[0]
        psnrs.append(float(10 * torch.log10(1.0 / error.mean())))
        for name, vulnerability in maps.items():
            correlations[name].append(float(spearmanr(vulnerability[i, 0].flatten().numpy(),
                                                      (-error).flatten().numpy())[0]))
    by_shadow = {name: {"mean_spearman": round(float(np.nanmean(values)), 4),
                        "std_spearman": round(float(np.nanstd(values)), 4),
                        "per_image": [round(c, 4) for c in values]} for name, values in correlations.items()}
    for name, row in by_shadow.items():
        print(f"mean Spearman({name} vulnerability, -IG error) over {args.images} images: {row['mean_spearman']:.3f}")
    print(f"attack PSNR {np.mean(psnrs):.1f} dB")
    write_result("shadow_vs_attack", {
        "mean_spearman": by_shadow["feature_inverter"]["mean_spearman"], "by_shadow": by_shadow,
        "n_images": args.images, "attack_psnr_db_mean": round(float(np.mean(psnrs)), 2), "target": "> 0.3",
    }, {"attack": "inverting_gradients", "iterations": args.iterations, "restarts": 1, "image_px": 32,
        "model": "SmallCNN(width=32, BatchNorm)", "batch": 1, "client_images": args.client_images,
        "epochs": args.epochs, "seed": args.seed, "dataset": "pneumoniamnist",
        "gradient_attack_iterations": GuardConfig.preset("attack_targeted").shadow_steps_per_batch})


if __name__ == "__main__":
    main()
