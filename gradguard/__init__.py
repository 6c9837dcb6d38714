"""GradGuard: sample-specific noise against gradient inversion in federated learning."""
from gradguard.config import PRESETS, GuardConfig
from gradguard.errors import GradGuardError, UnsupportedModelError
from gradguard.guard import GradGuard, MaskExplanation
from gradguard.update import ProtectedUpdate

__all__ = ["GradGuard", "GradGuardError", "GuardConfig", "MaskExplanation", "PRESETS", "ProtectedUpdate",
           "UnsupportedModelError"]
__version__ = "0.1.0"
