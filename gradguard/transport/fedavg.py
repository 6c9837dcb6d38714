"""Streaming FedAvg: a running weighted sum whose memory does not grow with the number of clients."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class WeightedSum:
    """sum_i w_i * delta_i per tensor, and sum_i w_i, updated one update (and one tensor) at a time.

    Sums are kept in at least float32, so half-precision models do not lose the small deltas.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0

    def add(self, tensors: Iterable[tuple[str, torch.Tensor]], weight: int) -> None:
        for name, tensor in tensors:
            acc = self._sums.get(name)
            if acc is None:
                dtype = torch.promote_types(tensor.dtype, torch.float32)
                self._sums[name] = tensor.to(dtype) * weight
            else:
                acc.add_(tensor, alpha=weight)
        self.total_weight += weight

    def mean_added_to(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FedAvg's step: ``base + sum / total_weight`` for every summed tensor, and the other
        entries of ``base`` as they are. ``base`` is not modified; the sums' buffers become the
        result (so this needs no memory beyond them) and this object is spent."""
        if self.total_weight <= 0:
            raise ValueError("no update was added: a round cannot close without one")
        result = dict(base)
        with torch.no_grad():
            for name, acc in self._sums.items():
                # In the sum's precision, then rounded once to the model's dtype.
                result[name] = acc.div_(self.total_weight).add_(base[name]).to(base[name].dtype)
        self._sums = {}
        self.total_weight = 0
        return result
