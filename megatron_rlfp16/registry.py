"""Name -> entry tables for every pluggable piece (losses, corrections, rewards, tasks, ...).

Registering a name twice raises instead of replacing the first entry: a silent overwrite lets an
import-order accident change what is trained or rewarded. An unknown name lists the valid ones.
"""
from __future__ import annotations

from typing import Any, Callable


class Registry:
    """A table of named entries of one kind (e.g. "policy loss", "reward")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def add(self, name: str, entry: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {_describe(self._entries[name])}); "
                f"registered names: {self.names()}. Pick a new name instead of overwriting."
            )
        self._entries[name] = entry

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {self.names()}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def decorator(self, name: str) -> Callable[[Callable], Callable]:
        def register(fn: Callable) -> Callable:
            self.add(name, fn)
            return fn

        return register


def _describe(entry: Any) -> str:
    """Where an entry was defined; wrappers that hold a function as ``.fn`` name the function."""
    fn = getattr(entry, "fn", entry)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
