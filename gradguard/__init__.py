"""GradGuard: sample-specific noise against gradient inversion in federated learning."""
from gradguard.config import PRESETS, DPConfig, GuardConfig, MaskConfig, NoiseConfig, ShadowConfig
from gradguard.errors import ConfigError, GradGuardError, UnsupportedModelError
from gradguard.guard import GradGuard, MaskExplanation
from gradguard.update import ProtectedUpdate

__all__ = [
           "PRESETS",
           "ConfigError",
           "DPConfig",
           "GradGuard",
           "GradGuardError",
           "GuardConfig",
           "MaskConfig",
           "MaskExplanation",
           "NoiseConfig",
           "ProtectedUpdate",
           "ShadowConfig",
           "UnsupportedModelError",
]
__version__ = "0.1.0"
