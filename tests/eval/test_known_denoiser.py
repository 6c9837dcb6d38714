"""The attacker who knows the defense: its denoiser removes the defense's noise better than TV.

Trained on PneumoniaMNIST's val split (the attacker's public images), scored on 64 images of
the test split noised with seeds the training never drew, in PSNR against the clean images.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from gradguard.calibration import bound
from gradguard import GradGuard, GuardConfig
from gradguard.eval.adaptive import adaptive_variants, denoise
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.known_noise import (DenoiserConfig, KnownNoiseDenoiser, NoiseFn, gaussian_noise,
                                        gradguard_noise, gradguard_noise_for_update)
from gradguard.eval.metrics import psnr
from gradguard.eval.models import SmallCNN

TEST_CONFIG = DenoiserConfig(steps=300)  # 12 s (white noise) to 40 s (GradGuard's) of training on one core


def _model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(1, 2, width=8)


def _held_out(noise_fn: NoiseFn) -> tuple[Tensor, Tensor]:
    clean = load_medmnist("pneumoniamnist", "test").images[:64]
    return clean, noise_fn(clean, torch.Generator().manual_seed(12345)).clamp(0, 1)


@pytest.mark.parametrize("kind, margin_db", [
    ("gaussian", 0.5),   # sigma 0.1: measured TV 27.9 dB, denoiser 29.0 dB
    ("targeted", 3.0),  # the targeted preset's smooth noise: TV 14.2 dB (noised 13.9), denoiser 20.4 dB
])
def test_known_noise_denoiser_beats_tv_on_held_out_public_images(kind: str, margin_db: float) -> None:
    noise_fn = gaussian_noise(0.1) if kind == "gaussian" else gradguard_noise(GuardConfig.preset("targeted"),
                                                                                     model=_model())
    clean, noised = _held_out(noise_fn)
    denoiser = KnownNoiseDenoiser(TEST_CONFIG).fit(load_medmnist("pneumoniamnist", "val").images, noise_fn)
    learned = psnr(denoiser.apply(noised), clean).mean().item()
    tv = psnr(denoise(noised, "tv"), clean).mean().item()
    assert learned >= tv + margin_db, f"denoiser {learned:.2f} dB, TV {tv:.2f} dB"
    variants = adaptive_variants(noised, known_noise=denoiser)
    assert torch.equal(variants["known_noise"], denoiser.apply(noised))


def test_gradguard_noise_is_the_defense_s_own_and_fresh_per_seed() -> None:
    """The same amplitude as the guard's noise (RMS within 5%), new noise for every seed."""
    clean = load_medmnist("pneumoniamnist", "val").images[:8]
    config = GuardConfig(noise_kind="gaussian", mask_floor=1.0, leakage_target_db=None)
    noise_fn = gradguard_noise(config, model=_model())
    first = noise_fn(clean, torch.Generator().manual_seed(0)) - clean
    second = noise_fn(clean, torch.Generator().manual_seed(1)) - clean
    # A flat rms-normalised mask: every pixel gets w_0 * max|x| * N(0, 1).
    expected = config.noise_amplitude * clean.flatten(1).amax(dim=1)
    torch.testing.assert_close(first.flatten(1).std(dim=1), expected, rtol=0.05, atol=0.0)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(noise_fn(clean, torch.Generator().manual_seed(0)) - clean, first)
    # Calibrated: each image gets the least noise whose bound meets the target, its prior the batch's others.
    calibrated = gradguard_noise(GuardConfig(noise_kind="gaussian"), model=_model())
    noise = calibrated(clean, torch.Generator().manual_seed(0)) - clean
    spectrum = bound.noise_spectrum(clean, kind="gaussian", smoothness=1.5)
    sigma = bound.calibrate_sigma(clean, (clean.sum(dim=0, keepdim=True) - clean) / 7, target_db=1.0,
                                  spectrum=spectrum, max_sigma=10 * clean.flatten(1).abs().amax(dim=1))
    torch.testing.assert_close(noise.flatten(1).pow(2).mean(dim=1).sqrt(), sigma, rtol=1e-4, atol=0.0)


def test_the_noise_model_is_read_from_a_guard_s_update() -> None:
    """Everything but the seed travels with the update, so the attacker's noise is the same as
    from the configuration itself."""
    images = load_medmnist("pneumoniamnist", "val").images[:4]
    config = GuardConfig.preset("chest_xray", seed=7)
    model = _model()
    guard = GradGuard(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard.wrap(model, optimizer, dataset_size=4)
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    update = guard.protected_update()
    guard.cleanup()
    read = gradguard_noise_for_update(update, model=model)(images, torch.Generator().manual_seed(3))
    known = gradguard_noise(config, model=model, dataset_size=4)(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(read, known)
    with pytest.raises(ValueError, match="configuration"):
        gradguard_noise_for_update(dataclasses.replace(update, metadata={}), model=model)


def test_denoiser_is_deterministic_given_its_seed() -> None:
    public = load_medmnist("pneumoniamnist", "val").images[:64]
    images = public[:4]
    fits = [KnownNoiseDenoiser(DenoiserConfig(steps=5, seed=s)).fit(public, gaussian_noise(0.1)) for s in (0, 0, 1)]
    outputs = [d.apply(images) for d in fits]
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_denoiser_errors_say_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        KnownNoiseDenoiser().apply(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="depth"):
        DenoiserConfig(depth=1)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise(-1.0)
