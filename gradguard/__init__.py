"""GradGuard: sample-specific noise against gradient inversion in federated learning."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers see the names; at run time they load on first use
    from gradguard.batchnorm import reestimate_batchnorm as reestimate_batchnorm
    from gradguard.config import PRESETS as PRESETS, DPConfig as DPConfig, GuardConfig as GuardConfig
    from gradguard.config import CalibrationConfig as CalibrationConfig, MaskConfig as MaskConfig
    from gradguard.config import NoiseConfig as NoiseConfig, ShadowConfig as ShadowConfig
    from gradguard.errors import ConfigError as ConfigError, GradGuardError as GradGuardError
    from gradguard.errors import GradGuardWarning as GradGuardWarning
    from gradguard.errors import UnsupportedModelError as UnsupportedModelError
    from gradguard.guard import GradGuard as GradGuard, MaskExplanation as MaskExplanation
    from gradguard.update import LeakageEstimate as LeakageEstimate, ProtectedUpdate as ProtectedUpdate

# Imported on first use: `gradguard serve` (gradguard.transport) runs without loading torch.
_EXPORTS: dict[str, str] = {
    "PRESETS": "gradguard.config", "DPConfig": "gradguard.config", "GuardConfig": "gradguard.config",
    "MaskConfig": "gradguard.config", "NoiseConfig": "gradguard.config", "ShadowConfig": "gradguard.config",
    "CalibrationConfig": "gradguard.config", "ConfigError": "gradguard.errors", "GradGuardError": "gradguard.errors",
    "GradGuardWarning": "gradguard.errors", "LeakageEstimate": "gradguard.update",
    "UnsupportedModelError": "gradguard.errors", "GradGuard": "gradguard.guard",
    "MaskExplanation": "gradguard.guard", "ProtectedUpdate": "gradguard.update",
    "reestimate_batchnorm": "gradguard.batchnorm",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
