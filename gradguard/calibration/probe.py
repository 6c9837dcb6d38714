"""The honest server's attack, run by the client on its own gradient: does this update leak at all?

The noised-input bound (:mod:`gradguard.calibration.bound`) holds against every attacker, but at
zero noise it says "exact recovery", which is what a malicious server's imprint module achieves,
not what an honest server inverting a gradient of many images does. Under the honest server the
client therefore attacks its own round as that server would: a short Inverting-Gradients attack
(cosine gradient matching with total variation, Geiping et al. 2020) on the gradient of the round's
first batch at the global weights, clean and then with growing fractions of the bound's noise,
scored against the true images it holds. It is the attack of the leakage benchmark at that
benchmark's budget (random start inside the images' range, the box constraint, TV 1e-2, the step
decay at 3/8, 5/8 and 7/8 of the run): a 100-step version of it fell 4 to 9 dB short of a 1000-step
attack on a trained SmallCNN's one-image updates, far more than a margin covers. A single step's
gradient leaks more than a delta over several steps, so one batch's gradient is the worst case of
the round; the rest of what a longer attack finds is the margin's (:data:`PROBE_MARGIN_DB`).

A delta over several batches mixes every image of the round: for small steps it is the gradient of
all of them at the global weights, which the server inverts as one batch. Once the guard has seen a
client's images in an earlier round it probes that gradient, of the round's first batch and up to
:data:`PROBE_MIX_IMAGES` images in all, instead of the first batch's alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from gradguard.calibration.denoisers import DENOISERS, denoise
from gradguard.masks import per_sample

# What the probe's estimate adds for the attacks it is shorter than: the tolerance of the leakage
# report (an estimate at least the strongest measured attack minus 1 dB).
PROBE_MARGIN_DB = 1.0
# The fractions of the bound's noise the probe tries, least first; the bound's full noise is the fallback.
PROBE_FRACTIONS = (0.0, 0.125, 0.25, 0.5)
# The most images the probe mixes into a delta's gradient: more cost probe time and can only lower
# its estimate, toward the round's true mix (every image it trains on).
PROBE_MIX_IMAGES = 16
_TV_WEIGHT = 1e-2
# How often the probe scores its guess, to stop as soon as the leakage it looks for is shown.
_CHECK_EVERY = 25
_CHUNK_ELEMENTS = 1 << 24


def _gradient(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              labels: torch.Tensor, *, create_graph: bool) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(forward(images), labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def _squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(t * t).sum() for t in tensors]).sum()


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return sum((x.diff(dim=d).abs().mean() for d in range(2, x.ndim)), start=x.new_zeros(()))


def _matched(estimates: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Every estimate [E] given every true image's mean and contrast per channel: [E, N, C, P]."""
    e, x = estimates.flatten(2).double(), images.flatten(2).double()
    unit = (e - e.mean(dim=2, keepdim=True)) / e.std(dim=2, keepdim=True).clamp_min(1e-12)
    return unit[:, None] * x.std(dim=2)[None, :, :, None] + x.mean(dim=2)[None, :, :, None]


def _nearest(estimates: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every true image [N], the least mean squared error of any estimate [E], as it is or
    rescaled to the image's mean and contrast; the estimate that reaches it; and whether rescaled."""
    x = images.flatten(2).double()
    # In chunks of estimates: every estimate is compared with every image ([E, N, C, P] at once).
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x.numel()))
    raw, matched = zip(*[((part.flatten(2).double()[:, None] - x[None]).pow(2).mean(dim=(2, 3)),
                          (_matched(part, images) - x[None]).pow(2).mean(dim=(2, 3)))
                         for part in estimates.split(chunk)])
    errors = torch.stack([torch.cat(raw), torch.cat(matched)])  # [as is / rescaled, estimates, images]
    best, which = errors.flatten(0, 1).min(dim=0)
    return best, which % len(estimates), which >= len(estimates)


def above_prior_db(estimates: torch.Tensor, images: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """10 log10(MSE(prior) / MSE(best estimate)) per true image [N], the best of all the estimates
    (an attack's images need not come out in the batch's order), each as it is and rescaled to the
    true image's mean and contrast (normalisation layers hide brightness and contrast from an
    update, and an attacker restores them from public data at best that well); ``prior`` [N] is
    one guess per image, scored the same two ways."""
    x = images.flatten(2).double()
    errors = _nearest(estimates, images)[0]
    # The prior gets the same rescaling: knowing an image's brightness and contrast is not recovering
    # it; and it is never worse than a flat image at that brightness, which the rescaling grants any
    # estimate (a leave-one-out mean of a few images can be: measured +1.8 dB for a flat guess).
    prior_error = torch.stack([(prior - images).flatten(1).double().pow(2).mean(dim=1),
                               (_matched(prior, images).diagonal(dim1=0, dim2=1).permute(2, 0, 1)
                                - x).pow(2).mean(dim=(1, 2)),
                               x.var(dim=2, unbiased=False).mean(dim=1)]).amin(dim=0)
    return 10 * torch.log10(prior_error.clamp_min(1e-20) / errors.clamp_min(1e-20))


def recovered(estimates: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Each true image's best estimate [N, ...] (the one :func:`above_prior_db` scores), as the
    attacker would present it: rescaled to the image's mean and contrast where that scored better."""
    _, which, rescaled = _nearest(estimates, images)
    picked = estimates[which]
    rows = torch.arange(len(images), device=images.device)
    matched = _matched(picked, images)[rows, rows].view_as(images).to(images.dtype)
    return torch.where(per_sample(rescaled, images), matched, picked.to(images.dtype))


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run forward passes through ``model`` and leave it as it was: its buffers (BatchNorm's running
    statistics) restored and its gradients cleared."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)


def gradient_probe(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   labels: torch.Tensor, prior: torch.Tensor, *, steps: int, seed: int,
                   shared: torch.Tensor | None = None, stop_above: float = math.inf) -> torch.Tensor:
    """Leakage above ``prior`` in dB per image [N] of a ``steps``-step gradient-inversion attack
    on the gradient of ``shared`` (default ``images``; e.g. their noised copies) with classes
    ``labels`` (which iDLG recovers) at ``model``'s weights, scored against the clean ``images``.

    ``forward`` maps images to logits through ``model``; its parameters' gradients are what the
    attack matches. Its guess is scored as it is and after the blind denoisers
    (:mod:`gradguard.calibration.denoisers`). The attack stops early once some image's leakage
    exceeds ``stop_above`` (the caller's question is answered: the update leaks). The model is
    left as it was (buffers included).
    """
    guesses = invert_gradient(model, forward, images, labels, steps=steps, seed=seed, shared=shared,
                              stop=(prior, stop_above))
    return above_prior_db(guesses, images, prior)


def invert_gradient(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    labels: torch.Tensor, *, steps: int, seed: int, shared: torch.Tensor | None = None,
                    stop: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """The estimates of :func:`gradient_probe`'s attack: its guess [N, ...] followed by each blind
    denoiser's version of it. ``stop`` = (prior, dB): stop once some image is that far above the prior."""
    with buffers_kept(model), torch.enable_grad():
        inputs = images if shared is None else shared
        target = [g.detach() for g in _gradient(model, forward, inputs.detach(), labels, create_graph=False)]
        target_norm = _squared_norm(target).sqrt()
        generator = torch.Generator(device=images.device).manual_seed(seed)
        # The box the attacker knows the images lie in; the start is uniform in it and carries
        # nothing of the batch (a leave-one-out prior would: +4 dB over the prior before one step).
        low, high = float(images.min()), float(images.max())
        guess = (low + (high - low) * torch.rand(images.shape, generator=generator, device=images.device,
                                                 dtype=images.dtype)).requires_grad_(True)
        optimizer = torch.optim.Adam([guess], lr=0.1)
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        for step_index in range(1, steps + 1):
            optimizer.zero_grad()
            grads = _gradient(model, forward, guess, labels, create_graph=True)
            dot = torch.stack([(g * t).sum() for g, t in zip(grads, target)]).sum()
            norm = _squared_norm(grads).sqrt().clamp_min(1e-12)
            loss = 1 - dot / (norm * target_norm.clamp_min(1e-12)) + _TV_WEIGHT * _total_variation(guess)
            (step,) = torch.autograd.grad(loss, [guess])
            guess.grad = step.sign()  # signed gradients, as Inverting Gradients uses
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                guess.clamp_(low, high)
            if stop is not None and step_index % _CHECK_EVERY == 0 and step_index < steps \
                    and float(above_prior_db(guess.detach(), images, stop[0]).max()) > stop[1]:
                break
    return _with_denoised(guess.detach(), low, high)


def _with_denoised(guess: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The guess and each blind denoiser's version of it, as the benchmark's attacker post-processes
    a reconstruction (measured: TV alone added 1.6 to 1.9 dB on a trained SmallCNN's one-image
    update). Images that are not [N, C, H, W] are scored as they are."""
    if guess.ndim != 4:
        return guess
    scale = max(high - low, 1e-12)
    unit = (guess - low) / scale  # the denoisers work in [0, 1]
    return torch.cat([guess, *(low + scale * denoise(unit, name) for name in DENOISERS)])
