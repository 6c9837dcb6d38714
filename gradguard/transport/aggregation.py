"""How a round's updates become one step of the global model: pure numpy functions, float64.

Each rule combines the same coordinates of every client's delta, given as the rows of a
``(clients, coordinates)`` float64 array, so the aggregator can apply it block by block with
memory that does not grow with the model. Working in float64 with normalised weights, no
intermediate overflows where the true result is finite: every result lies between the smallest
and the largest delta of its coordinate.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Rule = Literal["fedavg", "median", "trimmed_mean"]
RULES: tuple[str, ...] = ("fedavg", "median", "trimmed_mean")


def weighted_mean(deltas: np.ndarray, weights: Sequence[int] | np.ndarray) -> np.ndarray:
    """FedAvg: ``sum_i w_i d_i / sum_i w_i`` over the rows of ``deltas``.

    The weights are normalised before they multiply anything, so neither a huge weight nor a
    huge delta overflows on the way (``w_i * d_i`` in the update's own dtype would).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(deltas) or not len(w) or (w <= 0).any():
        raise ValueError("weighted_mean needs one positive weight per row of deltas")
    return (w / w.sum()) @ np.asarray(deltas, dtype=np.float64)


def coordinate_median(deltas: np.ndarray) -> np.ndarray:
    """The median of each coordinate over the rows (one vote per client, weights ignored)."""
    return np.median(np.asarray(deltas, dtype=np.float64), axis=0)


def trimmed_mean(deltas: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per coordinate, the mean of the rows left after dropping the ``floor(trim_fraction * n)``
    smallest and as many largest values (at least one value is kept)."""
    values = np.sort(np.asarray(deltas, dtype=np.float64), axis=0)
    n = len(values)
    cut = min(int(trim_fraction * n), (n - 1) // 2)
    return values[cut:n - cut].mean(axis=0)


def clip_scale(norm: float, max_norm: float | None) -> float:
    """The factor that brings an update of L2 norm ``norm`` within ``max_norm`` (1 within it)."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / norm


def aggregate(deltas: np.ndarray, weights: Sequence[int] | np.ndarray, *, rule: Rule,
              trim_fraction: float = 0.1) -> np.ndarray:
    """One block of the round's step under ``rule`` (see :class:`AggregatorConfig`)."""
    if rule == "fedavg":
        return weighted_mean(deltas, weights)
    if rule == "median":
        return coordinate_median(deltas)
    if rule == "trimmed_mean":
        return trimmed_mean(deltas, trim_fraction)
    raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {RULES}")


def l2_norm_squared_scaled(values: np.ndarray) -> tuple[float, float]:
    """``(scale, ssq)`` with ``norm = scale * sqrt(ssq)``, so that float64 values up to its
    maximum do not overflow when squared (the scaled sum of squares of LAPACK's nrm2)."""
    scale = float(np.max(np.abs(values))) if len(values) else 0.0
    if scale == 0.0:
        return 0.0, 0.0
    return scale, float(np.dot(values / scale, values / scale))


def combine_norms(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Merge two ``(scale, ssq)`` partial norms."""
    (sa, qa), (sb, qb) = a, b
    if sa < sb:
        (sa, qa), (sb, qb) = (sb, qb), (sa, qa)
    if sa == 0.0:
        return 0.0, 0.0
    return sa, qa + qb * (sb / sa) ** 2
