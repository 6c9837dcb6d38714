"""A benchmark invocation over its cache: computes what is missing, then writes the report."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradguard.eval.bench.cache import Layout, _check_run, _read_json, _write_json
from gradguard.eval.bench.cells import attack_cell
from gradguard.eval.bench.federation import Data, attacked_clients, cached_run, defense_settings, train_run
from gradguard.eval.bench.spec import BenchConfig, Spec
from gradguard.eval.metrics import LPIPSMetric
from gradguard.eval.partition import partition_clients
from gradguard.eval.report import write_report
from gradguard.progress import progress_bar


@dataclass
class BenchOutcome:
    """What one invocation did: the results file and how many units it computed (0 on a full resume)."""

    results: Path
    trained: int
    attacked: int
    files: list[Path]


class _Runner:
    """One invocation over a cache: computes what is missing, counts it, reads back the rest."""

    def __init__(self, config: BenchConfig, layout: Layout, bar: tqdm):
        self.config, self.layout, self.bar = config, layout, bar
        self.trained = self.attacked = 0
        self._lpips: LPIPSMetric | None = None  # loaded when the first attack cell is computed

    def runs(self, data: Data, defense: Spec, targets: list[str]) -> list[dict[str, Any]]:
        """The training records of every seed; an attacked seed's run is redone when a capture
        that a missing attack cell needs is gone (or was never kept: a seed attacked only now)."""
        config, layout, name = self.config, self.layout, data.train.name
        settings = defense_settings(defense)
        records = []
        for seed in config.seeds:
            path = layout.train(name, defense, seed)
            capture = seed in config.seeds_attacked
            record = cached_run(path, settings)
            stale = record is None and path.is_file()
            if stale:  # its attack cells inverted the stale run's updates
                for round_, client, attack in itertools.product(config.rounds_attacked, targets, config.attacks):
                    layout.attack(name, defense, attack, round_, client, seed=seed).unlink(missing_ok=True)
            needed = {round_ for round_ in config.rounds_attacked for client in targets for attack in config.attacks
                      if not layout.attack(name, defense, attack, round_, client, seed=seed).is_file()
                      } if capture else set()
            lost = any(not layout.capture(name, defense, r, seed=seed).is_file() for r in needed)
            if record is None or lost:
                self.bar.set_postfix_str(f"{name} {defense.label} train seed {seed}")
                _write_json(path, train_run(config, data, defense, seed, layout, capture=capture))
                self.trained += 1
                record = _read_json(path)
            records.append(record)
            self.bar.update()
        return records

    def cells(self, data: Data, defense: Spec, targets: list[str]) -> list[dict[str, Any]]:
        """The attack records of every attacked seed's captured updates and every attack, with
        their images' path."""
        config, layout, name = self.config, self.layout, data.train.name
        records = []
        for seed in config.seeds_attacked:
            for round_ in config.rounds_attacked:
                capture = None  # loaded once per round, only if a cell of it is missing
                for client in targets:
                    for attack in config.attacks:
                        path = layout.attack(name, defense, attack, round_, client, seed=seed)
                        if not path.is_file():
                            self.bar.set_postfix_str(f"{name} {defense.label} {attack.label} seed {seed} "
                                                     f"r{round_} {client}")
                            if capture is None:
                                capture = torch.load(layout.capture(name, defense, round_, seed=seed),
                                                     weights_only=True)
                            self._lpips = self._lpips or LPIPSMetric(device=config.device)
                            _write_json(path, attack_cell(config, data, defense, attack, round_, client, capture,
                                                          self._lpips, path.with_suffix(".pt"), seed=seed))
                            self.attacked += 1
                        images = path.with_suffix(".pt").relative_to(layout.root)
                        # Cells from before several seeds were attacked carry no seed: the first one's.
                        records.append({**_read_json(path), "seed": seed, "images": str(images)})
                        self.bar.update()
        return records


def run_bench(config: BenchConfig, out: str | Path, *, report_dir: str | Path | None = None,
              command: str | None = None) -> BenchOutcome:
    """Run (or resume) the benchmark with its cache in ``out``; write results.json, tables and
    figures to ``report_dir`` (default ``out``)."""
    layout = Layout(Path(out), first_seed=config.seeds[0])
    _check_run(layout, config)
    datasets = {name: Data.load(name, config.image_size) for name in config.datasets}
    targets = {name: attacked_clients(config, partition_clients(
        data.train.labels, scale=config.scale, distribution=config.distribution, alpha=config.alpha,
        seed=config.seeds[0])) for name, data in datasets.items()}
    units = sum(len(config.defenses) * (len(config.seeds) + config.attack_seeds * len(config.rounds_attacked)
                                         * len(targets[name]) * len(config.attacks)) for name in datasets)
    runs: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    with progress_bar(total=units, desc="bench", enabled=config.progress) as bar:
        runner = _Runner(config, layout, bar)
        for name, data in datasets.items():
            for defense in config.defenses:
                runs += runner.runs(data, defense, targets[name])
                cells += runner.cells(data, defense, targets[name])
    results = {"command": command, "config": config.to_dict(), "fingerprint": config.fingerprint(),
               "computed": {"train_runs": runner.trained, "attack_cells": runner.attacked},
               "runs": runs, "cells": cells}
    report_root = Path(report_dir) if report_dir is not None else layout.root
    files = write_report(results, report_root, cache=layout.root)
    return BenchOutcome(results=report_root / "results.json", trained=runner.trained, attacked=runner.attacked,
                        files=files)

