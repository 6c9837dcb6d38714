"""One small registry type for every extension point (shadows, relevance methods, attacks, defenses)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A name -> item mapping whose errors say what kind of thing is missing and what exists."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def add(self, name: str, item: T) -> T:
        if name in self:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated item under ``name``."""
        return lambda item: self.add(name, item)

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}") from None
