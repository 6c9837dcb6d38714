"""`gradguard bench`: the evaluation protocol end to end, resumable.

For every dataset and defense setting:

1. **train** (one run per seed): FedAvg over the 9-client layout (scaled), one local epoch per
   client and round, the defense producing each client's update. The first seed's run (the first
   ``attack_seeds`` seeds' runs) keeps the updates of the attacked clients at the capture rounds
   (early, middle, last), together with the global model of that round and the client's images:
   what an attacker sees, plus the truth to score it. The final global model is scored on the
   test split.
2. **attack**: every configured attack on every captured update, by registry name; each
   reconstruction is scored in each of the adaptive attacker's variants (denoised, intensity-
   calibrated; :mod:`gradguard.eval.adaptive`), and the strongest
   (higher PSNR) counts.
3. **report**: ``results.json``, a Markdown table per dataset, image grids and a privacy-utility
   plot (:mod:`gradguard.eval.report`).

Every finished unit (a training run, an attack cell) is a file written atomically under
``<out>/cells``, so an interrupted benchmark resumes where it stopped and recomputes nothing.

The package keeps each part apart: settings (:mod:`.spec`), the cache (:mod:`.cache`), federated
training (:mod:`.federation`), attack cells (:mod:`.cells`), the runner (:mod:`.runner`) and the
command line (:mod:`.cli`).
"""
from gradguard.eval.bench.cache import Layout, RunMismatchError
from gradguard.eval.bench.cells import attack_cell
from gradguard.eval.bench.cli import config_from_args, register
from gradguard.eval.bench.federation import Data, attacked_clients, evaluate, fedavg, train_run
from gradguard.eval.bench.runner import BenchOutcome, run_bench
from gradguard.eval.bench.spec import BenchConfig, Mode, Spec, large, mode_config

__all__ = [
    "BenchConfig", "BenchOutcome", "Data", "Layout", "Mode", "RunMismatchError", "Spec", "attack_cell",
    "attacked_clients", "config_from_args", "evaluate", "fedavg", "large", "mode_config", "register", "run_bench",
    "train_run",
]
