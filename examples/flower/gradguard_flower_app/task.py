"""The example's task in plain PyTorch and numpy: a small CNN for PneumoniaMNIST (28 px chest
X-rays, normal vs pneumonia), each node's share of the data, and the local loops.

The model has no integer buffers (no BatchNorm step counter), so its weights survive SecAgg+'s
quantisation unchanged in kind.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATA_FILE = "pneumoniamnist.npz"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def initial_state(seed: int) -> dict[str, torch.Tensor]:
    """The round-0 global model, the same for a given seed wherever it is built."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net().state_dict()


def data_file(data_dir: str) -> Path:
    """The MedMNIST file: ``data-dir`` of the run config, else ``$GRADGUARD_SHARED/data``."""
    folder = Path(data_dir) if data_dir else Path(os.environ.get("GRADGUARD_SHARED", "../shared")) / "data"
    path = folder / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; download PneumoniaMNIST (medmnist.com, 28 px) there, "
                                "or set the run config's data-dir (or GRADGUARD_SHARED) to the folder holding it")
    return path


@lru_cache(maxsize=4)
def split(data_dir: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 28, 28] in [0, 1] and labels [N] of one split (loaded once per process)."""
    with np.load(data_file(data_dir)) as data:
        images = torch.from_numpy(data[f"{name}_images"]).float().div(255).unsqueeze(1)
        labels = torch.from_numpy(data[f"{name}_labels"].reshape(-1).astype(np.int64))
    return images, labels


def partition(data_dir: str, name: str, node: int, nodes: int, per_node: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Node ``node`` of ``nodes``: its ``per_node`` images of the split, disjoint from the others' (IID)."""
    images, labels = split(data_dir, name)
    if per_node * nodes > len(labels):
        raise ValueError(f"{nodes} nodes x {per_node} images exceed the {name} split's {len(labels)}; "
                         "lower the run config's client-images / eval-images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    chosen = order[node * per_node:(node + 1) * per_node]
    return images[chosen], labels[chosen]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
          epochs: int, batch_size: int, seed: int, on_batch=None) -> float:
    """``epochs`` of mini-batch training in a seeded order; returns the mean loss of the last epoch.
    ``on_batch(indices, labels)`` runs before each forward (GradGuard names the batch's samples)."""
    model.train()
    order = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        for batch in torch.randperm(len(labels), generator=order).split(batch_size):
            if on_batch is not None:
                on_batch(batch, labels[batch])
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on the given images."""
    model.eval()
    logits = model(images)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
