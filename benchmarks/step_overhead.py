"""Training step time: plain, GradGuard's targeted masks and Opacus DP-SGD, interleaved on the same batches.

The calibrated default's cost per round is `calibration_cost.py`'s.

Per model and batch size, three fresh copies of one model train side by side, one step of each
variant on the same batch before the next batch, so machine noise hits them alike:

- first step: the first step of a fresh model (GradGuard's includes ``wrap``), after a warm-up of
  torch on another model so that no variant pays the process's start;
- first epoch: the next steps over batches never seen before (every mask and the shadow computed);
- steady state: the pool seen again, masks refreshed every ``--refresh-every`` steps.

Ratios are the variant's mean step time over plain's for the phase (refresh steps included), with
the interquartile range of the paired per-step ratios as the spread. Import time is ``import torch,
gradguard`` minus ``import torch`` in fresh interpreters, interleaved, median of ``--import-repeats``.

    python benchmarks/step_overhead.py [--epoch-batches 5] [--steady-steps 12] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import write_result
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from gradguard import GradGuard, GuardConfig
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.models import build_model

VARIANTS = ("plain", "gradguard", "opacus_dpsgd")
# torchvision's BasicBlock adds its shortcut in place (`out += identity`), which Opacus' hook-based
# per-sample gradients refuse; its expanded-weights mode handles it.
OPACUS_MODE = {"smallcnn": "hooks", "resnet18": "ew"}
GOALS = {"gradguard_steady": 1.3, "gradguard_steady_never_above": 1.5, "gradguard_first_epoch": 2.0,
         "first_step_ratio": 3.0, "import_seconds_over_torch": 0.5}


class Variant:
    """One variant's model and optimizer; GradGuard's are wrapped inside its first timed step."""

    def __init__(self, name: str, base: torch.nn.Module, model_name: str, refresh_every: int, batch: tuple) -> None:
        self.name, self.refresh_every = name, refresh_every
        self.model = ModuleValidator.fix(copy.deepcopy(base)) if name == "opacus_dpsgd" else copy.deepcopy(base)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        if name == "opacus_dpsgd":  # Opacus refuses BatchNorm: BN -> GroupNorm, as its users do
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=len(batch[1]))
            self.model, self.optimizer, _ = PrivacyEngine().make_private(
                module=self.model, optimizer=self.optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=OPACUS_MODE[model_name])
        self.model.train()
        self.wrapped = name != "gradguard"

    def step(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
        start = time.perf_counter()
        if not self.wrapped:
            GradGuard(GuardConfig.preset("targeted", refresh_every=self.refresh_every, seed=0)).wrap(
                self.model, self.optimizer)
            self.wrapped = True
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def phase_figures(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per variant: mean step time over plain's, the IQR of the paired per-step ratios, the median."""
    out = {}
    for name in VARIANTS[1:]:
        paired = sorted(t / p for t, p in zip(times[name], times["plain"]))
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        out[name] = {"ratio": round(statistics.fmean(times[name]) / statistics.fmean(times["plain"]), 3),
                     "paired_ratio_p25": round(quartiles[0], 3), "paired_ratio_p75": round(quartiles[2], 3)}
    out["median_ms"] = {v: round(statistics.median(ts) * 1e3, 2) for v, ts in times.items()}
    return out


def import_seconds(repeats: int) -> tuple[float, float]:
    """Median wall time of ``import torch`` and ``import torch, gradguard`` in fresh interpreters."""
    def timed(code: str) -> float:
        script = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        return float(out.stdout)

    torch_s, both_s = [], []
    for _ in range(repeats):
        torch_s.append(timed("import torch"))
        both_s.append(timed("import torch, gradguard"))
    return statistics.median(torch_s), statistics.median(both_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smallcnn,resnet18")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--epoch-batches", type=int, default=5, help="distinct batches of the first epoch")
    parser.add_argument("--steady-steps", type=int, default=12, help="steps over seen samples")
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--image-px", type=int, default=32)
    parser.add_argument("--import-repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_medmnist("pneumoniamnist", "train", size=args.image_px)
    # Torch's one-time costs (kernels, allocator, autograd engine) land on no measured variant.
    warm = Variant("plain", build_model("smallcnn", in_channels=1, num_classes=2).to(device), "smallcnn", 1,
                   (data.images[:2], data.labels[:2]))
    warm.step(data.images[:8].to(device), data.labels[:8].to(device), device)
    ratios: dict[str, float] = {}
    first_step: dict[str, float] = {}
    details: dict[str, dict] = {}
    for model_name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            key = f"{model_name}/b{batch}"
            torch.manual_seed(0)
            base = build_model(model_name, in_channels=1, num_classes=2).to(device)
            pool = [(data.images[i * batch:(i + 1) * batch].to(device),
                     data.labels[i * batch:(i + 1) * batch].to(device))
                    for i in range(args.epoch_batches)]
            runs = {v: Variant(v, base, model_name, args.refresh_every, pool[0]) for v in VARIANTS}
            phases: dict[str, dict[str, list[float]]] = {p: {v: [] for v in VARIANTS}
                                                          for p in ("first_step", "first_epoch", "steady")}
            for i in range(args.epoch_batches + args.steady_steps):
                phase = "first_step" if i == 0 else "first_epoch" if i < args.epoch_batches else "steady"
                x, y = pool[i % len(pool)]
                for v in VARIANTS:
                    phases[phase][v].append(runs[v].step(x, y, device))
            steady, epoch = phase_figures(phases["steady"]), phase_figures(phases["first_epoch"])
            for v in VARIANTS[1:]:
                name = "gradguard_steady" if v == "gradguard" else v
                ratios[f"{key}/{name}"] = steady[v]["ratio"]
            ratios[f"{key}/gradguard_first_epoch"] = epoch["gradguard"]["ratio"]
            first_step[key] = round(phases["first_step"]["gradguard"][0] / phases["first_step"]["plain"][0], 3)
            details[key] = {"steady": steady, "first_epoch": epoch,
                            "first_step_ms": {v: round(t[0] * 1e3, 1) for v, t in phases["first_step"].items()}}
            print(f"{key}: steady {steady['gradguard']['ratio']}x, first epoch {epoch['gradguard']['ratio']}x, "
                  f"first step {first_step[key]}x, Opacus {steady['opacus_dpsgd']['ratio']}x plain", flush=True)
    torch_s, both_s = import_seconds(args.import_repeats)
    over = round(both_s - torch_s, 3)
    met = {
        "gradguard_steady <= 1.3x": all(r <= GOALS["gradguard_steady"] for k, r in ratios.items() if "steady" in k),
        "gradguard_steady <= 1.5x": all(r <= GOALS["gradguard_steady_never_above"]
                                        for k, r in ratios.items() if "steady" in k),
        "gradguard_first_epoch <= 2x": all(r <= GOALS["gradguard_first_epoch"]
                                           for k, r in ratios.items() if "first_epoch" in k),
        "first_step <= 3x": all(r <= GOALS["first_step_ratio"] for r in first_step.values()),
        "faster than Opacus DP-SGD (steady)": all(ratios[k] < ratios[k.replace("gradguard_steady", "opacus_dpsgd")]
                                                  for k in ratios if k.endswith("gradguard_steady")),
        "import within 0.5 s of torch": over <= GOALS["import_seconds_over_torch"],
    }
    for goal, ok in met.items():
        print(f"{'met   ' if ok else 'MISSED'} {goal}")
    write_result("step_overhead", {
        "ratio_to_plain": ratios, "first_step_ratio": first_step, "import_seconds_over_torch": over,
        "import_seconds": {"torch": round(torch_s, 3), "torch_and_gradguard": round(both_s, 3)},
        "goals_met": met, "details": details,
    }, {"epoch_batches": args.epoch_batches, "steady_steps": args.steady_steps, "refresh_every": args.refresh_every,
        "image_px": args.image_px, "device": str(device), "dataset": "pneumoniamnist",
        "import_repeats": args.import_repeats, "opacus_grad_sample_mode": OPACUS_MODE,
        "opacus_model": "BatchNorm replaced by GroupNorm", "ratio": "mean step time over plain's in the phase; "
        "spread: interquartile range of the paired per-step ratios", "goals": GOALS})


if __name__ == "__main__":
    main()
