"""The mask mathematics: small pure functions, and the per-sample mask store.

Maps are tensors [B, 1, H, W] (or [B, 1, D, H, W] for volumes). A vulnerability map is high where an attacker
recovers the pixel well; a relevance map is high where the diagnosis looks. The mask M says where noise
goes; it is normalised per sample so that the noise budget does not depend on its shape.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Normalization = Literal["rms", "peak"]


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values [B] shaped to broadcast against ``like`` [B, ...]."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-sample histogram equalisation: each pixel's rank among its sample's pixels, in [0, 1]."""
    flat = x.flatten(1)
    ranks = flat.argsort(dim=1).argsort(dim=1).to(x.dtype)
    return (ranks / max(flat.shape[1] - 1, 1)).view_as(x)


def spatial_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over each sample's pixels, rescaled so the sample's largest value is 1."""
    flat = torch.softmax(x.flatten(1) / temperature, dim=1)
    return (flat / flat.amax(dim=1, keepdim=True)).view_as(x)


def vulnerability_map(error: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Low reconstruction error (the attacker recovers the pixel) -> high vulnerability.

    Ranks, not raw errors, so the map does not depend on the shadow's error scale.
    """
    return spatial_softmax(equalize(-error), temperature)


def recovery_map(error: torch.Tensor, prior_error: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """Where an attack recovers a pixel better than the prior guesses it: the gain in squared error
    (0 where the attack does no better: noise there buys nothing), blurred over ``sigma`` pixels
    (one pixel's error is noisy, and noise cannot be placed more finely than it is correlated),
    peak 1. A sample the attack recovers nowhere gets a flat map: no pixel needs the noise more."""
    gain = gaussian_blur((prior_error - error).clamp_min(0.0), sigma=sigma)
    peak = per_sample(gain.flatten(1).amax(dim=1), gain)
    return torch.where(peak > 0, gain / peak.clamp_min(1e-30), torch.ones_like(gain))


def shadowdef_vulnerability_map(error: torch.Tensor, *, temperature: float = 20.0) -> torch.Tensor:
    """The paper's rule: r = softmax(e/T), n = hist-equalise(1/r), V = softmax(n/T)."""
    r = torch.softmax(error.flatten(1) / temperature, dim=1).view_as(error)
    levels = equalize(1.0 / r) * 255.0  # cv2.equalizeHist's 0..255 output range
    return torch.softmax(levels.flatten(1) / temperature, dim=1).view_as(error)


def relevance_map(attribution: torch.Tensor, *, top_fraction: float, temperature: float) -> torch.Tensor:
    """Keep the top fraction of an attribution's pixels (by rank), sharpen, peak 1; others 0."""
    ranks = equalize(attribution)
    kept = ranks >= 1.0 - top_fraction
    sharpened = spatial_softmax(torch.where(kept, ranks, torch.zeros_like(ranks)), temperature)
    return torch.where(kept, sharpened, torch.zeros_like(sharpened))


def shadowdef_relevance_map(cam: torch.Tensor, *, top_fraction: float = 0.3,
                            temperature: float = 20.0) -> torch.Tensor:
    """The paper's rule: top-30% of the [0, 1]-scaled Grad-CAM, softmax(CAM / 20).

    With CAM in [0, 1] and T = 20 the result varies by about 5% over the image: nearly uniform.
    """
    flat = cam.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    scaled = (flat - low) / (high - low).clamp_min(1e-12)
    threshold = torch.quantile(scaled, 1.0 - top_fraction, dim=1, keepdim=True)
    top = torch.where(scaled >= threshold, scaled, torch.zeros_like(scaled))
    return torch.softmax(top / temperature, dim=1).view_as(cam)


def relevance_weight(t: int, total: int, *, low: float, high: float) -> float:
    """a_t = clip(t / T, low, high): how strongly relevant pixels are spared in round t."""
    return float(min(max(t / total, low), high))


def noise_amplitude(t: int, total: int, *, base: float, growth: float) -> float:
    """w_t = w_0 exp(growth t / T)."""
    return base * math.exp(growth * t / total)


def averaged_amplitude(amplitude: float, images: int, *, exponent: float) -> float:
    """w_t n^(-exponent): the amplitude for images whose gradients are averaged n at a time
    (n = a step's batch, or all the images a shared update covers)."""
    if images < 1:
        raise ValueError(f"an average covers at least one image, got {images}")
    return amplitude * images ** -exponent


def combine(vulnerability: torch.Tensor, relevance: torch.Tensor, *, weight: float,
            rule: Literal["product", "subtract"], floor: float,
            normalization: Normalization = "rms") -> torch.Tensor:
    """M from V and R. ``product``: V (1 - a R); ``subtract``: max(V - a R, 0) (the paper).

    Then a floor (no pixel is left bare) and per-sample normalisation: ``rms`` makes the
    mean of M^2 equal 1, so equal amplitudes mean equal noise energy whatever the mask's shape;
    ``peak`` makes max M = 1 (the paper's convention).
    """
    if rule == "product":
        mask = vulnerability * (1.0 - weight * relevance)
    else:
        mask = (vulnerability - weight * relevance).clamp_min(0.0)
    mask = mask / per_sample(mask.flatten(1).amax(dim=1).clamp_min(1e-12), mask)
    mask = floor + (1.0 - floor) * mask
    return normalize(mask, normalization)


def normalize(mask: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    flat = mask.flatten(1)
    scale = flat.pow(2).mean(dim=1).sqrt() if normalization == "rms" else flat.amax(dim=1)
    return mask / per_sample(scale.clamp_min(1e-12), mask)


def smooth(previous: torch.Tensor, fresh: torch.Tensor, *, momentum: float) -> torch.Tensor:
    """Exponential smoothing across refreshes: momentum weights the previous mask."""
    return momentum * previous + (1.0 - momentum) * fresh


def low_pass_noise(white: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """White noise blurred by a Gaussian of ``sigma`` pixels (voxels for [B, C, D, H, W]), rescaled
    to unit variance per sample.

    Denoisers (TV, non-local means) remove white noise from a reconstruction but not spatially
    correlated noise, so at equal energy this survives an adaptive attacker.
    """
    blurred = gaussian_blur(white, sigma=sigma)
    std = blurred.flatten(1).std(dim=1).clamp_min(1e-12)
    return blurred / per_sample(std, blurred)


def gaussian_blur(x: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """``x`` [B, C, ...] blurred by a Gaussian of ``sigma`` pixels along every spatial axis (reflected
    edges; the kernel is cut at 3 sigma, or at the axis' length)."""
    channels, spatial = x.shape[1], x.ndim - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    blurred = x
    for axis in range(spatial):  # separable: one 1-D blur per spatial axis
        radius = min(max(int(3 * sigma), 1), x.shape[2 + axis] - 1)
        if radius < 1:
            continue
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
        shape = [1] * spatial
        shape[axis] = -1
        pad = [0, 0] * spatial
        pad[2 * (spatial - 1 - axis):2 * (spatial - axis)] = [radius, radius]  # F.pad lists the last axis first
        weight = (kernel / kernel.sum()).view(1, 1, *shape).expand(channels, 1, *kernel.view(*shape).shape)
        blurred = conv(F.pad(blurred, pad, mode="reflect"), weight, groups=channels)
    return blurred


def sample_ids(images: torch.Tensor) -> list[str]:
    """A stable id per sample from its bytes, so its mask persists across rounds and re-wraps; the
    batch moves to the CPU once (one device synchronisation, not one per image)."""
    data = images.detach().to("cpu", torch.float32).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in data]


def sample_id(image: torch.Tensor) -> str:
    """:func:`sample_ids` of one sample."""
    return sample_ids(image[None])[0]


@dataclass
class MaskStore:
    """Per-sample masks with the local step of their last refresh (kept across rounds)."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    refreshed_at: dict[str, int] = field(default_factory=dict)

    def __contains__(self, sid: str) -> bool:
        return sid in self.masks

    def __len__(self) -> int:
        return len(self.masks)

    def update(self, ids: list[str], fresh: torch.Tensor, *, momentum: float, step: int) -> None:
        for sid, mask in zip(ids, fresh):
            old = self.masks.get(sid)
            self.masks[sid] = mask.detach() if old is None else smooth(old.to(mask.device), mask.detach(),
                                                                      momentum=momentum)
            self.refreshed_at[sid] = step

    def stack(self, ids: list[str], like: torch.Tensor) -> torch.Tensor:
        """The masks of ``ids`` on ``like``'s device and dtype."""
        for sid in ids:  # masks loaded from a saved state arrive on the CPU: moved once, not every step
            if self.masks[sid].device != like.device:
                self.masks[sid] = self.masks[sid].to(like.device)
        return torch.stack([self.masks[sid] for sid in ids]).to(like.dtype)
