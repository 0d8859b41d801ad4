"""One registry shape for the parts chosen by name (the way timm's ``register_model`` works).

A :class:`Registry` maps names to builders. ``@REGISTRY.register(name, summary, spec)`` adds
one; :meth:`Registry.create` builds it, passing only the arguments the builder names in its
signature (no builder takes arguments it ignores), and the builder checks its own arguments,
raising the registry's error kind (a :class:`~.errors.ConfigError` by default) for a bad value.
``spec`` holds the facts a kind states about each entry before building it (a backbone's input
size, an engine's tolerance). An unknown name is a clear error that lists the known ones.
Backbones, engines, losses and miners are all registries of this one shape. Torch-free itself:
registries fill when their module is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..core.errors import InvalidInputError
from .errors import ConfigError

__all__ = ["Entry", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    build: Callable[..., T]
    summary: str
    spec: Any = None
    """What the kind states about the entry without building it (or None)."""

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.build).parameters)


class Registry(Mapping[str, Entry[T]]):
    """Named builders of one kind (``kind`` names it in error messages)."""

    def __init__(self, kind: str, error: type[InvalidInputError] = ConfigError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, summary: str | None = None, spec: Any = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Add ``build`` under ``name``; ``summary`` defaults to its docstring's first line."""

        def decorator(build: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise self.error(f"{self.kind} {name!r} is registered twice")
            text = summary if summary is not None else (build.__doc__ or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, build, text, spec)
            return build

        return decorator

    def __getitem__(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def create(self, name: str, **arguments: Any) -> T:
        """Build ``name`` from the ``arguments`` its builder takes (others are not its own)."""
        entry = self[name]
        return entry.build(**{key: arguments[key] for key in entry.parameters if key in arguments})
