"""Loading configs: a YAML file (``yaml.safe_load``) and ``key.sub=value`` overrides into a typed
dataclass of :mod:`mtkd.config` (unknown keys and wrong types refused), and back to plain data and
YAML. Each section checks its own values when it is built (its ``__post_init__``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mtkd.config_checks import ConfigError


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key {_join(where, unknown[0])!r} (valid keys: {', '.join(names)})")
    return cls(**{k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()})


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, f"{where} key"): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        return _as_float(value, where)
    if hint in (int, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _as_float(value: Any, where: str) -> float:
    # YAML 1.1 reads "1e-4" (no dot) as a string: accept any string that is a number.
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def to_dict(config: Any) -> dict:
    """The config as plain data (for JSON/YAML)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a raw config mapping (values parsed as YAML).

    A numeric key indexes a list: ``teachers.0.replicas=2``; ``teachers=[{checkpoint: a}]`` replaces
    the whole list.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: depth + 1]), dotted)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(error)})") from error
        _assign(node, keys[-1], value, dotted)
    return data


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The parsed content of the YAML file ``path`` (``yaml.safe_load``); a missing file or invalid
    YAML is a :class:`ConfigError` naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from error


def _yaml_problem(error: yaml.YAMLError) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _child(node: Any, key: str, path: str, dotted: str) -> Any:
    """The section or list item ``key`` of ``node`` (a missing section is created)."""
    if isinstance(node, list):
        return node[_list_index(node, key, path, dotted)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {dotted!r}: {path.rsplit('.', 1)[0]!r} is not a section")
    child = node.setdefault(key, {})
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override {dotted!r}: {path!r} is not a section")
    return child


def _assign(node: Any, key: str, value: Any, dotted: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, key, dotted, dotted)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ConfigError(f"override {dotted!r}: {dotted.rsplit('.', 1)[0]!r} is not a section")


def _list_index(items: list, key: str, path: str, dotted: str) -> int:
    if not key.isdigit():
        raise ConfigError(f"override {dotted!r}: {path.rsplit('.', 1)[0]!r} is a list; index it with a number, "
                          f"got {key!r}")
    index = int(key)
    if index >= len(items):
        raise ConfigError(f"override {dotted!r}: index {index} is out of range (the list has {len(items)} "
                          f"item{'s' if len(items) != 1 else ''})")
    return index


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load ``cls`` from a YAML file (or defaults) with dotted overrides; every value is checked.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, or a value is bad.
    """
    data: dict = {}
    if path is not None:
        data = read_yaml(path) or {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False))
