"""The adaptive attacker: a reconstruction denoised before it is scored.

An input-noise defense makes an attack recover the *noised* image; an attacker who knows the
defense removes that noise afterwards. The denoisers are blind: their strength comes from the
reconstruction's own noise estimate (:func:`noise_sigma`), never from the true image. An attacker
with data of the same kind also restores brightness and contrast (:func:`calibrate`), and one
who knows the defense removes its exact noise with a network trained for it
(:class:`gradguard.eval.known_noise.KnownNoiseDenoiser`). The benchmark scores every defense
against the strongest (highest-PSNR) of these variants.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle
from torch import Tensor

from gradguard.eval.known_noise import KnownNoiseDenoiser

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
    # Chambolle's weight trades fidelity for smoothness; the noise level is its natural scale.
    return denoise_tv_chambolle(image, weight=sigma, channel_axis=channel_axis)


def _nlm(image: np.ndarray, sigma: float, channel_axis: int | None) -> np.ndarray:
    # h = 0.8 sigma with sigma passed in is scikit-image's recommended setting for fast mode;
    # 3 px patches within 4 px suit 32-64 px images.
    return denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=3, patch_distance=4,
                            fast_mode=True, channel_axis=channel_axis)


DENOISERS: dict[str, Callable[[np.ndarray, float, int | None], np.ndarray]] = {"tv": _tv, "nlm": _nlm}


def denoise(images: Tensor, method: str) -> Tensor:
    """``images`` [N, C, H, W] in [0, 1] denoised one by one with ``method`` ("tv" or "nlm")."""
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
    return torch.from_numpy(np.stack(out)).to(images.dtype)


def calibrate(images: Tensor, prior: Tensor) -> Tensor:
    """Each image's intensities mapped affinely to the prior's typical mean and contrast.

    Normalisation layers (BatchNorm at batch 1 normalises each channel over the image) make an
    update nearly blind to an image's brightness and contrast, so an attack recovers the
    structure with an arbitrary offset and gain. An attacker who holds data of the same kind
    (``prior`` [M, C, H, W]) restores them: per channel, the reconstruction gets the prior's
    mean per-image mean and standard deviation. Results are clipped to [0, 1].
    """
    if images.ndim != 4 or prior.ndim != 4 or images.shape[1] != prior.shape[1]:
        raise ValueError(f"images and prior must be [N, C, H, W] with equal C, got {tuple(images.shape)} "
                         f"and {tuple(prior.shape)}")
    prior = prior.to(images.device, images.dtype)
    target_mean = prior.mean(dim=(2, 3)).mean(dim=0).view(1, -1, 1, 1)
    target_std = prior.std(dim=(2, 3)).mean(dim=0).view(1, -1, 1, 1)
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return ((images - mean) / std * target_std + target_mean).clamp(0, 1)


def adaptive_variants(images: Tensor, prior: Tensor | None = None, *,
                      known_noise: KnownNoiseDenoiser | None = None) -> dict[str, Tensor]:
    """The plain reconstruction and each denoiser's version of it, by name; with ``known_noise``
    (a denoiser fitted to the defense's noise) also its version, ``"known_noise"``; with
    ``prior`` (the attacker's own images) also each of them calibrated to it
    (``"tv+calibrated"``, ...)."""
    variants = {"plain": images, **{name: denoise(images, name) for name in DENOISERS}}
    if known_noise is not None:
        variants["known_noise"] = known_noise.apply(images)
    if prior is not None:
        variants.update({f"{name}+calibrated": calibrate(v, prior) for name, v in list(variants.items())})
    return variants
