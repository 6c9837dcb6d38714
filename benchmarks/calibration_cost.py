"""What calibrated noise costs a client: round time of plain training, the calibrated default (honest
server: the probe), the malicious-server setting (the bound alone) and the targeted masks, interleaved.

Per model, four copies of one model train the same rounds (one local epoch over the same images,
the same batches) one variant after another within each round, so machine noise hits them alike.
The honest server's probe runs in the first round (the first batch alone), again in the second
(where the guard mixes the images it saw into a delta's gradient, 16 of them here) and every
``probe_every`` rounds after; the share of calibration in client time is (variant - plain) / variant
over the whole run, and per round with and without a probe.

    python benchmarks/calibration_cost.py [--models smallcnn,resnet18] [--rounds 5] [--images 32]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from _common import write_result

from gradguard import GradGuard, GuardConfig
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.models import build_model

VARIANTS: dict[str, GuardConfig | None] = {
    "plain": None,
    "gradguard": GuardConfig(seed=0),
    "malicious_server": GuardConfig.preset("malicious_server", seed=0),
    "targeted": GuardConfig.preset("targeted", seed=0),
}


def one_round(model: torch.nn.Module, config: GuardConfig | None, guard: GradGuard | None,
              batches: list[tuple[torch.Tensor, torch.Tensor]], round_: int) -> tuple[float, GradGuard | None]:
    """Seconds of one local epoch (wrap, steps and the shared update) and the guard kept for the next;
    the guard is told the round's image count, as a client that lets the probe mix them tells it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    start = time.perf_counter()
    if config is not None:
        guard = guard or GradGuard(config)
        guard.begin_round(round_)
        guard.wrap(model, optimizer, dataset_size=sum(len(x) for x, _ in batches))
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    if guard is not None:
        guard.protected_update()
        guard.cleanup()
    return time.perf_counter() - start, guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smallcnn,resnet18")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=32, help="the client's images (one local epoch per round)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=32)
    args = parser.parse_args()
    data = load_medmnist("pneumoniamnist", "train", size=args.image_px)
    batches = [(data.images[i:i + args.batch], data.labels[i:i + args.batch])
               for i in range(0, args.images, args.batch)]
    figures: dict[str, dict] = {}
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        base = build_model(model_name, in_channels=1, num_classes=2)
        models = {v: copy.deepcopy(base).train() for v in VARIANTS}
        guards: dict[str, GradGuard | None] = {v: None for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        probed: list[int] = []  # rounds in which the calibrated default's probe ran
        for r in range(args.rounds):
            order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]
            for v in order:
                seconds, guards[v] = one_round(models[v], VARIANTS[v], guards[v], batches, r)
                times[v].append(seconds)
            calibrated = guards["gradguard"]
            if calibrated is not None and calibrated._probed is not None and calibrated._probed[0] == r:
                probed.append(r)
        plain = times["plain"]
        result: dict[str, dict] = {"round_seconds": {v: [round(t, 3) for t in ts] for v, ts in times.items()},
                                   "probed_rounds": probed}
        for v in list(VARIANTS)[1:]:
            total = sum(times[v])
            result[v] = {
                "share_of_client_time": round((total - sum(plain)) / total, 3),
                "ratio_to_plain": round(total / sum(plain), 2),
                "extra_seconds_per_round_with_probe": round(statistics.fmean(
                    times[v][r] - plain[r] for r in probed), 3),
                "extra_seconds_per_round_without_probe": round(statistics.fmean(
                    times[v][r] - plain[r] for r in range(args.rounds) if r not in probed), 3)
                if args.rounds > len(probed) else None,
            }
            print(f"{model_name} {v}: {result[v]}", flush=True)
        figures[model_name] = result
    write_result("calibration_cost", {"models": figures}, {
        "rounds": args.rounds, "images": args.images, "batch": args.batch, "image_px": args.image_px,
        "probe_every": GuardConfig().calibration.probe_every, "probe_steps": GuardConfig().calibration.probe_steps,
        "dataset": "pneumoniamnist", "device": "cpu", "share": "(variant - plain) / variant, whole run"})


if __name__ == "__main__":
    main()
