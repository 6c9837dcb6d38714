"""Metrics against references: scikit-image, the LPIPS project's published values, hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.io import imread
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gradguard.eval.datasets import shared_dir
from gradguard.eval.metrics import LPIPSMetric, leakage, pairwise_psnr, pairwise_ssim, psnr, ssim, utility


def _shared_file(*parts: str):
    path = shared_dir().joinpath(*parts)
    assert path.is_file(), f"{path} is missing: set GRADGUARD_SHARED to the shared assets folder"
    return path


@pytest.fixture(scope="module")
def lpips_metric() -> LPIPSMetric:
    return LPIPSMetric(weights=_shared_file("weights", "alexnet_features.pth"))


def _rgb(name: str) -> torch.Tensor:
    array = imread(_shared_file("lpips-reference", name))[..., :3]
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def test_lpips_matches_the_published_reference_values(lpips_metric):
    ref, p0, p1 = _rgb("ex_ref.png"), _rgb("ex_p0.png"), _rgb("ex_p1.png")
    assert lpips_metric(ref, p0).item() == pytest.approx(0.722, abs=1e-3)
    assert lpips_metric(ref, p1).item() == pytest.approx(0.138, abs=1e-3)
    table = lpips_metric.pairwise(torch.stack([ref, p1]), torch.stack([p0, ref]))
    torch.testing.assert_close(table, torch.tensor([[0.722, 0.0], [0.720, 0.138]]), atol=2e-3, rtol=0)


def test_lpips_repeats_grayscale_to_three_channels(lpips_metric):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 32, 32, generator=gen), torch.rand(2, 1, 32, 32, generator=gen)
    torch.testing.assert_close(lpips_metric(a, b), lpips_metric(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)))


def test_lpips_pairwise_equals_the_packages_own_paired_forward(lpips_metric):
    gen = torch.Generator().manual_seed(3)
    recon, true = torch.rand(3, 3, 32, 32, generator=gen), torch.rand(5, 3, 32, 32, generator=gen)
    table = lpips_metric.pairwise(recon, true, chunk=4)  # chunks that split rows
    expected = torch.stack([lpips_metric(r.expand(5, -1, -1, -1), true) for r in recon])
    torch.testing.assert_close(table, expected, atol=1e-6, rtol=0)


def test_lpips_refuses_a_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights=None"):
        LPIPSMetric(weights=tmp_path / "nope.pth")


def test_psnr_and_ssim_agree_with_scikit_image():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(3, 3, 32, 32, generator=gen)
    b = (a + 0.1 * torch.randn(3, 3, 32, 32, generator=gen)).clamp(0, 1)
    for i in range(3):
        x, y = a[i].permute(1, 2, 0).double().numpy(), b[i].permute(1, 2, 0).double().numpy()
        assert psnr(a, b)[i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-3)
        assert ssim(a, b)[i].item() == pytest.approx(
            structural_similarity(x, y, data_range=1.0, channel_axis=-1), abs=1e-5)
    gray = a[:, :1]
    assert ssim(gray, gray).tolist() == pytest.approx([1.0] * 3)
    torch.testing.assert_close(pairwise_psnr(a, b).diagonal(), psnr(a, b), atol=1e-4, rtol=0)
    torch.testing.assert_close(pairwise_ssim(a, b).diagonal(), ssim(a, b), atol=1e-6, rtol=0)
    assert psnr(a, a).tolist() == pytest.approx([100.0] * 3)


def test_leakage_best_protocol_reuses_images_strict_one_does_not(lpips_metric):
    gen = torch.Generator().manual_seed(2)
    originals = torch.rand(3, 1, 32, 32, generator=gen)
    noisy = (originals[0] + 0.05 * torch.randn(1, 32, 32, generator=gen)).clamp(0, 1)
    recon = torch.stack([originals[0], noisy])  # both reconstructions resemble image 0
    result = leakage(recon, originals, lpips_metric=lpips_metric)

    noisy_vs = pairwise_psnr(noisy, originals)[0]
    # best: each reconstruction takes its best match, image 0 twice.
    assert result["psnr_best"] == pytest.approx((100.0 + noisy_vs[0].item()) / 2, abs=1e-3)
    # strict: the exact copy keeps image 0 (100 dB), the noisy one must take image 1 or 2.
    assert result["psnr_strict"] == pytest.approx((100.0 + noisy_vs[1:].max().item()) / 2, abs=1e-3)
    assert result["ssim_best"] > result["ssim_strict"]
    assert result["lpips_best"] < result["lpips_strict"]
    assert set(result) == {f"{m}_{p}" for m in ("psnr", "ssim", "lpips") for p in ("best", "strict")}


def test_leakage_refuses_mismatched_image_shapes(lpips_metric):
    with pytest.raises(ValueError, match="differ in image shape"):
        leakage(torch.rand(1, 1, 16, 16), torch.rand(2, 1, 32, 32), lpips_metric=lpips_metric)


def test_utility_matches_a_hand_computed_confusion_matrix():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    # per-class F1 = 2tp / (2tp + fp + fn): class 0: 2/4, class 1: 4/5, class 2: 2/3
    result = utility(y_true, y_pred, num_classes=3)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["micro_f1"] == pytest.approx(4 / 6)
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # An absent class counts as F1 0 in the macro average.
    assert utility(y_true, y_pred, num_classes=4)["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 4)


def test_utility_exposes_a_collapsed_model():
    y_true = torch.tensor([1] * 5 + [0] * 3)
    result = utility(y_true, torch.ones(8, dtype=torch.long), num_classes=2)
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["macro_f1"] == pytest.approx((0 + 2 * 5 / (2 * 5 + 3)) / 2)


def test_utility_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        utility([0, 2], [0, 1], num_classes=2)
