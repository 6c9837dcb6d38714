"""GradGuard: sample-specific noise against gradient inversion in federated learning."""
from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: `gradguard serve` (gradguard.transport) runs without loading torch.
_EXPORTS: dict[str, str] = {
    "GradGuard": "gradguard.guard", "GradGuardError": "gradguard.errors", "GuardConfig": "gradguard.config",
    "MaskExplanation": "gradguard.guard", "PRESETS": "gradguard.config", "ProtectedUpdate": "gradguard.update",
    "UnsupportedModelError": "gradguard.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
