"""GradGuard: sample-specific noise against gradient inversion in federated learning."""
from gradguard.config import PRESETS, GuardConfig
from gradguard.update import ProtectedUpdate

__all__ = ["GuardConfig", "PRESETS", "ProtectedUpdate"]
__version__ = "0.1.0"
