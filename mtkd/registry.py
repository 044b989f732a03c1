"""A small generic registry: one instance per kind of component (model, dataset, strategy...).

Names are unique: registering a taken name raises. Looking up an unknown name raises a
``KeyError`` subclass whose message lists the close matches and the valid names.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from mtkd.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError, ValueError):
    """An unknown name was asked of a registry. The message lists valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one kind.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register
        ... def resnet8(num_classes=10, in_channels=3): ...
        >>> MODELS.get("resnet8")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, obj: T | None = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: its ``__name__``). Usable as a decorator,
        bare or as ``@registry.register(name="...")``."""

        def add(item: T) -> T:
            key = name or getattr(item, "__name__")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; raises ``UnknownNameError`` listing close matches."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self._entries, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (valid: {', '.join(sorted(self._entries))})"

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the fnmatch ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def build(self, name: str, *args, **kwargs):
        """Call the factory registered as ``name`` with the given arguments."""
        factory: Callable = self.get(name)  # type: ignore[assignment]
        return factory(*args, **kwargs)
