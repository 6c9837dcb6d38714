"""Client partitions of a data split: the paper's 9-client layout, scaled, IID or Dirichlet non-IID."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

Distribution = Literal["iid", "dirichlet"]


@dataclass(frozen=True)
class ClientLayout:
    """Per-client batch sizes and local dataset sizes (images), in client order."""

    batch_sizes: tuple[int, ...]
    dataset_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.dataset_sizes) or not self.batch_sizes:
            raise ValueError("a layout needs one batch size per client and at least one client")
        if min(self.batch_sizes) < 1 or min(self.dataset_sizes) < 1:
            raise ValueError("batch sizes and dataset sizes must be >= 1")


# Hatamizadeh et al. (IEEE TMI 2023), reused by the seed paper: clients 1-4 train with batch 4
# on 8 / 32 / 128 / 512 images, clients 5-8 with batch 8 on the same sizes, client 9 holds a
# single image (the hardest case for a defense).
PAPER_LAYOUT = ClientLayout(batch_sizes=(4, 4, 4, 4, 8, 8, 8, 8, 1),
                            dataset_sizes=(8, 32, 128, 512, 8, 32, 128, 512, 1))


@dataclass(frozen=True)
class ClientSpec:
    """One client: its id, the indices of its images in the split, and its local batch size."""

    client_id: str
    indices: tuple[int, ...]
    batch_size: int

    def __len__(self) -> int:
        return len(self.indices)


def scaled_sizes(layout: ClientLayout, scale: float) -> list[int]:
    """Dataset sizes times ``scale``, rounded, at least one image; a single-image client stays single."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return [1 if size == 1 else max(1, round(size * scale)) for size in layout.dataset_sizes]


def partition_clients(labels: Sequence[int] | np.ndarray | torch.Tensor, *, scale: float = 1.0,
                      distribution: Distribution = "iid", alpha: float = 0.5, seed: int = 0,
                      layout: ClientLayout = PAPER_LAYOUT) -> list[ClientSpec]:
    """Split a data split among the clients of ``layout``, without overlap.

    ``labels`` are the split's integer labels. ``scale`` multiplies every dataset size (see
    :func:`scaled_sizes`); a batch size never exceeds its client's dataset. With
    ``distribution="iid"`` images are drawn uniformly at random; with ``"dirichlet"`` each
    client draws its class proportions from Dirichlet(``alpha``) (smaller ``alpha``, more
    skew) and takes its images class by class, topping up from other classes when one runs
    out. The same ``seed`` gives the same partition.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    sizes = scaled_sizes(layout, scale)
    if sum(sizes) > len(labels):
        raise ValueError(f"the layout at scale {scale} needs {sum(sizes)} images but the split has "
                         f"{len(labels)}; lower scale to at most {len(labels) / sum(layout.dataset_sizes):.3f}")
    if distribution not in ("iid", "dirichlet"):
        raise ValueError(f"distribution must be 'iid' or 'dirichlet', got {distribution!r}")
    if distribution == "dirichlet" and alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if distribution == "iid":
        order = rng.permutation(len(labels))
        bounds = np.cumsum([0, *sizes])
        parts = [order[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    else:
        parts = _dirichlet_parts(labels, sizes, alpha, rng)
    return [ClientSpec(client_id=f"client{i + 1}", indices=tuple(int(j) for j in part),
                       batch_size=min(batch, size))
            for i, (part, batch, size) in enumerate(zip(parts, layout.batch_sizes, sizes))]


def _dirichlet_parts(labels: np.ndarray, sizes: list[int], alpha: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    num_classes = int(labels.max()) + 1
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
    parts = []
    for size in sizes:
        proportions = rng.dirichlet(np.full(num_classes, alpha))
        taken: list[int] = []
        while len(taken) < size:
            available = np.array([len(pool) > 0 for pool in pools])
            weights = proportions * available
            # A tiny alpha can give the classes still available zero weight: spread uniformly.
            weights = weights / weights.sum() if weights.sum() > 0 else available / available.sum()
            counts = rng.multinomial(size - len(taken), weights)
            for c, count in enumerate(counts):
                take = min(int(count), len(pools[c]))
                taken.extend(pools[c][:take])
                del pools[c][:take]
        parts.append(rng.permutation(np.array(taken, dtype=np.int64)))
    return parts
