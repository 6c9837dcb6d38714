"""Median time per training step: plain, GradGuard (steady / refresh every step), Opacus DP-SGD.

All variants run in one process on the same batches, interleaved round-robin so that machine
noise hits them alike; figures are ratios to plain training.

    python benchmarks/step_overhead.py [--steps 30] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from tqdm import tqdm

from _common import write_result
from gradguard import GradGuard, GuardConfig
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.models import build_model

VARIANTS = ("plain", "gradguard_steady", "gradguard_every_step", "opacus_dpsgd")


# torchvision's BasicBlock adds its shortcut in place (`out += identity`), which Opacus' hook-based
# per-sample gradients refuse; its expanded-weights mode handles it.
OPACUS_MODE = {"smallcnn": "hooks", "resnet18": "ew"}


def make_variant(variant: str, base: torch.nn.Module, batches, refresh_every: int, model_name: str):
    model = copy.deepcopy(base)
    if variant == "opacus_dpsgd":
        model = ModuleValidator.fix(model)  # Opacus refuses BatchNorm: BN -> GroupNorm
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if variant.startswith("gradguard"):
        k = refresh_every if variant == "gradguard_steady" else 1
        GradGuard(GuardConfig(refresh_every=k)).wrap(model, optimizer)
    elif variant == "opacus_dpsgd":
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batches[0]), batch_size=len(batches[0][1]))
        model, optimizer, _ = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                           noise_multiplier=1.0, max_grad_norm=1.0,
                                                           poisson_sampling=False,
                                                           grad_sample_mode=OPACUS_MODE[model_name])
    model.train()
    return model, optimizer


def step(model, optimizer, x, y, device) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=12, help="untimed steps (every sample seen once)")
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--models", default="smallcnn,resnet18")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_medmnist("pneumoniamnist", "train", size=32)
    ratios, medians = {}, {}
    for model_name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            torch.manual_seed(0)
            base = build_model(model_name, in_channels=1, num_classes=2).to(device)
            # A fixed pool of batches cycled through: the steady state sees known samples.
            pool = [(data.images[i * batch:(i + 1) * batch].to(device), data.labels[i * batch:(i + 1) * batch].to(device))
                    for i in range(4)]
            runs = {v: make_variant(v, base, pool, args.refresh_every, model_name) for v in VARIANTS}
            times = {v: [] for v in VARIANTS}
            for i in tqdm(range(args.warmup + args.steps), desc=f"{model_name}/b{batch}"):
                x, y = pool[i % len(pool)]
                for v in VARIANTS:
                    t = step(*runs[v], x, y, device)
                    if i >= args.warmup:
                        times[v].append(t)
            key = f"{model_name}/b{batch}"
            med = {v: statistics.median(ts) for v, ts in times.items()}
            medians[key] = {v: round(m * 1e3, 3) for v, m in med.items()}
            for v in VARIANTS[1:]:
                ratios[f"{key}/{v}"] = round(med[v] / med["plain"], 3)
    for k, r in ratios.items():
        print(f"{k:45s} {r:6.2f}x plain")
    write_result("step_overhead", {"ratio_to_plain": ratios, "median_ms": medians},
                 {"steps": args.steps, "warmup": args.warmup, "refresh_every": args.refresh_every,
                  "image_px": 32, "device": str(device), "dataset": "pneumoniamnist",
                  "opacus_grad_sample_mode": OPACUS_MODE, "opacus_model": "BatchNorm replaced by GroupNorm",
                  "targets": {"gradguard_steady": "<= 1.5x plain", "vs_opacus": "gradguard_steady < opacus_dpsgd"}})


if __name__ == "__main__":
    main()
