"""The example's task: a small CNN with BatchNorm on PneumoniaMNIST (32 px), one data partition
per SuperNode, and the local training round every client runs.

Everything here is plain PyTorch plus GradGuard's evaluation helpers; the Flower apps and the
equality test (``tests/integrations/test_flower.py``, which runs the same clients over GradGuard's
own gRPC aggregator) call these functions, so both train exactly the same way.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import Context
from torch import nn

from gradguard import GradGuard
from gradguard.eval.datasets import ImageSet, load_medmnist
from gradguard.eval.defenses import local_sgd
from gradguard.eval.models import SmallCNN
from gradguard.eval.partition import ClientLayout, partition_clients

DATASET = "pneumoniamnist"
IMAGE_SIZE = 32


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(context: Context | None = None) -> nn.Module:
    """The architecture (its weights are replaced by the global model's)."""
    return SmallCNN(in_channels=1, num_classes=2, norm="batch").to(device())


def initial_state(seed: int) -> dict[str, torch.Tensor]:
    """The round-0 global model, the same for a given seed wherever it is built."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: value.cpu() for name, value in build_model().state_dict().items()}


def build_optimizer(model: nn.Module, context: Context) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=float(context.run_config["lr"]))


@lru_cache(maxsize=2)
def split_data(split: str) -> ImageSet:
    """A split of the dataset at the example's resolution (loaded once per process)."""
    return load_medmnist(DATASET, split, size=IMAGE_SIZE)


def client_indices(context: Context) -> tuple[int, ...]:
    """This node's images in the train split. Client i of n holds (i + 1) * ``client-images``
    images (drawn without overlap, IID), so FedAvg's sample weighting matters."""
    partition, count = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    run = context.run_config
    layout = ClientLayout(batch_sizes=(int(run["batch-size"]),) * count,
                          dataset_sizes=tuple(int(run["client-images"]) * (i + 1) for i in range(count)))
    clients = partition_clients(split_data("train").labels, layout=layout, seed=int(run["seed"]))
    return clients[partition].indices


def train(model: nn.Module, optimizer: torch.optim.Optimizer, guard: GradGuard, context: Context) -> None:
    """``local-epochs`` epochs of mini-batch SGD over the node's images, in a seeded order.

    The loop is the ordinary one; the only GradGuard call names each batch's samples (their
    indices in the split) and classes, so masks follow the sample and relevance maps explain the
    true class.
    """
    run = context.run_config
    data, indices = split_data("train"), torch.tensor(client_indices(context))
    order = torch.Generator().manual_seed(
        int(run["seed"]) * 1_000_003 + int(context.node_config["partition-id"]) * 1_009 + guard.round)
    batches, names = [], []
    for _ in range(int(run["local-epochs"])):
        for chunk in indices[torch.randperm(len(indices), generator=order)].split(int(run["batch-size"])):
            batches.append((data.images[chunk], data.labels[chunk]))
            names.append([str(i) for i in chunk.tolist()])

    def name_samples(step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        guard.set_sample_ids(names[step], labels=labels)

    model.train()
    local_sgd(model, batches, lr=float(run["lr"]), optimizer=optimizer, before_forward=name_samples)
