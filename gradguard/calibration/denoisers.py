"""The blind denoisers an attacker runs on a reconstruction before it is scored.

An attack on a gradient recovers a noisy image; total variation (Chambolle) and non-local means
remove part of that noise without knowing the true image, and the leakage benchmark scores the
best of them, so the client's probe scores its own reconstruction the same way. Their strength
comes from the reconstruction's own noise estimate (:func:`noise_sigma`). scikit-image is
imported when they first run.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

# A clean reconstruction has a near-zero noise estimate; this floor keeps the denoisers defined.
_MIN_SIGMA = 1e-3


def noise_sigma(image: np.ndarray) -> float:
    """Donoho's robust noise estimate, median(|HH|) / 0.6745, on the finest Haar diagonal band.

    ``image`` is [H, W] or [H, W, C] (averaged over channels). This is what
    ``skimage.restoration.estimate_sigma`` computes with a Daubechies wavelet, without its
    PyWavelets dependency.
    """
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    x = image[:h, :w]
    diagonal = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2
    return float(np.median(np.abs(diagonal)) / 0.6745)


def _tv(image: np.ndarray, sigma: float, channel_axis: int | None) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    # Chambolle's weight trades fidelity for smoothness; the noise level is its natural scale.
    return denoise_tv_chambolle(image, weight=sigma, channel_axis=channel_axis)


def _nlm(image: np.ndarray, sigma: float, channel_axis: int | None) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    # h = 0.8 sigma with sigma passed in is scikit-image's recommended setting for fast mode;
    # 3 px patches within 4 px suit 32-64 px images.
    return denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=3, patch_distance=4,
                            fast_mode=True, channel_axis=channel_axis)


DENOISERS: dict[str, Callable[[np.ndarray, float, int | None], np.ndarray]] = {"tv": _tv, "nlm": _nlm}


def denoise(images: Tensor, method: str) -> Tensor:
    """``images`` [N, C, H, W] in [0, 1] denoised one by one with ``method`` ("tv" or "nlm"), on
    their device."""
    if method not in DENOISERS:
        raise KeyError(f"unknown denoiser {method!r}; choose from {sorted(DENOISERS)}")
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    out = []
    for image in images.detach().cpu().double().numpy():
        gray = image.shape[0] == 1
        array, axis = (image[0], None) if gray else (image.transpose(1, 2, 0), -1)
        sigma = max(noise_sigma(array), _MIN_SIGMA)
        result = np.clip(DENOISERS[method](array, sigma, axis), 0, 1)
        out.append(result[None] if gray else result.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).to(images.device, images.dtype)
