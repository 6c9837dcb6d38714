"""Relevance maps: where the global model looks for the sample's class.

Grad-CAM, the default, is computed here in one forward and one backward for the whole batch, on
the last 2-D or 3-D convolution; the other methods come from captum, imported only when used.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradguard.errors import last_layer
from gradguard.registry import Registry

RelevanceFn = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
RELEVANCE_METHODS: Registry[RelevanceFn] = Registry("relevance method")
LAYER_METHODS = ("gradcam", "guided_gradcam")
"""Methods that read the last convolution's activations."""


def register_relevance(name: str) -> Callable[[RelevanceFn], RelevanceFn]:
    return RELEVANCE_METHODS.decorator(name)


def last_conv_layer(model: nn.Module, spatial_dims: int = 2) -> tuple[str, nn.Module]:
    """The last Conv2d (Conv3d for volumes) in registration order: the layer Grad-CAM reads."""
    kind = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return last_layer(model, kind, needed_for="so Grad-CAM has no layer to read",
                      fix="use relevance_method='saliency' or 'integrated_gradients', or 'none'")


def to_pixels(attribution: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, C', h, w(, d)] attribution -> [B, 1, H, W(, D)] magnitude at the input's resolution."""
    amap = attribution.abs().sum(dim=1, keepdim=True) if attribution.shape[1] > 1 else attribution
    if amap.shape[2:] != like.shape[2:]:
        mode = "trilinear" if like.ndim == 5 else "bilinear"
        amap = F.interpolate(amap, size=like.shape[2:], mode=mode, align_corners=False)
    return amap.detach()


def gradcam_from(activations: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of a layer's ``activations`` [B, C, ...] for ``score``, the
    sum over the batch of each sample's target logit: relu(sum_c mean(dscore/dA_c) A_c), [B, 1, ...].
    Samples are independent in eval mode, so one backward serves the whole batch."""
    grads = torch.autograd.grad(score, activations)[0]
    weights = grads.mean(dim=tuple(range(2, grads.ndim)), keepdim=True)
    return F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()


@register_relevance("gradcam")
def gradcam(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return to_pixels(gradcam_from(captured[-1], logits.gather(1, targets[:, None]).sum()), images)


@register_relevance("guided_gradcam")
def guided_gradcam(model: nn.Module, layer: nn.Module, images: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import GuidedGradCam

    return to_pixels(GuidedGradCam(model, layer).attribute(images, target=targets), images)


@register_relevance("saliency")
def saliency(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import Saliency

    return to_pixels(Saliency(model).attribute(images, target=targets, abs=True), images)


@register_relevance("integrated_gradients")
def integrated_gradients(model: nn.Module, layer: nn.Module, images: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    return to_pixels(IntegratedGradients(model).attribute(images, target=targets, n_steps=16), images)


def attribution(method: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Raw attribution magnitude [B, 1, ...] of ``model`` (in eval mode) for ``targets``."""
    fn = RELEVANCE_METHODS.lookup(method)
    layer = last_conv_layer(model, images.ndim - 2)[1] if method in LAYER_METHODS else model
    images = images.detach().requires_grad_(True)
    return fn(model, layer, images, targets)
