"""BatchNorm statistics for a global model that no client shared clean statistics for.

With ``bn_statistics="local"`` a round whose inputs were noised shares no running statistic, and
under ``threat="malicious_server"`` every round is noised: the global model then keeps its first
statistics and, normalising with them, predicts one class (RESULTS.md measures it). A server that
holds public images of the modality re-estimates the statistics from them, with no client's clean
statistic involved; the weights are the federation's as they are.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def tracked_batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def reestimate_batchnorm(model: nn.Module, images: Tensor | Iterable[Tensor | tuple[Tensor, ...]], *,
                         device: torch.device | str | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm running statistics are those of ``images``
    (the server's public images, not any client's); ``model`` itself is left as it is.

    ``images`` is one tensor [N, ...], whose statistics the copy gets exactly (the mean and
    unbiased variance of each layer's input over all N), or an iterable of batches (tensors, or
    tuples whose first item is the input, as a DataLoader yields), whose statistics are averaged
    batch by batch (:func:`torch.optim.swa_utils.update_bn`). ``device`` defaults to the model's.
    """
    if not tracked_batchnorms(model):
        raise ValueError("the model has no BatchNorm layer that keeps running statistics: nothing to re-estimate")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    copied = copy.deepcopy(model).to(device)
    batches = [images] if isinstance(images, Tensor) else images
    torch.optim.swa_utils.update_bn(batches, copied, device=torch.device(device))  # runs without grad
    return copied.eval()
