"""How much of an image a noised copy of it gives away: the bound the calibrated noise is chosen by.

Every update a client shares is computed from the noised inputs alone, so no attack on it (gradient
inversion, an imprint module, a denoiser that knows the noise model) can estimate an image better
than the best estimator given its noised copy (the data-processing inequality). The guard bounds
that estimator with the *oracle Wiener filter*: the linear filter that knows the image's own power
spectrum around the prior, |X(f) - P(f)|^2, and the noise's, and keeps each frequency in proportion
to its signal-to-noise ratio. Its expected error is closed-form, so the smallest amplitude that
meets a target is found by bisection without drawing noise.

Leakage is in dB above the prior, as the benchmark scores attacks: 10 log10(MSE(prior) / MSE(estimate)).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gradguard import masks as mk


def _spatial_dims(images: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, images.ndim))


@functools.lru_cache(maxsize=16)
def _spectrum(shape: tuple[int, ...], kind: str, smoothness: float) -> torch.Tensor:
    """Power spectrum (mean 1) of the guard's unit-variance noise of ``kind`` on ``shape`` pixels."""
    if kind != "smooth":  # white noise: flat
        return torch.ones(shape, dtype=torch.float64)
    impulse = torch.zeros((1, 1, *shape), dtype=torch.float64)
    impulse[(0, 0, *(s // 2 for s in shape))] = 1.0
    # low_pass_noise's own blur (reflect-padded, separable) applied to an impulse: its kernel.
    kernel = mk.low_pass_noise(impulse, sigma=smoothness)[0, 0]
    power = torch.fft.fftn(kernel, norm="ortho").abs().pow(2)
    return power / power.mean()


def noise_spectrum(images: torch.Tensor, *, kind: str, smoothness: float) -> torch.Tensor:
    """The noise's power spectrum over ``images``' spatial axes (mean 1), on their device."""
    shape = tuple(images.shape[2:])
    return _spectrum(shape, kind, float(smoothness)).to(images.device)


def _signal_power(images: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """|FFT(x - prior)|^2 per image and channel, orthonormal: its sum is the squared error of the prior."""
    return torch.fft.fftn((images - prior).double(), dim=_spatial_dims(images), norm="ortho").abs().pow(2)


def wiener_leakage_db(images: torch.Tensor, prior: torch.Tensor, sigma: torch.Tensor, *, spectrum: torch.Tensor
                      ) -> torch.Tensor:
    """The oracle Wiener filter's expected leakage above ``prior`` in dB, one value per image [N].

    ``sigma`` [N]: each image's noise standard deviation per pixel (amplitude times the image's
    scale); ``spectrum``: the noise's power spectrum (mean 1). Infinite where sigma is 0.
    """
    signal = _signal_power(images, prior).flatten(1)  # [N, C*P]
    noise = (sigma.double()[:, None] ** 2) * spectrum.flatten().repeat(images.shape[1])[None]
    prior_error = signal.sum(dim=1)
    estimate_error = (signal * noise / (signal + noise).clamp_min(1e-300)).sum(dim=1)
    return 10 * torch.log10(prior_error.clamp_min(1e-300) / estimate_error.clamp_min(1e-300))


def wiener_estimate(noised: torch.Tensor, images: torch.Tensor, prior: torch.Tensor, sigma: torch.Tensor, *,
                    spectrum: torch.Tensor) -> torch.Tensor:
    """The oracle Wiener filter applied to a realised noised copy: what the bound's attacker outputs."""
    dims = _spatial_dims(images)
    signal = _signal_power(images, prior)
    noise = (sigma.double().view(-1, *([1] * (images.ndim - 1))) ** 2) * spectrum
    gain = signal / (signal + noise).clamp_min(1e-300)
    residual = torch.fft.fftn((noised - prior).double(), dim=dims, norm="ortho")
    return (prior.double() + torch.fft.ifftn(gain * residual, dim=dims, norm="ortho").real).to(images.dtype)


def calibrate_sigma(images: torch.Tensor, prior: torch.Tensor, *, target_db: float, spectrum: torch.Tensor,
                    max_sigma: torch.Tensor, iterations: int = 40) -> torch.Tensor:
    """Per image, the smallest noise standard deviation whose bound is at most ``target_db`` [N].

    The bound falls monotonically as sigma grows, so bisection on log sigma converges; an image
    whose bound stays above the target at ``max_sigma`` [N] gets ``max_sigma`` (the caller flags it).
    """
    low = torch.zeros_like(max_sigma, dtype=torch.float64)
    high = max_sigma.double().clone()
    meets = wiener_leakage_db(images, prior, high, spectrum=spectrum) <= target_db
    for _ in range(iterations):
        middle = (low + high) / 2
        ok = wiener_leakage_db(images, prior, middle, spectrum=spectrum) <= target_db
        high = torch.where(ok, middle, high)
        low = torch.where(ok, low, middle)
    return torch.where(meets, high, max_sigma.double()).to(images.dtype)


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image [N] as scikit-image computes it by default (7x7 uniform
    window, sample covariances, K1 = 0.01, K2 = 0.03, mean over channels and valid pixels) for
    2-D images; ``data_range`` [N]."""
    if a.ndim != 4:
        raise ValueError(f"ssim takes [N, C, H, W] images, got shape {tuple(a.shape)}")
    win, n = 7, 49
    x, y = a.double(), b.double()
    channels = x.shape[1]
    kernel = torch.full((channels, 1, win, win), 1.0 / n, dtype=torch.float64, device=x.device)

    def local(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    ux, uy = local(x), local(y)
    cov = n / (n - 1)
    vx, vy, vxy = cov * (local(x * x) - ux * ux), cov * (local(y * y) - uy * uy), cov * (local(x * y) - ux * uy)
    r = data_range.double().view(-1, 1, 1, 1)
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    index = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    # scikit-image crops (win - 1) / 2 pixels at each border before averaging; 'valid' convolution did.
    return index.flatten(1).mean(dim=1).to(a.dtype)
