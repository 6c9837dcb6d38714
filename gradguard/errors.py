"""Errors the guard raises; each message names the module and the fix."""


class GradGuardError(RuntimeError):
    """Base class of GradGuard's own errors."""


class UnsupportedModelError(GradGuardError, ValueError):
    """The wrapped model has a layer or a shape the chosen mode cannot serve."""
