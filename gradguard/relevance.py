"""Relevance maps from captum: where the global model looks for the sample's class."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradguard.errors import last_layer
from gradguard.registry import Registry

RelevanceFn = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
RELEVANCE_METHODS: Registry[RelevanceFn] = Registry("relevance method")


def register_relevance(name: str) -> Callable[[RelevanceFn], RelevanceFn]:
    return RELEVANCE_METHODS.decorator(name)


def last_conv_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The last Conv2d in registration order: the layer Grad-CAM reads."""
    return last_layer(model, nn.Conv2d, needed_for="so Grad-CAM has no layer to read",
                      fix="use relevance_method='saliency' or 'integrated_gradients', or 'none'")


def _to_pixels(attribution: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, C', h, w] attribution -> [B, 1, H, W] magnitude at the input's resolution."""
    amap = attribution.abs().sum(dim=1, keepdim=True) if attribution.shape[1] > 1 else attribution
    if amap.shape[-2:] != like.shape[-2:]:
        amap = F.interpolate(amap, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return amap.detach()


@register_relevance("gradcam")
def gradcam(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import LayerGradCam

    cam = LayerGradCam(model, layer).attribute(images, target=targets, relu_attributions=True)
    return _to_pixels(cam, images)


@register_relevance("guided_gradcam")
def guided_gradcam(model: nn.Module, layer: nn.Module, images: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import GuidedGradCam

    return _to_pixels(GuidedGradCam(model, layer).attribute(images, target=targets), images)


@register_relevance("saliency")
def saliency(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import Saliency

    return _to_pixels(Saliency(model).attribute(images, target=targets, abs=True), images)


@register_relevance("integrated_gradients")
def integrated_gradients(model: nn.Module, layer: nn.Module, images: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    return _to_pixels(IntegratedGradients(model).attribute(images, target=targets, n_steps=16), images)


def attribution(method: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Raw attribution magnitude [B, 1, H, W] of ``model`` for ``targets`` (model left in eval mode)."""
    fn = RELEVANCE_METHODS.lookup(method)
    layer = last_conv_layer(model)[1] if method in ("gradcam", "guided_gradcam") else model
    images = images.detach().requires_grad_(True)
    return fn(model, layer, images, targets)
