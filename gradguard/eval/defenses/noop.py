"""No defense: the plain FedAvg update, the reference every defense is measured against."""
from __future__ import annotations

from gradguard.eval.defenses.base import Defense, register_defense


@register_defense
class NoDefense(Defense):
    """Shares the clean update of plain local SGD."""

    name = "none"
