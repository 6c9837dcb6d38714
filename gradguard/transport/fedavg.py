"""Streaming FedAvg: a running weighted sum whose memory does not grow with the number of clients."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from gradguard.transport.codec import CODE_DTYPES, TensorPiece
from gradguard.transport.validation import ModelSpec


class WeightedSum:
    """sum_i w_i * delta_i for every averaged tensor of a model, and sum_i w_i.

    Updates are added one piece at a time, and the sums are the only model-sized memory: they
    are allocated once, in at least float32 (so half-precision models do not lose small deltas),
    turned into the next global model when a round closes, and zeroed for the next round.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._sums: dict[str, torch.Tensor] = {}
        for name in sorted(spec.averaged):
            code, shape = spec.layout[name]
            self._sums[name] = torch.zeros(shape, dtype=torch.promote_types(CODE_DTYPES[code], torch.float32))
        self.total_weight = 0

    def add(self, pieces: Iterable[TensorPiece], weight: int) -> None:
        with torch.no_grad():
            for piece in pieces:
                self._flat_slice(piece).add_(piece.values, alpha=weight)
        self.total_weight += weight

    def mean_added_to(self, base: Iterable[TensorPiece]) -> dict[str, torch.Tensor]:
        """FedAvg's step: the global model ``base`` (read piece by piece) plus sum / total_weight.

        Computed in the sums' own buffers, so it needs no memory beyond them; the tensors returned
        share those buffers and are valid until :meth:`reset`. Entries of ``base`` that are not
        averaged (integer buffers) are returned as they are.
        """
        if self.total_weight <= 0:
            raise ValueError("no update was added: a round cannot close without one")
        kept: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for piece in base:
                if piece.name in self._sums:
                    self._flat_slice(piece).div_(self.total_weight).add_(piece.values)
                else:
                    if piece.name not in kept:
                        kept[piece.name] = torch.empty(piece.shape, dtype=piece.values.dtype)
                    kept[piece.name].view(-1)[piece.start:piece.start + piece.values.numel()] = piece.values
        # Each sum was kept in at least float32; it is rounded once, to the model's dtype.
        averaged = {name: acc.to(CODE_DTYPES[self._spec.layout[name][0]]) for name, acc in self._sums.items()}
        return {**kept, **averaged}

    def reset(self) -> None:
        for acc in self._sums.values():
            acc.zero_()
        self.total_weight = 0

    def _flat_slice(self, piece: TensorPiece) -> torch.Tensor:
        return self._sums[piece.name].view(-1)[piece.start:piece.start + piece.values.numel()]
