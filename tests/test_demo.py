"""`gradguard demo` end to end in a reduced configuration: the report's numbers are re-derived
from the tensors it saved (reconstructions, final global models) and from Opacus' accountant, and
the same seed gives the same report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from gradguard.cli import main
from gradguard.demo.data import shipped_data
from gradguard.eval.datasets import data_dir, load_medmnist
from gradguard.eval.metrics import psnr
from gradguard.eval.models import SmallCNN
from gradguard.per_sample import per_sample_ready

QUICK = ["--rounds", "1", "--attack-iterations", "50", "--images-per-client", "16", "--no-progress"]
# Smaller still, for the runs that only compare reports with each other.
TINY = ["--rounds", "1", "--attack-iterations", "10", "--clients", "2", "--images-per-client", "8",
        "--batch-size", "4", "--figure-images", "1"]
DEFENSES = ["none", "gradguard", "dpsgd"]
FILES = ["index.html", "README.md", "results.json", "masks.png", "reconstructions.png",
         "global_model_gradguard.safetensors", "reconstructions.safetensors"]
FEDERATED_FILES = ["privacy_utility.png", "global_model_none.safetensors", "global_model_dpsgd.safetensors"]


def _run(out: Path, capsys, *extra: str, options: list[str] = QUICK) -> tuple[dict, str]:
    torch.set_num_threads(1)
    assert main(["demo", "--out", str(out), *options, *extra]) == 0
    return json.loads((out / "results.json").read_text()), capsys.readouterr().out


def _check_report(out: Path, results: dict, files: list[str]) -> None:
    missing = [name for name in files if not (out / name).is_file()]
    assert not missing, f"the report lacks {missing}"
    assert [row["defense"] for row in results["leakage"]] == DEFENSES
    page = (out / "index.html").read_text()
    leakage_table = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert leakage_table.count("<tr>") == 3
    assert len(re.findall(r"^\| (no defense|GradGuard|Opacus DP-SGD)", (out / "README.md").read_text(), re.M)) == 3
    # Every PSNR in the table is the PSNR of the saved reconstruction against the saved attacked image.
    saved = load_file(str(out / "reconstructions.safetensors"))
    for row in results["leakage"]:
        assert row["psnr"] == pytest.approx(psnr(saved[row["defense"]], saved["attacked_image"]).item(), abs=1e-4)
        assert row["variant"].split("+")[0] in ("plain", "tv", "nlm") and -1 <= row["ssim"] <= 1
    # DP-SGD's epsilon is Opacus' RDP epsilon of one step at sample rate 1 (batch 1 of one image).
    accountant = RDPAccountant()
    accountant.history = [(1.0, 1.0, 1)]
    assert results["leakage"][2]["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert results["leakage"][0]["epsilon"] is None and results["leakage"][1]["epsilon"] is None


def test_demo_federates_over_grpc_and_reports_leakage_and_accuracy(tmp_path, capsys):
    assert (data_dir() / "pneumoniamnist.npz").is_file(), \
        f"{data_dir()} lacks pneumoniamnist.npz: set GRADGUARD_SHARED to the shared assets folder"
    out = tmp_path / "report"
    results, stdout = _run(out, capsys)
    _check_report(out, results, FILES + FEDERATED_FILES)
    assert results["fallback_reason"] == "" and "pneumoniamnist" in results["data_source"]
    assert results["bytes_sent"] > 0 and "report:" in stdout
    # The attacked image is one of the training images (client 1's), not a synthetic one.
    train = load_medmnist("pneumoniamnist", "train", size=32)
    attacked = load_file(str(out / "reconstructions.safetensors"))["attacked_image"]
    assert (train.images - attacked).flatten(1).abs().amax(dim=1).min() == 0
    # Each defense's reported accuracy is that of its federation's saved global model on the test split
    # (DP-SGD's federation trains the model with GroupNorm in place of BatchNorm).
    test = load_medmnist("pneumoniamnist", "test", size=32)
    for defense in DEFENSES:
        model = per_sample_ready(SmallCNN(1, 2)) if defense == "dpsgd" else SmallCNN(1, 2)
        model.load_state_dict(load_file(str(out / f"global_model_{defense}.safetensors")))
        with torch.no_grad():
            accuracy = (model.eval()(test.images).argmax(dim=1) == test.labels).float().mean().item()
        assert results["utility"][defense]["accuracy"] == pytest.approx(accuracy)
        assert results["utility"][defense]["majority_accuracy"] == pytest.approx(0.625)
    assert results["utility"]["none"]["epsilon"] is None and results["utility"]["gradguard"]["epsilon"] is None
    assert results["utility"]["dpsgd"]["epsilon"] > results["leakage"][2]["epsilon"]  # many steps, not one
    assert all(0 <= row["lpips"] <= 1 for row in results["leakage"])
    # Leakage above the prior: the attacker's best guess without an update is the public mean image
    # (overall or of the attacked image's class), and every row subtracts the same prior.
    prior = results["prior"]
    public = load_medmnist("pneumoniamnist", "val", size=32)
    mean = public.images.mean(dim=0, keepdim=True)
    assert prior["psnr"] >= psnr(mean, attacked).item() - 1e-4
    for row in results["leakage"]:
        assert row["psnr_above_prior"] == pytest.approx(row["psnr"] - prior["psnr"])
        assert row["ssim_above_prior"] == pytest.approx(row["ssim"] - prior["ssim"])
    page = (out / "index.html").read_text()
    assert 'src="privacy_utility.png"' in page and "(privacy_utility.png)" in (out / "README.md").read_text()


def test_without_data_offline_it_says_so_and_attacks_the_shipped_medical_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADGUARD_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline_lpips(**_):  # what LPIPSMetric raises offline without the shared AlexNet weights
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr("gradguard.demo.run.LPIPSMetric", offline_lpips)
    out = tmp_path / "report"
    results, stdout = _run(out, capsys, "--no-download")
    assert "NO MEDMNIST DATA" in stdout and "only the attack part" in stdout
    _check_report(out, results, FILES)
    assert all(row["lpips"] is None for row in results["leakage"]) and "LPIPS   n/a" in stdout
    assert results["utility"] is None and "pneumoniamnist.npz is in none of" in results["fallback_reason"]
    assert results["prior"] is None and all(row["psnr_above_prior"] is None for row in results["leakage"])
    assert not (out / "privacy_utility.png").exists()
    assert "CT_small.dcm" in results["victim"]
    attacked = load_file(str(out / "reconstructions.safetensors"))["attacked_image"]
    torch.testing.assert_close(attacked, shipped_data(32, reason="").train.images[:1])


def test_the_same_seed_gives_the_same_report_and_another_seed_another(tmp_path, capsys):
    def figures(out: Path, *extra: str) -> tuple[dict, dict[str, bytes]]:
        # Progress is on: with stderr captured (not a terminal) the bars must stay quiet.
        results, _ = _run(out, capsys, *extra, options=TINY)
        assert capsys.readouterr().err == "", "progress bars were written to a stream that is not a terminal"
        del results["seconds"]  # wall time, the one thing allowed to differ
        tensors = {name: (out / name).read_bytes() for name in FILES + FEDERATED_FILES
                   if name.endswith(".safetensors")}
        return results, tensors

    first, again = figures(tmp_path / "a"), figures(tmp_path / "b")
    assert first == again
    other = figures(tmp_path / "c", "--seed", "1")
    assert other[0]["leakage"] != first[0]["leakage"] and other[1] != first[1]


def test_the_preset_option_chooses_gradguard_preset(tmp_path, capsys):
    results, _ = _run(tmp_path, capsys, "--preset", "chest_xray", options=TINY)
    assert results["config"]["preset"] == "chest_xray"
    assert results["leakage"][1]["label"] == "GradGuard (chest_xray preset)"


def test_bad_settings_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(SystemExit, match=r"\['batch_size'\]"):
        main(["demo", "--out", str(tmp_path), "--batch-size", "100", "--images-per-client", "16"])
    with pytest.raises(SystemExit, match=r"unknown preset 'chest_xry'.*chest_xray"):
        main(["demo", "--out", str(tmp_path), "--preset", "chest_xry"])
