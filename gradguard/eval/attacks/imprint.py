"""The malicious server's imprint attack (Fowl et al., "Robbing the Fed", ICLR 2022).

The server ships a model whose first block is an *imprint*: a Linear layer from the flattened
input to k bins, a ReLU, and a Linear layer back to the input's shape, added to the input in
front of the victim. Every bin measures the same quantity h(x) (here the mean brightness) and
bin i fires when h(x) > t_i, with thresholds t_0 < ... < t_(k-1) at quantiles of h on public
data, so a batch's images spread evenly over the bins. For bin i the gradient of the mean loss
over a batch of B images is

    dW_i = (1/B) sum_{x: h(x) > t_i} c(x) x,    db_i = (1/B) sum_{x: h(x) > t_i} c(x),

with the same c(x) for every bin (the layer back writes one pattern for all bins). The
difference of two neighbouring bins keeps only the images with t_i < h(x) <= t_(i+1); when
exactly one image x lies there, x = (dW_i - dW_(i+1)) / (db_i - db_(i+1)), exactly, whatever
the rest of the model. Two images in one bin give a weighted mix of the two; with k bins a
batch of B images has no such collision with probability about exp(-B (B - 1) / (2 k)).

Against input noise this is the worst case: the imprint reads the very input the client's
forward pass saw, so it recovers the noised image itself.

Updates: a gradient, or a FedAvg delta, whose observed gradient is -delta / (lr K). For one
local step this is the gradient and the recovery is exact, provided the delta is not lost to
float32 rounding: w_after - w_before keeps about 7 digits of the bins' weights, so the block is
built with a small ``gain`` that makes the weights small against one step's change. For K > 1
steps that same first step moves the bins' weights far past their initial scale, so in later
steps the bins no longer measure one quantity and their differences mix images: measured on
PneumoniaMNIST, 3 steps on one batch of 4 recover 2 of the 4 above 40 dB, 16 images in 4
batches of 4 recover 2 to 3. The readout is meant for FedSGD and one-step FedAvg.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradguard.calibration.exact import neighbour_differences
from gradguard.eval.attacks.base import Attack, AttackConfig, Run, register_attack
from gradguard.eval.attacks.observation import Observation

# The pattern the layer back adds is small, so the victim still sees (mostly) the image.
_PATTERN_SCALE = 0.1


@dataclass(frozen=True, kw_only=True)
class ImprintConfig:
    """The imprint block a malicious server puts in front of the victim.

    bins: k, the number of bins (breaching's Robbing-the-Fed case uses 64). A batch of B images
        keeps all of them apart with probability about exp(-B (B - 1) / (2 k)): 0.89 for B = 8
        and k = 256; its cost is two k x (C H W) weight matrices.
    gain: scales the bins' weights and biases (the layer back is divided by it, so the block's
        output does not change). Small enough that one SGD step changes the weights by far
        more than float32 rounds away, so a delta of one step keeps the gradient exact;
        breaching's ImprintBlock uses the same default.
    seed: seeds the pattern that the layer back writes. It is random rather than constant
        because a model that normalises its input per image (BatchNorm at batch 1, for one)
        is blind to a constant offset, which would zero the gradient the attack reads.
    """

    bins: int = 256
    gain: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins}")
        if not self.gain > 0:
            raise ValueError(f"gain must be > 0, got {self.gain}")


def brightness(images: Tensor) -> Tensor:
    """The measure every bin reads: each image's mean pixel value, [N]."""
    return images.flatten(1).mean(dim=1)


def brightness_thresholds(public_images: Tensor, bins: int) -> Tensor:
    """k increasing thresholds: t_i at the i/k quantile of the public images' brightness for
    i >= 1, and t_0 one public range below the public minimum, so that every plausible input,
    noised ones included, fires the first bin."""
    if public_images.ndim != 4 or len(public_images) < 2:
        raise ValueError(f"public_images must be [N, C, H, W] with N >= 2, got {tuple(public_images.shape)}")
    measure = brightness(public_images.detach().double().cpu())
    low, high = measure.min(), measure.max()
    inner = torch.quantile(measure, torch.arange(1, bins, dtype=torch.float64) / bins)
    thresholds = torch.cat([(2 * low - high).reshape(1), inner])
    if not bool((thresholds.diff() > 0).all()):
        raise ValueError(f"the public images' brightness has too few distinct values for {bins} bins; "
                         "pass more public images or fewer bins")
    return thresholds.float()


class ImprintBlock(nn.Module):
    """x + back(ReLU(bins(flatten(x)))), reshaped to x; ``bins`` holds the measure and thresholds."""

    def __init__(self, image_shape: tuple[int, int, int], thresholds: Tensor, *, gain: float, seed: int):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if thresholds.ndim != 1 or len(thresholds) < 2 or not bool((thresholds.diff() > 0).all()):
            raise ValueError("thresholds must be a 1-D increasing tensor of at least 2 values")
        self.image_shape = tuple(image_shape)
        size, k = math.prod(image_shape), len(thresholds)
        self.bins = nn.Linear(size, k)
        self.back = nn.Linear(k, size)
        pattern = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * _PATTERN_SCALE
        with torch.no_grad():
            self.bins.weight.fill_(gain / size)  # every bin measures the mean brightness
            self.bins.bias.copy_(-gain * thresholds)
            self.back.weight.copy_(pattern[:, None].expand(size, k) / (k * gain))  # one pattern for every bin
            self.back.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.back(torch.relu(self.bins(x.flatten(1)))).view_as(x)


class ImprintedModel(nn.Module):
    """The malicious server's model: ``victim(imprint(x))``."""

    def __init__(self, imprint: ImprintBlock, victim: nn.Module):
        super().__init__()
        self.imprint = imprint
        self.victim = victim

    def forward(self, x: Tensor) -> Tensor:
        return self.victim(self.imprint(x))


def imprint_model(victim: nn.Module, *, public: Tensor, config: ImprintConfig | None = None) -> ImprintedModel:
    """The victim behind an imprint block whose thresholds come from ``public`` ([N, C, H, W],
    the server's own images of the clients' kind), on the victim's device."""
    config = config or ImprintConfig()
    thresholds = brightness_thresholds(public, config.bins)
    channels, height, width = public.shape[1:]  # [N, C, H, W], checked by brightness_thresholds
    block = ImprintBlock((channels, height, width), thresholds, gain=config.gain, seed=config.seed)
    device = next(victim.parameters()).device
    return ImprintedModel(block.to(device), victim)


def invert_imprint(weight_grad: Tensor, bias_grad: Tensor, *, count: int, min_hit: float = 1e-3) -> Tensor:
    """Inputs [n, D] recovered from a bin layer's gradient: rows ordered by increasing threshold.

    Bin i's image is (dW_i - dW_(i+1)) / (db_i - db_(i+1)), the last bin's dW / db itself. A bin
    counts as hit when its |db difference| exceeds ``min_hit`` times the largest one; of those
    the ``count`` largest are kept (n <= count), in order of brightness.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    dw, db = neighbour_differences(weight_grad, bias_grad)
    strength = db.abs()
    hits = torch.nonzero(strength > min_hit * strength.max()).flatten()
    kept = hits[strength[hits].argsort(descending=True)[:count]].sort().values
    return (dw[kept] / db[kept, None]).to(weight_grad.dtype)


def find_imprint(model: nn.Module) -> tuple[str, ImprintBlock]:
    """The model's imprint block and its module name."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, ImprintBlock)]
    if len(blocks) != 1:
        raise ValueError(f"{type(model).__name__} has {len(blocks)} imprint blocks; the imprint attack reads one: "
                         "attack a model built by gradguard.eval.attacks.imprint.imprint_model")
    return blocks[0]


@dataclass(kw_only=True)
class ImprintAttackConfig(AttackConfig):
    """The imprint readout. Defaults are the benchmark's full-size run (the attack is analytic,
    so there is no smaller one).

    iterations, lr, restarts: unused by the readout; kept at 0, 1.0 and 1.
    min_hit: a bin counts as holding an image when its bias-gradient difference exceeds this
        fraction of the largest one (empty bins differ only by rounding).
    """

    iterations: int = 0
    lr: float = 1.0
    min_hit: float = 1e-3


@register_attack
class ImprintAttack(Attack):
    """Reads the update's images out of the imprint block of the model it was computed on.

    Returns up to ``update.num_samples`` images (fewer when images share a bin; one black image
    when no bin is hit), in order of brightness; ``loss`` is the number of the update's images
    it found no bin of their own for. The labels are recovered from the victim's head as for
    every attack and are not paired with the images.
    """

    name = "imprint"
    config_class = ImprintAttackConfig
    config: ImprintAttackConfig

    def _restart(self, obs: Observation, labels: Tensor, generator: torch.Generator, *, desc: str) -> Run:
        prefix, block = find_imprint(obs.model)
        if block.image_shape != obs.image_shape:
            raise ValueError(f"the imprint block reads images of shape {block.image_shape}, "
                             f"the attack was given image_shape={obs.image_shape}")
        order = block.bins.bias.detach().argsort(descending=True)  # bias -t_i: increasing thresholds
        count = obs.update.num_samples
        inputs = invert_imprint(obs.target[f"{prefix}.bins.weight"][order], obs.target[f"{prefix}.bins.bias"][order],
                                count=count, min_hit=self.config.min_hit)
        found = len(inputs)
        if not found:  # the layer's gradient is zero (a defense removed it): one black image, nothing read
            inputs = torch.zeros(1, math.prod(obs.image_shape), device=obs.device)
        return Run(images=inputs.view(-1, *obs.image_shape), loss=float(count - found), history=[])
