"""Layers whose gradient hands over their input exactly: the analytic check behind every estimate.

For a Linear layer with a bias, each row's gradient over a batch is ``dW_i = sum_n d_(n,i) x_n``
and ``db_i = sum_n d_(n,i)``, so wherever one sample alone drives a row, ``dW_i / db_i`` *is* that
sample's input to the layer. A model that feeds the flattened image to such a layer (the imprint
module of Fowl et al., "Robbing the Fed", ICLR 2022, built to make this happen for every image of
a batch, or a plain MLP at batch 1) therefore leaks the image itself, whatever an
optimisation-based attack achieves. The imprint's bins are cumulative (bin i fires for every image
brighter than its threshold), so its images sit in the differences of neighbouring rows taken in
the order of their biases; the check reads both the rows and those differences.

This finds the construction it knows, not every one a malicious server could design: against
such a server, ``threat="malicious_server"`` assumes exact recovery from the start.
"""
from __future__ import annotations

import torch


def neighbour_differences(weight_grad: torch.Tensor, bias_grad: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's gradient minus the next row's, the last row's against zero (float64):
    ``(dW_i - dW_(i+1), db_i - db_(i+1))`` for ``weight_grad`` [k, D] and ``bias_grad`` [k]."""
    if weight_grad.ndim != 2 or bias_grad.shape != weight_grad.shape[:1]:
        raise ValueError(f"weight_grad [k, D] and bias_grad [k] expected, got {tuple(weight_grad.shape)} "
                         f"and {tuple(bias_grad.shape)}")
    w, b = weight_grad.detach().double(), bias_grad.detach().double()
    return (w - torch.cat([w[1:], torch.zeros_like(w[:1])]), b - torch.cat([b[1:], torch.zeros_like(b[:1])]))


def linear_row_inputs(weight_grad: torch.Tensor, bias_grad: torch.Tensor, *, min_hit: float = 1e-3) -> torch.Tensor:
    """The inputs [n, D] that a Linear layer's gradient (``weight_grad`` [k, D], ``bias_grad`` [k],
    rows in the order to difference) reveals: each neighbouring difference
    ``(dW_i - dW_(i+1)) / (db_i - db_(i+1))`` (the last row against zero) and each row's
    ``dW_i / db_i``, wherever the denominator exceeds ``min_hit`` times the largest one (elsewhere
    only rounding is left)."""
    w, b = weight_grad.detach().double(), bias_grad.detach().double()
    dw, db = neighbour_differences(w, b)
    dw, db = torch.cat([dw, w]), torch.cat([db, b])
    strength = db.abs()
    if not bool(strength.max() > 0):
        return w.new_zeros((0, w.shape[1]))
    hits = strength > min_hit * strength.max()
    return dw[hits] / db[hits, None]
