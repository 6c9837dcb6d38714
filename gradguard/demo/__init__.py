"""`gradguard demo`: the main job, end to end on one machine in a few minutes.

Three GradGuard clients train a SmallCNN on PneumoniaMNIST for a few FedAvg rounds, sending
protected updates over gRPC to an in-process aggregator on loopback; the same clients also train
without a defense and with Opacus DP-SGD, for each defense's utility. Then one client's update
of one image is attacked (Inverting Gradients) without a defense, with GradGuard and with
DP-SGD, and a report (index.html, README.md, results.json, figures) is written: each defense's
accuracy and F1 beside its leakage above the attacker's prior. The same --seed gives the same
report.
Without MedMNIST data and offline, only the attack part runs, on real medical images shipped
inside the scikit-image and pydicom wheels.

    gradguard demo --out gradguard-report            # make demo
    gradguard demo --rounds 1 --attack-iterations 50 # a quick look
    gradguard demo --preset chest_xray               # another GradGuard preset
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gradguard.config import PRESETS
from gradguard.demo.config import DemoConfig

__all__ = ["DemoConfig", "register"]


# Extra help for the options generated from DemoConfig's fields (its docstring documents them all).
_HELP = {
    "dataset": "MedMNIST file name (<name>.npz)",
    "lr": "the clients' Adam learning rate",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "threads": "torch threads (0: torch's default)",
    "preset": f"the GradGuard clients' GuardConfig preset, one of {', '.join(PRESETS)}",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    parser = subparsers.add_parser("demo", help="federated training with GradGuard over gRPC, an attack, a report",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", type=Path, default=Path("gradguard-report"),
                        help="folder the report goes into (default: %(default)s)")
    for field in dataclasses.fields(DemoConfig):
        default = getattr(defaults, field.name)
        if not isinstance(default, bool):  # the two switches follow, as --no-*
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default,
                                help=f"{_HELP.get(field.name, '')} (default: %(default)s)".lstrip())
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download MedMNIST (without local data: the offline fallback)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars (hidden anyway when stderr is not a terminal)")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from gradguard.demo.run import resolve_device, run_demo  # the evaluation stack loads only when the demo runs

    names = {field.name for field in dataclasses.fields(DemoConfig)}
    try:
        config = DemoConfig(**{name: value for name, value in vars(args).items() if name in names})
        resolve_device(config.device)
    except (ValueError, RuntimeError) as err:  # torch.device() raises RuntimeError on a malformed name
        raise SystemExit(f"gradguard demo: {err}") from None
    result, page = run_demo(config, args.out)
    for name, accuracy, f1, psnr_up, ssim_up, psnr, ssim, lpips, variant, guarantee in result.table():
        print(f"  {name:<32} accuracy {accuracy:>5}  macro-F1 {f1:>5}  above prior: PSNR {psnr_up:>6} dB "
              f"SSIM {ssim_up:>6}  |  PSNR {psnr:>6} dB  SSIM {ssim:>6}  LPIPS {lpips:>5}  ({variant})  "
              f"(eps, delta) {guarantee}")
    print(f"{result.prior_text()}\n{result.utility_text()}\nreport: {page}")
    return 0
