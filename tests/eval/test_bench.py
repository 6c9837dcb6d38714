"""The benchmark harness: the quick mode end to end through the CLI (schema, report files, a
leakage ordering that a broken pipeline would violate), resume without recomputation, and the
pieces that decide what is attacked and how it is scored."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gradguard.cli import build_parser, main
from gradguard.config import PRESETS
from gradguard.eval.adaptive import adaptive_variants, calibrate, denoise, noise_sigma
from gradguard.eval.bench import (BenchConfig, Spec, attacked_clients, config_from_args, fedavg, mode_config,
                                  run_bench)
from gradguard.eval.datasets import data_dir
from gradguard.eval.metrics import psnr
from gradguard.eval.partition import partition_clients
from gradguard.eval.report import GOALS, goal_checks, matched_f1_verdict
from gradguard.update import ProtectedUpdate

CELL_KEYS = {"dataset", "defense", "defense_name", "defense_params", "attack", "round", "client",
             "client_batch_size", "psnr_best", "ssim_best", "lpips_best", "psnr_strict", "ssim_strict",
             "lpips_strict", "variant", "variants", "mean_image", "utility", "images"}
UTILITY_KEYS = {"accuracy_mean", "micro_f1_mean", "macro_f1_mean", "epsilon", "seconds", "collapsed_runs"}


# The quick mode through the CLI, its calibrated default with a 50-step probe and its attack at 200
# of its 300 steps: the harness is under test here, the probe's strength in
# tests/eval/test_calibrated_estimate.py (at 500 steps the default's federation alone takes about
# 5 minutes of this run) and the attack's in tests/eval/test_attacks.py. At 200 steps no defense
# still leaks 1.8 dB more than gaussian(sigma0=1.0) (2.1 at 300, 0.5 at 100): the ordering test holds.
MODE = "quick"
DEFENSES = tuple(Spec("gradguard", {"probe_steps": 50}) if d.name == "gradguard" else d
                 for d in mode_config(MODE).defenses)
# The options after --out; CONFIG is what the CLI makes of them.
OPTIONS = ["--device", "cpu", "--no-progress", "--attack-iterations", "200", "--defenses",
           *(d.label.replace("(", ":").rstrip(")") for d in DEFENSES)]
CONFIG = config_from_args(build_parser(["bench", f"--{MODE}", *OPTIONS]).parse_args(["bench", f"--{MODE}", *OPTIONS]))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    assert (data_dir() / "pneumoniamnist.npz").is_file(), \
        f"{data_dir()} lacks pneumoniamnist.npz: set GRADGUARD_SHARED to the shared assets folder"
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        assert main(["bench", f"--{MODE}", "--out", str(out), *OPTIONS]) == 0
    finally:
        torch.set_num_threads(threads)  # the CLI sets its own thread count
    return out


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_output_with_the_documented_schema(quick):
    results = _results(quick)
    config = CONFIG
    rounds, defenses = config.rounds_attacked, [d.label for d in config.defenses]
    assert rounds == (1, 3, 6)
    assert results["command"].startswith("gradguard bench --quick --out")
    assert results["computed"] == {"train_runs": len(defenses), "attack_cells": len(defenses) * len(rounds) * 2}
    cells = results["cells"]
    assert {(c["defense"], c["round"], c["client"]) for c in cells} == {
        (d, r, c) for d in defenses for r in rounds for c in ("client9", "client2")}
    for cell in cells:
        assert CELL_KEYS <= cell.keys() and UTILITY_KEYS <= cell["utility"].keys()
        assert set(cell["variants"]) == {"plain", "tv", "nlm", "plain+calibrated", "tv+calibrated", "nlm+calibrated"}
        # The stronger of plain and adaptive counts; best-match PSNR bounds one-to-one PSNR.
        assert cell["psnr_best"] == max(v["psnr_best"] for v in cell["variants"].values())
        assert cell["psnr_best"] >= cell["psnr_strict"] - 1e-6
        assert cell["client_batch_size"] == (1 if cell["client"] == "client9" else 3)
        assert (quick / cell["images"]).is_file()
    summary = {s["defense"]: s for s in results["defenses"]}
    assert summary.keys() == set(defenses)
    assert all(0 <= s["micro_f1_mean"] <= 1 and s["captures"] == 6 for s in summary.values())
    for s in summary.values():  # two clients with three captures each: the overall mean is the mean of theirs
        by_client = s["leakage_by_client"]
        assert set(by_client) == {"client9", "client2"}
        assert s["leakage"]["psnr_best"] == pytest.approx(np.mean([c["psnr_best"] for c in by_client.values()]))
    table = (quick / "table_pneumoniamnist.md").read_text()
    assert all(f"| {d} |" in table for d in defenses) and "Goals: gradguard" in table
    assert "| goal | every captured update | client2's updates | client9's updates |" in table
    figures = sorted(p.name for p in (quick / "figures").iterdir())
    assert "privacy_utility_pneumoniamnist.png" in figures
    assert sum(name.startswith("grid_pneumoniamnist_inverting_gradients") for name in figures) == len(rounds)


def test_no_defense_leaks_more_than_strong_update_noise(quick):
    summary = {s["defense"]: s for s in _results(quick)["defenses"]}
    assert summary["none"]["leakage"]["psnr_best"] > summary["gaussian(sigma0=1.0)"]["leakage"]["psnr_best"] + 1.0


def test_a_second_invocation_resumes_without_recomputing(quick):
    cell_files = sorted((quick / "cells").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cell_files]
    outcome = run_bench(dataclasses.replace(CONFIG, progress=False), quick)
    assert (outcome.trained, outcome.attacked) == (0, 0)
    assert [p.stat().st_mtime_ns for p in cell_files] == stamps
    assert _results(quick)["computed"] == {"train_runs": 0, "attack_cells": 0}
    with pytest.raises(ValueError, match="other settings.*rounds"):
        run_bench(dataclasses.replace(CONFIG, rounds=3, progress=False), quick)


def test_a_run_cached_before_its_defaults_changed_is_trained_and_attacked_again(quick, tmp_path, monkeypatch):
    """A preset's defaults change (here untargeted's amplitude): its cached run and the attack cells
    of its updates are redone, the other defenses' are reused as they are."""
    shutil.copytree(quick, tmp_path / "out")
    out = tmp_path / "out"
    kept = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("none/**/*.json")}
    config = dataclasses.replace(CONFIG, defenses=(Spec("none"), Spec("untargeted")), progress=False)
    old = json.loads((out / "cells" / "train" / "pneumoniamnist" / "untargeted" / "seed0.json").read_text())
    monkeypatch.setitem(PRESETS, "untargeted", PRESETS["untargeted"].with_(noise_amplitude=0.05))
    outcome = run_bench(config, out, report_dir=tmp_path / "report")
    assert (outcome.trained, outcome.attacked) == (1, 6)  # its run and its six captured updates' cells
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    new = json.loads((out / "cells" / "train" / "pneumoniamnist" / "untargeted" / "seed0.json").read_text())
    assert old["defense_settings"]["noise"]["amplitude"] != 0.05 == new["defense_settings"]["noise"]["amplitude"]
    assert run_bench(config, out, report_dir=tmp_path / "report").trained == 0  # current again


def test_further_runs_can_be_attacked_and_leakage_averages_over_every_run(quick, tmp_path):
    """Seed 1's run is captured and attacked beside the cached seed 0's; the report averages both."""
    config = dataclasses.replace(CONFIG, defenses=(Spec("none"),), seeds=(0, 1), attack_seeds=2,
                                 progress=False)
    seed0 = {p: p.stat().st_mtime_ns for p in (quick / "cells" / "attack" / "pneumoniamnist" / "none").rglob("*.json")}
    outcome = run_bench(config, quick, report_dir=tmp_path)
    assert (outcome.trained, outcome.attacked) == (1, 6)  # seed 1's run, captured, and its six cells
    assert {p: p.stat().st_mtime_ns for p in seed0} == seed0  # the first run's cells are reused as they are
    results = _results(tmp_path)
    by_seed = {seed: [c for c in results["cells"] if c["seed"] == seed] for seed in (0, 1)}
    assert len(by_seed[0]) == len(by_seed[1]) == 6
    assert all(c["images"].endswith("-seed1.pt") for c in by_seed[1])
    # Another run's updates: other images, other reconstructions.
    assert {c["psnr_best"] for c in by_seed[0]}.isdisjoint(c["psnr_best"] for c in by_seed[1])
    (summary,) = results["defenses"]
    assert summary["captures"] == 12 and summary["attack_seeds"] == [0, 1]
    first = {s["defense"]: s for s in _results(quick)["defenses"]}["none"]
    assert summary["leakage_by_seed"]["0"]["psnr_best"] == pytest.approx(first["leakage"]["psnr_best"])
    for metric in ("psnr_best", "ssim_best", "lpips_best"):  # six captured updates per run: equal weights
        assert summary["leakage"][metric] == pytest.approx(
            np.mean([summary["leakage_by_seed"][s][metric] for s in ("0", "1")]))
    table = (tmp_path / "table_pneumoniamnist.md").read_text()
    assert "in the runs of seeds 0, 1" in table and "## Leakage per attacked run" in table
    assert run_bench(config, quick, report_dir=tmp_path).attacked == 0
    with pytest.raises(ValueError, match="attack_seeds must lie in 1..2"):
        dataclasses.replace(config, attack_seeds=3)


def test_full_mode_and_its_gpu_size_and_the_cosine_schedule():
    def parse(*argv):
        return config_from_args(build_parser(["bench", *argv]).parse_args(["bench", *argv, "--device", "cpu"]))
    full, large = parse("--full"), parse("--full", "--large", "--seeds", "1")
    assert (full.model, full.image_size, full.seeds, len(full.defenses)) == ("smallcnn", 32, (0, 1, 2, 3, 4), 10)
    assert (large.model, large.image_size, large.rounds, large.seeds) == ("resnet18", 64, 40, (0,))
    assert large.defenses == full.defenses and {a.name for a in large.attacks} == {"inverting_gradients", "dlg",
                                                                                  "bn_fedavg", "learned_decoder"}
    assert full.round_lr(1) == full.lr and full.round_lr(full.rounds + 1) == pytest.approx(0.0, abs=1e-12)
    assert full.round_lr(full.rounds // 2 + 1) == pytest.approx(full.lr / 2)


def test_the_modality_presets_are_the_settings_the_full_benchmark_measured():
    from gradguard import GuardConfig

    from gradguard.eval.bench.experiment import load_federation

    paper = load_federation(Path(__file__).resolve().parents[2] / "benchmarks" / "experiments" / "paper.toml")
    assert len(paper.defenses) == 28 and paper.seeds == (0, 1, 2, 3, 4)
    measured = {spec.label: spec for spec in paper.defenses if spec.name == "targeted"}
    for preset, label in (("chest_xray", "targeted(noise_amplitude=0.9,relevance_class=predicted,update_exponent=0.5,"
                                         "vulnerability_temperature=1.0)"),
                          ("fundus", "targeted(mask_floor=0.7,noise_amplitude=1.0,update_exponent=0.5)")):
        assert GuardConfig.preset(preset) == GuardConfig.preset("targeted", **measured[label].params)


def test_fedavg_adds_the_sample_weighted_mean_delta_and_keeps_integer_buffers():
    base = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(7)}
    updates = [ProtectedUpdate(tensors={"w": torch.tensor([1.0, 0.0])}, kind="delta", num_samples=1, num_steps=1,
                               round=1),
               ProtectedUpdate(tensors={"w": torch.tensor([0.0, 4.0])}, kind="delta", num_samples=3, num_steps=1,
                               round=1)]
    result = fedavg(base, updates)
    torch.testing.assert_close(result["w"], torch.tensor([1.25, 5.0]))
    assert result["steps"] is base["steps"] and torch.equal(base["w"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="weight deltas"):
        fedavg(base, [dataclasses.replace(updates[0], kind="gradient")])


def test_specs_parse_parameters_and_name_files():
    spec = Spec.parse("dpsgd:noise_multiplier=0.5,max_grad_norm=1,accountant=rdp")
    assert spec.params == {"noise_multiplier": 0.5, "max_grad_norm": 1, "accountant": "rdp"}
    assert spec.label == "dpsgd(accountant=rdp,max_grad_norm=1,noise_multiplier=0.5)"
    assert spec.slug == "dpsgd-accountant=rdp,max_grad_norm=1,noise_multiplier=0.5"
    with pytest.raises(ValueError, match="key=value"):
        Spec.parse("gaussian:sigma0")
    with pytest.raises(ValueError, match="unknown defense"):
        BenchConfig(defenses=(Spec("nope"),))
    with pytest.raises(ValueError, match="capture_rounds"):
        BenchConfig(rounds=3, capture_rounds=(4,))


def test_attacked_clients_are_the_single_image_client_and_the_smallest_batched_one():
    labels = np.arange(2000) % 2
    assert attacked_clients(BenchConfig(), partition_clients(labels, scale=0.1)) == ["client9", "client2"]
    assert attacked_clients(BenchConfig(), partition_clients(labels, scale=1.0)) == ["client9", "client1"]
    chosen = BenchConfig(clients=("client4",))
    assert attacked_clients(chosen, partition_clients(labels, scale=1.0)) == ["client4"]
    with pytest.raises(ValueError, match="not in the layout"):
        attacked_clients(BenchConfig(clients=("client10",)), partition_clients(labels, scale=1.0))


def test_the_adaptive_attacker_removes_noise_it_estimates_blindly():
    gen = torch.Generator().manual_seed(0)
    clean = torch.linspace(0, 1, 32).expand(2, 1, 32, 32).clone()
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    assert noise_sigma(noisy[0, 0].numpy()) == pytest.approx(0.1, rel=0.2)
    variants = adaptive_variants(noisy)
    assert torch.equal(variants["plain"], noisy)
    for name in ("tv", "nlm"):
        assert (psnr(variants[name], clean) > psnr(noisy, clean) + 3).all(), name
    rgb = noisy.repeat(1, 3, 1, 1)
    assert denoise(rgb, "tv").shape == rgb.shape


def test_calibration_restores_the_brightness_and_contrast_an_update_hides():
    gen = torch.Generator().manual_seed(1)
    prior = 0.3 + 0.4 * torch.rand(16, 1, 32, 32, generator=gen)  # mean 0.5, std about 0.115
    truth = prior[:2]
    # What an attack behind BatchNorm recovers: the structure, at another offset and gain.
    recovered = (0.2 * (truth - 0.5) + 0.8).clamp(0, 1)
    fixed = calibrate(recovered, prior)
    assert (psnr(fixed, truth) > psnr(recovered, truth) + 10).all()
    assert fixed.mean().item() == pytest.approx(0.5, abs=0.01)
    variants = adaptive_variants(recovered, prior)
    assert {"plain", "tv", "nlm", "plain+calibrated", "tv+calibrated", "nlm+calibrated"} == set(variants)
    with pytest.raises(ValueError, match="equal C"):
        calibrate(recovered, prior.repeat(1, 3, 1, 1))


def test_matched_f1_verdicts():
    ours = {"micro_f1_mean": 0.80, "leakage": {"psnr_best": 15.0}, "collapsed_runs": 0}

    def other(f1, p, collapsed=0):
        return {"micro_f1_mean": f1, "leakage": {"psnr_best": p}, "collapsed_runs": collapsed}
    assert matched_f1_verdict(ours, other(0.805, 17.0)) == "GradGuard leaks less"
    assert "loses" in matched_f1_verdict(ours, other(0.795, 14.0))
    assert "loses" in matched_f1_verdict(ours, other(0.85, 14.0))
    assert "dominates" in matched_f1_verdict(ours, other(0.70, 16.0))
    assert "trade-off" in matched_f1_verdict(ours, other(0.70, 12.0))
    assert (matched_f1_verdict(ours, other(0.80, 17.0, collapsed=1))
            == "no verdict (collapsed runs); GradGuard leaks less")
    # The same leakage (to the table's 0.01 dB) is no verdict on leakage: F1 decides, or it is a tie.
    assert matched_f1_verdict(ours, other(0.795, 15.0 - 1e-9)) == "tie (the same leakage at matched F1)"
    assert "wins" in matched_f1_verdict(ours, other(0.70, 15.001))
    assert "loses" in matched_f1_verdict(ours, other(0.85, 15.0))
    assert matched_f1_verdict(ours, other(0.80, 15.0, collapsed=1)).endswith("leaks as much")
    # Leakage counts above the attacker's prior: below the mean image, a lower PSNR protects no more.
    prior = {"mean_image": {"psnr_best": 16.0}}
    assert matched_f1_verdict({**ours, **prior}, {**other(0.805, 15.9), **prior}) == (
        "tie (the same leakage at matched F1)")
    assert matched_f1_verdict({**ours, **prior}, {**other(0.805, 17.0), **prior}) == "GradGuard leaks less"
    assert "loses" in matched_f1_verdict({**other(0.80, 17.0), **prior}, {**ours, **prior})


def test_goal_checks_hold_micro_and_macro_f1_to_a_point():
    def summary(psnr, ssim, lpips, micro, macro):
        return {"leakage": {"psnr_best": psnr, "ssim_best": ssim, "lpips_best": lpips},
                "micro_f1_mean": micro, "macro_f1_mean": macro, "collapsed_runs": 0}
    reference = summary(22.0, 0.70, 0.030, 0.515, 0.310)
    checks = goal_checks(summary(18.0, 0.50, 0.060, 0.508, 0.284), reference, GOALS["retinamnist"])
    assert [met for _, _, met in checks] == [True, True, True, True, False]
    assert checks[4][:2] == ("macro-F1 within 1.0 point of no defense", "+2.6 points lost")
    # the seed paper's chest X-ray gains are larger: 3.73 dB and 0.2 SSIM
    checks = goal_checks(summary(18.5, 0.52, 0.044, 0.515, 0.31), reference, GOALS["pneumoniamnist"])
    assert [met for _, _, met in checks] == [False, False, False, True, True]


def test_dp_runs_without_noise_are_reported_as_unbounded_epsilon():
    from gradguard.eval.report import _epsilon, summarize

    run = {"dataset": "d", "defense": "dpsgd(noise_multiplier=0)", "defense_name": "dpsgd", "defense_params": {},
           "seed": 0, "accuracy": 0.8, "micro_f1": 0.8, "macro_f1": 0.8, "delta": 1e-5, "seconds": 1.0,
           "collapsed": False, "majority_accuracy": 0.6, "epsilon": None}
    (summary,) = summarize([run, {**run, "seed": 1, "epsilon": 3.0}], [])
    assert summary["epsilon"] is None and _epsilon(summary) == "∞"
    (summary,) = summarize([{**run, "epsilon": 2.0}, {**run, "seed": 1, "epsilon": 3.0}], [])
    assert _epsilon(summary) == "3.00"
    (summary,) = summarize([{**run, "delta": None}], [])
    assert _epsilon(summary) == "–"


def test_runs_summarise_public_batchnorm_f1_and_where_the_noise_went():
    from gradguard.eval.report import summarize

    run = {"dataset": "d", "defense": "gradguard", "defense_name": "gradguard", "defense_params": {}, "seed": 0,
           "accuracy": 0.8, "micro_f1": 0.8, "macro_f1": 0.7, "delta": None, "seconds": 1.0, "collapsed": False,
           "majority_accuracy": 0.6, "epsilon": None}
    history = [{"round": 1, "client": "c2", "samples": 4, "noised_samples": 4, "amplitude_mean": 0.5},
               {"round": 1, "client": "c10", "samples": 2, "noised_samples": 0, "amplitude_mean": 0.0},
               {"round": 2, "client": "c2", "samples": 4, "noised_samples": 0, "amplitude_mean": 0.0},
               {"round": 2, "client": "c10", "samples": 2, "noised_samples": 2, "amplitude_mean": 1.0}]
    public = {"accuracy": 0.9, "micro_f1": 0.9, "macro_f1": 0.8, "collapsed": False}
    (summary,) = summarize([{**run, "bn_public": public, "noise_history": history},
                            {**run, "seed": 1, "bn_public": {**public, "micro_f1": 0.7, "collapsed": True},
                             "noise_history": []}], [])
    assert summary["bn_public"]["micro_f1_mean"] == pytest.approx(0.8)
    assert summary["bn_public"]["collapsed_runs"] == 1
    # noise: c2 4 x 0.25 = 1, c10 2 x 1 = 2 of 3 in all
    assert summary["noise_by_client"] == {
        "c2": {"images": 4.0, "noised_round_share": 0.5, "amplitude_when_noised": 0.5,
               "noise_share": pytest.approx(1 / 3)},
        "c10": {"images": 2.0, "noised_round_share": 0.5, "amplitude_when_noised": 1.0,
                "noise_share": pytest.approx(2 / 3)}}
    # Runs cached before either was recorded summarise to None, not to a wrong figure.
    (old,) = summarize([run, {**run, "seed": 1, "bn_public": public, "noise_history": history}], [])
    assert old["bn_public"] is None and old["noise_by_client"] is None
