"""A tiny name -> constructor registry behind every ``create_*`` factory (timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from metrank.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors; unknown names raise a ``ValueError`` listing the valid ones.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("triplet")
    ... class TripletMarginLoss: ...
    >>> LOSSES.create("triplet")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
