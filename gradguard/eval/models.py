"""Models of the evaluation protocol: a leaky conv net and a small CNN with BatchNorm for CPU runs, ResNet-18."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "group", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """Three conv blocks (conv, norm, ReLU, the last two with stride 2) and a Linear head.

    ``features`` ends with the last conv block, the layer Grad-CAM reads.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, *, width: int = 32, norm: Norm = "batch"):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), _norm(norm, w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _norm(norm, 2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), _norm(norm, 4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear(4 * w * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class ConvNet(nn.Module):
    """Three 3x3 conv layers (stride 1, ReLU, no normalisation) and a Linear head on the full map.

    No pooling bottleneck: the head's gradient keeps every spatial position of the last
    feature map, so an update of this model leaks its images (the CPU victim of the leakage
    benchmark, in the spirit of the ConvNet of Geiping et al., "Inverting Gradients", NeurIPS 2020).
    ``features`` is the last conv block, the layer Grad-CAM reads.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, *, width: int = 16, image_size: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Linear(w * image_size * image_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def resnet18(in_channels: int = 1, num_classes: int = 2) -> nn.Module:
    """torchvision's ResNet-18 (the paper's model), first conv adapted to the image channels."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


MODELS = ("convnet", "smallcnn", "resnet18")


def build_model(name: str, *, in_channels: int, num_classes: int, norm: Norm = "batch", width: int | None = None,
                image_size: int = 32) -> nn.Module:
    """A model of :data:`MODELS` by name; ``width`` defaults to each model's own."""
    if name == "convnet":
        return ConvNet(in_channels, num_classes, width=width or 16, image_size=image_size)
    if name == "smallcnn":
        return SmallCNN(in_channels, num_classes, norm=norm, width=width or 32)
    if name == "resnet18":
        return resnet18(in_channels, num_classes)
    raise KeyError(f"unknown model {name!r}; choose from {MODELS}")
