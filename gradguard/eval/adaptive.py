"""The adaptive attacker: a reconstruction denoised before it is scored.

An input-noise defense makes an attack recover the *noised* image; an attacker who knows the
defense removes that noise afterwards. The denoisers are blind (:mod:`gradguard.calibration.denoisers`,
which the client's probe scores its own attack with too): their strength comes from the
reconstruction's own noise estimate (:func:`noise_sigma`), never from the true image. An attacker
with data of the same kind also restores brightness and contrast (:func:`calibrate`), and one
who knows the defense removes its exact noise with a network trained for it
(:class:`gradguard.eval.known_noise.KnownNoiseDenoiser`). The benchmark scores every defense
against the strongest (highest-PSNR) of these variants.
"""
from __future__ import annotations

from torch import Tensor

from gradguard.calibration.denoisers import DENOISERS, denoise, noise_sigma
from gradguard.eval.known_noise import KnownNoiseDenoiser

__all__ = ["DENOISERS", "adaptive_variants", "calibrate", "denoise", "noise_sigma"]


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
