"""The leakage benchmark: leakage above the prior and re-identification on constructed cases,
experiment files, twins of equal energy, and a small run end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradguard import GuardConfig
from gradguard.eval.bench.experiment import ExperimentError, load_experiment
from gradguard.eval.bench.leakage import (LeakageCell, VariantScore, noise_energy, run_leakage, sign_test, twin_spec,
                                          with_twins)
from gradguard.eval.bench.spec import Spec
from gradguard.eval.leakage_report import GRADGUARD_KEYS, SUMMARY_KEYS
from gradguard.eval.metrics import (LPIPSMetric, above_prior, leakage, prior_guesses, reidentification,
                                    reidentification_chance, strongest_prior)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chest(chest_images):
    return chest_images


@pytest.fixture(scope="module")
def lpips_metric():
    return LPIPSMetric()


def test_a_perfect_reconstruction_the_prior_itself_and_a_swapped_pair(chest, lpips_metric):
    images, labels = chest
    client, public, public_labels = images[:2], images[10:], labels[10:]
    guesses = prior_guesses(public, public_labels, labels[:2], num_classes=2)
    # By hand: the mean guess is the public mean; the class-mean guess is each class's own mean.
    torch.testing.assert_close(guesses["mean"][0], public.mean(0))
    for i in range(2):
        torch.testing.assert_close(guesses["class_mean"][i], public[public_labels == labels[i]].mean(0))
    scores = {name: leakage(g, client, lpips_metric=lpips_metric) for name, g in guesses.items()}
    name, prior = strongest_prior(scores)
    assert prior["psnr_best"] == max(s["psnr_best"] for s in scores.values())
    assert prior["lpips_best"] == min(s["lpips_best"] for s in scores.values())

    perfect = above_prior(leakage(client, client, lpips_metric=lpips_metric), prior)
    assert perfect["psnr"] == pytest.approx(100.0 - prior["psnr_best"], abs=1e-3)  # PSNR of identical images: 100 dB
    assert perfect["ssim"] == pytest.approx(1.0 - prior["ssim_best"], abs=1e-6)
    assert perfect["lpips"] == pytest.approx(prior["lpips_best"], abs=1e-5)
    itself = above_prior(scores[name], prior)
    assert itself["psnr"] == pytest.approx(0.0, abs=1e-6)

    distractors = images[20:40]
    assert reidentification(client, client, distractors) == 1.0
    # Swapped: the assignment pairs each reconstruction with its own original again.
    assert reidentification(client.flip(0), client, distractors) == 1.0
    # The prior's guess names an image by chance only: for one client image, 0 or 1 of 1.
    assert reidentification(guesses["mean"][:1], client[:1], distractors) in (0.0, 1.0)
    assert reidentification_chance(2, 20) == pytest.approx(1 / 22)
    # A reconstruction of another patient does not re-identify the client's.
    assert reidentification(images[45:46], client[:1], torch.cat([distractors, images[45:46]])) == 0.0


def test_the_sign_test_against_a_binomial_computed_by_hand():
    assert sign_test([1.0] * 5) == pytest.approx(2 / 32)
    assert sign_test([1.0, -1.0, 0.0]) == 1.0
    assert sign_test([-1.0] * 6 + [1.0]) == pytest.approx(2 * (1 + 7) / 128)


def test_a_cell_scores_the_strongest_of_every_attack_per_metric():
    cell = LeakageCell(dataset="d", setting="s", defense="none", twin_of=None, seed=0, client_images=1,
                       prior_name="mean", prior={"psnr": 18.0, "ssim": 0.5, "lpips": 0.3},
                       scores=[VariantScore("a", "plain", 20.0, 0.4, 0.2), VariantScore("b", "tv", 17.0, 0.7, 0.4)],
                       reid_top1=1.0, reid_chance=0.01, noise_energy=0.0, epsilon=None, attack_seconds=1.0)
    assert cell.above_prior() == pytest.approx({"psnr": 2.0, "ssim": 0.2, "lpips": 0.1})


def test_collapsed_runs_show_their_public_batchnorm_score_beside_them(tmp_path):
    """A defense whose global model collapses with the clients' statistics but learned its weights:
    the summary keeps the re-estimated score, and the table prints it beside the collapsed one."""
    from gradguard.eval.bench.leakage import summarize
    from gradguard.eval.leakage_report import markdown_table

    cell = LeakageCell(dataset="d", setting="s", defense="none", twin_of=None, seed=0, client_images=1,
                       prior_name="mean", prior={"psnr": 18.0, "ssim": 0.5, "lpips": 0.3},
                       scores=[VariantScore("a", "plain", 20.0, 0.4, 0.2)], reid_top1=1.0, reid_chance=0.01,
                       noise_energy=0.0, epsilon=None, attack_seconds=1.0)
    run = {"dataset": "d", "defense": "none", "micro_f1": 0.625, "macro_f1": 0.385, "collapsed": True,
           "bn_public": {"micro_f1": 0.80, "macro_f1": 0.78}}
    runs = [run, {**run, "bn_public": {"micro_f1": 0.84, "macro_f1": 0.80}}]
    (row,) = summarize([cell], runs, [(Spec("none"), None)])
    assert (row.micro_f1_public_bn, row.macro_f1_public_bn) == pytest.approx((0.82, 0.79))
    assert row.collapsed_runs == 2
    table = markdown_table("d", [row], [], load_experiment(_write(tmp_path, TINY), progress=False))
    assert "+2.0 / -0.10 / 100.0% / 62.5! (82.0 public BN)" in table
    (without,) = summarize([cell], [run, {**run, "bn_public": None}], [(Spec("none"), None)])
    assert without.micro_f1_public_bn is None  # a score over some of the runs only is none at all


def test_every_gradguard_setting_gets_its_equal_energy_twin():
    twin = twin_spec(Spec("chest_xray"))
    assert twin == Spec("untargeted", {"noise_amplitude": 0.9, "update_exponent": 0.5})
    assert twin_spec(Spec("targeted", {"mask_floor": 0.7, "noise_amplitude": 0.5})) == Spec(
        "untargeted", {"noise_amplitude": 0.5})
    assert twin_spec(Spec("untargeted")) is None and twin_spec(Spec("shadowdef")) is None
    assert twin_spec(Spec("gaussian", {"sigma0": 0.1})) is None
    listed = with_twins([Spec("none"), Spec("targeted"), Spec("untargeted"), Spec("fundus")])
    assert [(s.label, of) for s, of in listed] == [
        ("none", None), ("targeted", None), ("untargeted", "targeted"), ("fundus", None),
        ("untargeted(noise_amplitude=1.0,update_exponent=0.5)", "fundus")]


def test_noise_energy_is_relative_to_the_image():
    clean = torch.full((2, 1, 4, 4), 0.5)
    seen = clean + torch.tensor([0.5, 0.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(noise_energy(clean, seen), torch.tensor([1.0, 0.0], dtype=torch.float64))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_the_shipped_experiment_files_are_valid():
    from gradguard.eval.bench.experiment import experiment_kind, load_federation

    for path in sorted((REPO / "benchmarks" / "experiments").glob("*.toml")):
        if experiment_kind(path) == "federation":
            assert load_federation(path).defenses, path
        else:
            experiment = load_experiment(path)
            assert experiment.settings and experiment.defenses, path


def test_an_experiment_file_with_typos_lists_every_problem_with_its_fix(tmp_path):
    path = _write(tmp_path, """
name = "bad"
datasets = ["pneumoniamnist"]
atack_seeds = 2
defenses = ["none", "gradgaurd"]
attacks = ["inverting_gradients"]
[utility]
rounds = 2
[[settings]]
name = "x"
share = "gradient"
images = 4
batch_size = 2
modle = "convnet"
""")
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    text = str(err.value)
    assert "'atack_seeds' (did you mean 'attack_seeds'?)" in text
    assert "'gradgaurd' is not registered (did you mean 'gradguard'?)" in text
    assert "'modle' (did you mean 'model'?)" in text
    assert "batch_size must equal images" in text
    with pytest.raises(ExperimentError, match="not found"):
        load_experiment(tmp_path / "missing.toml")


TINY = """
name = "tiny"
datasets = ["pneumoniamnist"]
image_size = 32
attack_seeds = 1
distractors = 20
denoiser_steps = 20
defenses = ["none", "chest_xray"]
attacks = ["inverting_gradients:iterations=150,restarts=1"]
[utility]
model = "convnet"
width = 4
scale = 0.05
rounds = 1
seeds = 1
[[settings]]
name = "fedsgd-b1"
share = "gradient"
images = 1
batch_size = 1
"""


def test_a_small_experiment_runs_end_to_end_and_resumes(tmp_path):
    path = _write(tmp_path, TINY)
    out = tmp_path / "out"
    outcome = run_leakage(load_experiment(path, progress=False), out)
    assert (outcome.trained, outcome.attacked) == (3, 3)  # none, chest_xray and its twin
    summary = json.loads((out / "summary.json").read_text())
    guarded = tuple(sorted(SUMMARY_KEYS + GRADGUARD_KEYS))
    assert [tuple(sorted(row)) for row in summary] == [tuple(sorted(SUMMARY_KEYS)), guarded, guarded]
    rows = {row["defense"]: row for row in summary}
    twin = "untargeted(noise_amplitude=0.9,update_exponent=0.5)"
    assert rows[twin]["twin_of"] == "chest_xray" and rows["none"]["twin_of"] is None
    # An untrained leaky conv net at batch 1 leaks: IG beats the prior undefended.
    assert rows["none"]["psnr_above_prior"] > 3.0
    assert rows["none"]["undefended_psnr_above_prior"] == rows["none"]["psnr_above_prior"]
    assert rows["chest_xray"]["psnr_above_prior"] < rows["none"]["psnr_above_prior"]
    assert (out / "table_pneumoniamnist.md").read_text().count("| `fedsgd-b1`") == 1
    assert (out / "figures" / "privacy_utility_pneumoniamnist.png").is_file()
    again = run_leakage(load_experiment(path, progress=False), out)
    assert (again.trained, again.attacked) == (0, 0)
    # A report from the cache alone leaves out what was never computed.
    more = _write(tmp_path, TINY.replace('defenses = ["none", "chest_xray"]',
                                         'defenses = ["none", "gaussian:sigma0=0.1"]'))
    cached = run_leakage(load_experiment(more, progress=False), out, report_dir=tmp_path / "cached", compute=False)
    assert (cached.trained, cached.attacked) == (0, 0)
    assert [r["defense"] for r in json.loads((tmp_path / "cached" / "summary.json").read_text())] == ["none"]


def test_any_medmnist_layout_file_runs_rgb_with_its_own_classes(tmp_path):
    rng = torch.Generator().manual_seed(0)
    arrays = {}
    for split, n in (("train", 160), ("val", 40), ("test", 30)):
        arrays[f"{split}_images"] = (torch.rand(n, 28, 28, 3, generator=rng) * 255).to(torch.uint8).numpy()
        arrays[f"{split}_labels"] = torch.randint(0, 3, (n, 1), generator=rng).numpy()
    np.savez(tmp_path / "mine.npz", **arrays)
    path = _write(tmp_path, TINY.replace('defenses = ["none", "chest_xray"]', 'defenses = ["none"]'))
    experiment = load_experiment(path, progress=False, datasets=(str(tmp_path / "mine.npz"),))
    run_leakage(experiment, tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["dataset"], r["defense"]) for r in rows] == [("mine", "none")]
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert len(cells[0]["scores"]) > 0 and (tmp_path / "out" / "table_mine.md").is_file()


def test_a_federation_experiment_file_is_its_mode_with_the_files_fields(tmp_path):
    from gradguard.cli import build_parser
    from gradguard.eval.bench.cli import config_from_args
    from gradguard.eval.bench.experiment import experiment_kind, load_federation

    path = _write(tmp_path, 'kind = "federation"\nmode = "full"\nseeds = 20\nattack_seeds = 3\n'
                            'datasets = ["pneumoniamnist"]\ndefenses = ["none", "fundus"]\n')
    assert experiment_kind(path) == "federation"
    config = load_federation(path)
    assert (config.seeds, config.attack_seeds, config.rounds, config.datasets) == (
        tuple(range(20)), 3, 20, ("pneumoniamnist",))
    assert [s.label for s in config.defenses] == ["none", "fundus"]
    argv = ["bench", "--experiment", str(path), "--seeds", "2", "--attack-seeds", "1", "--device", "cpu"]
    override = config_from_args(build_parser(argv).parse_args(argv), base=config)
    assert (override.seeds, override.attack_seeds) == ((0, 1), 1)  # the command line applies on top
    with pytest.raises(ExperimentError, match="'sedes' \\(did you mean 'seeds'\\?\\)"):
        load_federation(_write(tmp_path, 'kind = "federation"\nsedes = 3\n'))


def test_utility_comes_from_measured_runs_of_the_same_setting_whatever_its_spelling(tmp_path):
    from gradguard.eval.bench.leakage import defense_key, measured_runs

    p1u = {"noise_amplitude": 0.9, "relevance_class": "predicted", "update_exponent": 0.5,
           "vulnerability_temperature": 1.0}
    assert defense_key("chest_xray", {}) == defense_key("targeted", p1u) != defense_key("targeted", {})
    assert defense_key("dpsgd", {"noise_multiplier": 0.1, "max_grad_norm": 5}) == defense_key(
        "dpsgd", {"max_grad_norm": 5, "noise_multiplier": 0.1, "seed": 3})

    def run(defense, params, seed, f1):
        return {"dataset": "d", "defense": "x", "defense_name": defense, "defense_params": params, "seed": seed,
                "micro_f1": f1, "macro_f1": f1, "collapsed": False}
    five = tmp_path / "five.json"
    five.write_text(json.dumps({"runs": [run("targeted", p1u, s, 0.8) for s in range(5)]
                                + [run("none", {}, s, 0.9) for s in range(5)]}))
    twenty = tmp_path / "twenty.json"
    twenty.write_text(json.dumps({"runs": [run("targeted", p1u, s, 0.7) for s in range(20)]}))
    runs = measured_runs([five, twenty], ["d"], [(Spec("none"), None), (Spec("chest_xray"), None),
                                                 (Spec("fundus"), None)])
    assert [(r["defense"], r["micro_f1"]) for r in runs] == [("none", 0.9)] * 5 + [("chest_xray", 0.7)] * 20
    # A run that recorded other settings for its preset (its defaults have changed since) is not the preset now.
    then = GuardConfig.preset("chest_xray").with_(noise_amplitude=0.5).public_dict()
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"runs": [{**run("chest_xray", {}, s, 0.6), "defense_settings": then}
                                        for s in range(30)]}, default=str))
    runs = measured_runs([old, twenty], ["d"], [(Spec("chest_xray"), None)])
    assert [r["micro_f1"] for r in runs] == [0.7] * 20
    assert defense_key("chest_xray", {}, then) == defense_key("chest_xray", {"noise_amplitude": 0.5})


def test_verdicts_count_leakage_only_above_the_prior_and_match_f1_to_a_point():
    from gradguard.eval.bench.leakage import SummaryRow
    from gradguard.eval.leakage_report import verdict

    def row(psnr, f1):
        return SummaryRow(dataset="d", setting="s", defense="x", twin_of=None, attacks=[], psnr_above_prior=psnr,
                          ssim_above_prior=0.0, lpips=0.0, reid_top1=0.0, reid_chance=0.01, micro_f1=f1,
                          macro_f1=f1, f1_seeds=5, energy_ratio=None, undefended_psnr_above_prior=10.0)
    assert verdict(row(-5.0, 0.80), row(-1.0, 0.805)).startswith("tie")  # both below the prior
    assert verdict(row(-5.0, 0.80), row(-1.0, 0.83)).startswith("**GradGuard loses**")
    assert verdict(row(1.0, 0.80), row(3.0, 0.805)).startswith("GradGuard wins")
    assert verdict(row(1.0, 0.85), row(3.0, 0.80)).startswith("GradGuard dominates")
    assert verdict(row(1.0, 0.75), row(3.0, 0.80)).startswith("trade-off")
    assert verdict(row(4.0, 0.80), row(3.0, 0.80)).startswith("**GradGuard loses**")
    assert verdict(row(4.0, None), row(3.0, 0.80)).startswith("no verdict")


def test_the_realised_energy_pairs_each_step_with_its_own_forward():
    from gradguard.eval.bench.leakage import realised_energy

    clean = [torch.full((2, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.5)]
    extra = torch.zeros(4, 4)  # a defense's extra forward of another shape
    seen = [extra, (clean[0] + 0.5).flatten(1), clean[0].flatten(1), clean[1].flatten(1)]
    assert realised_energy(clean, seen) == pytest.approx(2 / 3)  # 1, 1 and 0


def test_the_twin_of_a_setting_injects_the_same_energy_on_a_fixed_batch(chest):
    from gradguard import GradGuard, GuardConfig
    from gradguard.eval.models import ConvNet

    images = chest[0][:8]
    energies = {}
    for spec in (Spec("chest_xray"), Spec("fundus"), Spec("targeted")):
        twin = twin_spec(spec)
        for which in (spec, twin):
            preset = which.name
            guard = GradGuard(GuardConfig.preset(preset, seed=7, **which.params))
            model = ConvNet(1, 2)
            guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), dataset_size=8)
            energies[which.label] = noise_energy(images, guard.explain(images).noised).mean().item()
            guard.cleanup()
        ratio = energies[twin.label] / energies[spec.label]
        assert ratio == pytest.approx(1.0, abs=0.01), (spec, ratio)
    assert energies["chest_xray"] != pytest.approx(energies["fundus"])  # amplitudes 0.9 and 1.0 differ


def test_a_setting_can_run_a_subset_of_the_defenses_with_their_twins():
    from gradguard.eval.bench.experiment import LeakageSetting

    setting = LeakageSetting(name="s", defenses=(Spec("none"), Spec("chest_xray")))
    assert setting.runs(Spec("none"), None) and setting.runs(Spec("chest_xray"), None)
    assert setting.runs(Spec("untargeted", {"noise_amplitude": 0.9, "update_exponent": 0.5}), "chest_xray")
    assert not setting.runs(Spec("gradguard"), None) and not setting.runs(Spec("untargeted"), "gradguard")
    assert LeakageSetting(name="t").runs(Spec("gradguard"), None)
    assert "defense 'nope' is not registered" in " ".join(LeakageSetting(name="u", defenses=(Spec("nope"),)).problems())
