"""The benchmark's cache: every finished unit is a file written atomically, so a run resumes."""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gradguard.eval.bench.spec import BenchConfig, Spec

def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file and rename it into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n"))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Layout:
    """Where a run keeps its files under ``root``.

    Captures and attack cells of the run's first seed have no seed in their names (caches from
    before several seeds were attacked stay valid); other attacked seeds add ``-seed<N>``."""

    root: Path
    first_seed: int = 0

    def _suffix(self, seed: int) -> str:
        return "" if seed == self.first_seed else f"-seed{seed}"

    def train(self, dataset: str, defense: Spec, seed: int) -> Path:
        return self.root / "cells" / "train" / dataset / defense.slug / f"seed{seed}.json"

    def capture(self, dataset: str, defense: Spec, round_: int, *, seed: int) -> Path:
        return self.root / "captures" / dataset / defense.slug / f"round{round_}{self._suffix(seed)}.pt"

    def attack(self, dataset: str, defense: Spec, attack: Spec, round_: int, client: str, *, seed: int) -> Path:
        return (self.root / "cells" / "attack" / dataset / defense.slug / attack.slug
                / f"round{round_}-{client}{self._suffix(seed)}.json")

    @property
    def run(self) -> Path:
        return self.root / "run.json"


class RunMismatchError(ValueError):
    """The results directory holds a run with other settings; its cells cannot be reused."""


def _check_run(layout: Layout, config: BenchConfig) -> None:
    """Refuse to mix cells of runs whose settings differ."""
    fingerprint = config.fingerprint()
    if layout.run.is_file():
        stored = _read_json(layout.run)
        changed = sorted(k for k in fingerprint.keys() | stored.keys() if stored.get(k) != fingerprint.get(k))
        if changed:
            raise RunMismatchError(f"{layout.root} holds a benchmark run with other settings ({', '.join(changed)}: "
                             f"{ {k: stored.get(k) for k in changed} }); use another --out or the same settings")
    else:
        _write_json(layout.run, fingerprint)

