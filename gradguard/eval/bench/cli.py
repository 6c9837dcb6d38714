"""`gradguard bench`: the command line of the benchmark."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import time
from typing import Any, Callable

import torch

from gradguard.eval.attacks import ATTACKS
from gradguard.eval.bench.cache import RunMismatchError
from gradguard.eval.bench.runner import run_bench
from gradguard.eval.bench.spec import BenchConfig, Spec, _specs, large, mode_config
from gradguard.eval.datasets import DatasetError
from gradguard.eval.defenses import DEFENSES
from gradguard.eval.models import MODELS


def _auto_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gradguard bench: --device {name} asked for CUDA, but torch sees no GPU; use --device cpu")
    return name


def config_from_args(args: argparse.Namespace, *, base: BenchConfig | None = None) -> BenchConfig:
    """The mode's preset (or ``base``, a federation experiment's) with every option the user gave on top."""
    config = base if base is not None else mode_config(args.mode)
    if args.large:
        config = large(config)
    changes: dict[str, Any] = {"device": _auto_device(args.device), "progress": not args.no_progress}
    if args.data is not None:
        args.datasets = args.data
    for option in ("datasets", "image_size", "model", "width", "scale", "distribution", "rounds", "lr", "lr_schedule",
                   "capture_rounds", "clients"):
        value = getattr(args, option)
        if value is not None:
            changes[option] = tuple(value) if isinstance(value, list) else value
    if args.defenses is not None:
        changes["defenses"] = _specs(*args.defenses)
    attacks = _specs(*args.attacks) if args.attacks is not None else config.attacks
    if args.attack_iterations is not None:
        attacks = tuple(Spec(a.name, {**a.params, "iterations": args.attack_iterations}) for a in attacks)
    changes["attacks"] = attacks
    if args.seed is not None or args.seeds is not None:
        first = args.seed if args.seed is not None else config.seeds[0]
        changes["seeds"] = tuple(range(first, first + (args.seeds or len(config.seeds))))
    if args.attack_seeds is not None:
        changes["attack_seeds"] = args.attack_seeds
    return dataclasses.replace(config, **changes)


def _run(args: argparse.Namespace, run: Callable[[str], Any], describe: Callable[[Any], str]) -> int:
    """``run(command)`` with the CLI's thread setting and errors; prints ``describe(outcome)`` and the files."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        outcome = run("gradguard " + shlex.join(getattr(args, "argv", ["bench"])))
    except (DatasetError, RunMismatchError) as err:  # the message names the file or settings and the fix
        raise SystemExit(f"gradguard bench: {err}") from None
    print(f"gradguard bench: {describe(outcome)} in {time.perf_counter() - start:.0f} s")
    for path in outcome.files:
        print(f"  {path}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from gradguard.eval.bench.experiment import ExperimentError, experiment_kind, load_experiment, load_federation
    from gradguard.eval.bench.leakage import run_leakage

    datasets = args.data or args.datasets
    try:
        if experiment_kind(args.experiment) == "federation":
            config = config_from_args(args, base=load_federation(args.experiment))
            experiment = None
        else:
            experiment = load_experiment(args.experiment, device=_auto_device(args.device),
                                         progress=not args.no_progress, datasets=tuple(datasets) if datasets else None)
    except (ExperimentError, ValueError, KeyError) as err:
        raise SystemExit(f"gradguard bench: {err}") from None
    if experiment is None:
        return _federation(args, config)
    return _run(args, lambda command: run_leakage(experiment, args.out, report_dir=args.report_dir, command=command,
                                                  compute=not args.report_only),
                lambda o: f"{o.trained} utility runs and {o.attacked} attacked updates computed; report in {o.report}")


def _main(args: argparse.Namespace) -> int:
    if args.experiment is not None:
        return _experiment(args)
    try:
        config = config_from_args(args)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"gradguard bench: {err}") from None
    return _federation(args, config)


def _federation(args: argparse.Namespace, config: BenchConfig) -> int:
    return _run(args, lambda command: run_bench(config, args.out, report_dir=args.report_dir, command=command),
                lambda o: f"{o.trained} training runs and {o.attacked} attack cells computed; results in {o.results}")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the evaluation protocol: FedAvg, defenses, attacks, leakage and utility",
        description="Run the evaluation protocol end to end, resumable." + " Options left out take the mode's values "
                    "(see gradguard.eval.bench.mode_config).")
    modes = parser.add_mutually_exclusive_group()
    for mode, text in (("smoke", "the test's plumbing check (about a minute)"),
                       ("quick", "every defense, small (the default; < 10 min on 2 CPU cores)"),
                       ("full", "both datasets, 10 defense settings, 3 attacks, 5 seeds")):
        modes.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=text)
    parser.set_defaults(mode="quick", func=_main)
    parser.add_argument("--large", action="store_true",
                        help="the GPU size: ResNet-18 at 64 px, 0.75 of the layout, 40 rounds, full-size attacks")
    parser.add_argument("--out", default="bench-out", help="results and cache directory; a rerun resumes it")
    parser.add_argument("--report-dir", help="write results.json, tables and figures here instead of --out "
                                             "(the cache of cells and captured updates stays in --out)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, help="first seed")
    parser.add_argument("--seeds", type=int, help="number of seeds (utility is averaged over them)")
    parser.add_argument("--attack-seeds", type=int, metavar="N",
                        help="attack the runs of the first N seeds (default 1); leakage is averaged over all "
                             "their captured updates")
    parser.add_argument("--experiment", metavar="FILE",
                        help="run the leakage benchmark of an experiment file (benchmarks/experiments/*.toml)")
    parser.add_argument("--report-only", action="store_true",
                        help="with --experiment: write the report from the cached cells, computing nothing")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="MedMNIST names (files in the data directory)")
    parser.add_argument("--data", nargs="+", metavar="PATH.npz",
                        help="any .npz file(s) in the MedMNIST layout (train/val/test images and labels), grey "
                             "or RGB; replaces --datasets")
    parser.add_argument("--defenses", nargs="+", metavar="SPEC",
                        help=f"name or name:key=value,...; registered: {', '.join(sorted(DEFENSES))}")
    parser.add_argument("--attacks", nargs="+", metavar="SPEC",
                        help=f"name or name:key=value,...; registered: {', '.join(sorted(ATTACKS))}")
    parser.add_argument("--attack-iterations", type=int, help="iterations of every attack")
    parser.add_argument("--model", choices=MODELS)
    parser.add_argument("--width", type=int, help="SmallCNN / ConvNet width")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--scale", type=float, help="fraction of the 9-client layout's dataset sizes")
    parser.add_argument("--distribution", choices=("iid", "dirichlet"))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--lr", type=float, help="clients' SGD learning rate")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), help="learning rate over the rounds")
    parser.add_argument("--capture-rounds", type=int, nargs="+", metavar="T", help="rounds attacked (1-based)")
    parser.add_argument("--clients", nargs="+", metavar="ID", help="attacked client ids, e.g. client9 client1")
    # The models and batches are small: one thread per process is as fast, and on a shared
    # machine several threads contend for busy cores (IG measured at 40 vs ~1 step/s).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")

