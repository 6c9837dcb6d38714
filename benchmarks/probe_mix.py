"""How many of a large client's images the honest-server probe should mix into a delta's gradient.

A client that trains one epoch over 256 images shares a delta that mixes all of them; the guard's
probe attacks the gradient of the round's first batch plus some of the client's other images at
the global weights, a stand-in for that delta that costs more per step with every image it mixes.
Here, on the federation benchmark's SmallCNN (untrained, and trained on other images for a few
steps), the probe attacks mixes of K images drawn from one 256-image client, each scored against
the leave-one-out mean of the client's other images (the prior the guard holds from its second
round on); a draw is *noised* when its worst image is above 0 dB (the default's decision: target
1 dB minus the probe's 1 dB margin). Per K: how often the round is noised, the worst image's
estimate (the probe stops once it shows leakage, as the guard's does) and the probe's time. With
``--null``, the same attack also inverts the gradient of K *other* images of the same classes and is
scored against the K images: what it "recovers" from an update that holds none of them, the floor
of the worst-image estimate, and how often that alone would noise the round (written to
``probe_mix_null.json``). With ``--full`` every attack runs all its steps, so that the worst image of
the real mix and of the null compare in full (``above_null_rate``: how often the real one is higher);
``make bench-probe-mix-large`` does so up to the whole 256-image client (``probe_mix_large.json``).

    python benchmarks/probe_mix.py [--dataset pneumoniamnist] [--mixes 8,16,32] [--draws 4] [--trained 0,200]
                                   [--null] [--full] [--name NAME]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from _common import write_result

from gradguard.calibration.probe import gradient_probe
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.models import build_model


def trained_model(images: torch.Tensor, labels: torch.Tensor, classes: int, steps: int) -> torch.nn.Module:
    """The federation benchmark's SmallCNN (width 16, BatchNorm) after ``steps`` SGD steps of batch 8."""
    torch.manual_seed(0)
    model = build_model("smallcnn", in_channels=images.shape[1], num_classes=classes, width=16).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(len(images), (8,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    return model


def same_classes(labels: torch.Tensor, candidates: torch.Tensor, all_labels: torch.Tensor) -> list[int]:
    """For each of ``labels``, another index of ``candidates`` with that label, each used once."""
    free = [int(i) for i in candidates]
    picked = []
    for label in labels.tolist():
        i = next(j for j in free if int(all_labels[j]) == label)
        free.remove(i)
        picked.append(i)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--mixes", default="8,16,32", help="images in the probed gradient")
    parser.add_argument("--draws", type=int, default=4, help="mixes drawn per K and model")
    parser.add_argument("--trained", default="0,200", help="SGD steps of the probed model")
    parser.add_argument("--client-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=500, help="the probe's attack iterations (the default's)")
    parser.add_argument("--null", action="store_true", help="also attack the gradient of other images")
    parser.add_argument("--full", action="store_true",
                        help="run every attack all its steps (no early stop), so real and null compare in full")
    parser.add_argument("--name", default=None, help="the result's name (default probe_mix or probe_mix_null)")
    args = parser.parse_args()
    data = load_medmnist(args.dataset, "train", size=32)
    pool, rest = torch.arange(args.client_images), torch.arange(args.client_images, len(data))
    client = data.images[pool]
    total = client.double().sum(dim=0)
    mixes = [int(k) for k in args.mixes.split(",")]
    stop = math.inf if args.full else 0.0  # the guard's question is only whether the worst image passes 0 dB
    figures: dict[str, dict[str, dict]] = {}
    for steps in (int(s) for s in args.trained.split(",")):
        model = trained_model(data.images[rest], data.labels[rest], data.num_classes, steps)
        rows: dict[str, dict] = {}
        worst: dict[int, list[float]] = {k: [] for k in mixes}
        null: dict[int, list[float]] = {k: [] for k in mixes}
        seconds: dict[int, list[float]] = {k: [] for k in mixes}
        for draw in range(args.draws):
            order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(draw))]
            # The null's images: the client's images outside every mix, then other clients' images.
            spare = torch.cat([order[max(mixes):], rest])
            for k in mixes:  # the same draw's first images at every K: the mixes are nested
                chosen = order[:k]
                x, y = data.images[chosen], data.labels[chosen]
                prior = ((total[None] - x.double()) / (len(pool) - 1)).to(x.dtype)
                start = time.perf_counter()
                leak = gradient_probe(model, model, x, y, prior, steps=args.steps, seed=draw, stop_above=stop)
                seconds[k].append(time.perf_counter() - start)
                worst[k].append(float(leak.max()))
                line = f"trained {steps} draw {draw} K {k}: worst {worst[k][-1]:+.2f} dB ({seconds[k][-1]:.0f} s)"
                if args.null:
                    others = same_classes(y, spare, data.labels)
                    floor = gradient_probe(model, model, x, y, prior, steps=args.steps, seed=draw, stop_above=stop,
                                           shared=data.images[others])
                    null[k].append(float(floor.max()))
                    line += f", null {null[k][-1]:+.2f} dB"
                print(line, flush=True)
        for k in mixes:
            rows[str(k)] = {"noised_rate": sum(w > 0 for w in worst[k]) / len(worst[k]),
                            "worst_db": [round(w, 2) for w in worst[k]],
                            "seconds_median": round(statistics.median(seconds[k]), 1)}
            if args.null:
                rows[str(k)]["null_noised_rate"] = sum(w > 0 for w in null[k]) / len(null[k])
                rows[str(k)]["null_worst_db"] = [round(w, 2) for w in null[k]]
                rows[str(k)]["above_null_rate"] = sum(w > n for w, n in zip(worst[k], null[k])) / len(worst[k])
        figures[f"trained_{steps}"] = rows
    name = args.name or ("probe_mix_null" if args.null else "probe_mix")
    write_result(name, {"dataset": args.dataset, "models": figures}, {
        "mixes": mixes, "draws": args.draws, "trained_steps": args.trained, "client_images": args.client_images,
        "probe_steps": args.steps, "null": args.null, "early_stop": not args.full,
        "decision": "noised when the worst image is above 0 dB (target 1 dB - margin 1 dB)",
        "prior": "leave-one-out mean of the client's other images", "model": "smallcnn width 16, batch norm, 32 px"})


if __name__ == "__main__":
    main()
