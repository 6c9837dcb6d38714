"""Errors the guard raises; each message names the module and the fix."""
from __future__ import annotations

from typing import TypeVar

from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class GradGuardError(RuntimeError):
    """Base class of GradGuard's own errors."""


class GradGuardWarning(UserWarning):
    """Something the user should know about a protected update, e.g. a leakage target it missed."""


class UnsupportedModelError(GradGuardError, ValueError):
    """The wrapped model has a layer or a shape the chosen mode cannot serve."""


def last_layer(model: nn.Module, kind: type[ModuleT], *, needed_for: str, fix: str) -> tuple[str, ModuleT]:
    """The last module of type ``kind`` in registration order, or an error saying why it is needed."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.{kind.__name__}, {needed_for}; fix: {fix}")
    return found[-1]


class ConfigError(GradGuardError, ValueError):
    """A GuardConfig field, or an argument of ``wrap``, has the wrong type or an invalid value."""
