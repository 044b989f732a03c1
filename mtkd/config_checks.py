"""The value checks of the config sections (:mod:`mtkd.config`): each raises one
:class:`ConfigError` naming the key, what it got and what it expects, and lets a value of the wrong
type through (the type check at load names it).
"""
from __future__ import annotations

from typing import Any

from mtkd.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file, override or command-line value is invalid (CLI exit 2). The message
    names the key, what it got and what it expects."""


def choice(where: str, value: Any, valid: tuple[str, ...]) -> None:
    """Raise unless ``value`` is one of ``valid`` (the message says unknown value and lists them)."""
    if isinstance(value, str) and value not in valid:
        raise ConfigError(f"{where}: unknown value {value!r} (valid: {', '.join(valid)})")


def one_of(where: str, value: Any, valid: tuple[str, ...]) -> None:
    """Raise unless ``value`` is one of ``valid`` (the message lists them)."""
    if isinstance(value, str) and value not in valid:
        raise ConfigError(f"{where}: expected one of {', '.join(valid)}, got {value!r}")


def registered(where: str, name: Any, registry: Any) -> None:
    """Raise unless ``name`` is in ``registry``; the message is the registry's (close matches, valid names)."""
    from mtkd.registry import UnknownNameError

    if isinstance(name, str):
        try:
            registry.get(name)
        except UnknownNameError as error:
            raise ConfigError(f"{where}: {error}") from None


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(where: str, value: Any, low: float, strict: bool = False) -> None:
    """Raise unless ``value >= low`` (``> low`` when ``strict``); NaN fails too."""
    if is_number(value) and not (value > low if strict else value >= low):
        raise ConfigError(f"{where}: must be {'>' if strict else '>='} {_fmt(low)}, got {value!r}")


def optional_at_least(where: str, value: Any, low: float, strict: bool = False) -> None:
    """:func:`at_least` unless ``value`` is None."""
    if value is not None:
        at_least(where, value, low, strict)


def in_range(where: str, value: Any, low: float, high: float) -> None:
    """Raise unless ``low <= value < high``."""
    if is_number(value) and not low <= value < high:
        raise ConfigError(f"{where}: must be in [{_fmt(low)}, {_fmt(high)}), got {value!r}")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def amounts(where: str, resources: Any) -> None:
    """Custom Ray resources: each amount a number >= 0."""
    if isinstance(resources, dict):
        for name, amount in resources.items():
            at_least(f"{where}.{name}", amount, 0)


def check_device(value: Any, where: str = "device") -> None:
    """Raise :class:`ConfigError` unless ``value`` is auto, cpu, cuda or cuda:N."""
    if not isinstance(value, str):
        return  # the type check names it
    head, _, index = value.partition(":")
    if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
        raise ConfigError(f"{where}: unknown device {value!r} (valid: auto, cpu, cuda, cuda:N)")
