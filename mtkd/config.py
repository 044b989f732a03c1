"""Typed experiment configuration: dataclasses loaded from YAML with ``yaml.safe_load``.

Every section is a dataclass whose fields are documented where they are declared. Unknown
keys are rejected with the list of valid ones; values are checked against the field types;
``key.sub=value`` overrides (values parsed as YAML scalars) apply on top of a file.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid. The message names the key."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    """Dataset registry name (fashion_mnist, mnist, cifar10, cifar100, image_folder)."""
    root: str | None = None
    """Folder of the dataset files; None uses the dataset's default location."""
    train_subset: int | None = None
    """Train on a seeded random subset of this many samples (None: all)."""
    test_subset: int | None = None
    """Evaluate on a seeded random subset of this many samples (None: all)."""
    batch_size: int = 64
    """Samples per step (per learner worker)."""
    eval_batch_size: int = 500
    """Samples per evaluation batch."""
    augment: bool = True
    """Random crop with padding and horizontal flip on training batches."""
    crop_padding: int = 4
    """Zero padding of the random crop."""
    hflip: bool = True
    """Random horizontal flip (p = 0.5)."""


@dataclass
class OptimConfig:
    epochs: int = 240
    """Training epochs."""
    lr: float = 0.05
    """Initial learning rate of SGD."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay."""
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    """Epochs at which the learning rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    """Learning-rate decay factor."""


@dataclass
class TeacherSpec:
    name: str = ""
    """A short name for the teacher (logs, plots); defaults to the checkpoint's model name."""
    checkpoint: str | None = None
    """Path of a teacher checkpoint folder (written by ``mtkd train-teacher``)."""
    address: str | None = None
    """host:port of a teacher served by ``mtkd serve-teacher`` (Ray runtime only)."""
    replicas: int = 1
    """Ray runtime: actor replicas serving this teacher."""
    token_file: str | None = None
    """A file holding the bearer token of a served teacher (``address``)."""
    root_cert: str | None = None
    """PEM certificate (CA or self-signed) of a served teacher: connect with TLS."""


@dataclass
class DistillConfig:
    strategy: str = "mtkd_rl"
    """Teacher-weighting strategy: ce, aver, ebkd, camkd, mtkd_rl."""
    temperature: float = 4.0
    """KD temperature T."""
    beta: float = 5.0
    """Weight of the feature-distillation term."""
    warmup_epochs: int = 1
    """mtkd_rl: epochs during which all teacher weights are 1 and the agent does not act."""


@dataclass
class AgentConfig:
    rule: str = "reference"
    """Agent update rule: reference (authors' code, default) or reinforce (paper's policy gradient)."""
    mixing: str = "static"
    """static: w = (a + c + g) / 3; dynamic: learned softmax mixing coefficients."""
    agent_step: int = 1000
    """Update the agent after this many stored batches (and at every epoch end)."""
    lr: float = 0.1
    """Agent SGD learning rate (no momentum, no weight decay)."""
    concentration: float = 10.0
    """reinforce rule: per-teacher Dirichlet concentration."""


@dataclass
class RuntimeConfig:
    runtime: str = "ray"
    """ray (the distributed service, default) or inprocess (the reference engine)."""
    address: str | None = None
    """Ray cluster address; None starts a private local Ray."""
    num_learners: int = 1
    """Ray Train workers training the student together (gradients averaged)."""
    prefetch: int = 1
    """Batches whose teacher outputs are requested ahead of the one being trained (0: none)."""
    half_precision: bool = False
    """Move teacher outputs in float16 (faster, not bit-exact with the in-process engine)."""
    teacher_num_cpus: float = 0.5
    """Ray CPUs per teacher actor (fractional)."""
    teacher_num_gpus: float = 0.0
    """Ray GPUs per teacher actor (fractional allowed)."""
    learner_num_cpus: float = 1.0
    """Ray CPUs per learner worker."""
    threads: int | None = None
    """torch threads in the in-process engine (None: torch's default)."""


@dataclass
class ExperimentConfig:
    seed: int = 0
    """Seeds data order, augmentation and every initialisation."""
    output_dir: str = "runs/experiment"
    """Folder of the run: metrics, checkpoints, plots, resolved config."""
    student: str = "resnet8"
    """Student model registry name."""
    teachers: list[TeacherSpec] = field(default_factory=list)
    """The teacher pool."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass
class TeacherTrainConfig:
    seed: int = 0
    """Seeds data order, augmentation and initialisation."""
    model: str = "resnet20"
    """Model registry name."""
    output_dir: str = "runs/teacher"
    """Checkpoint folder to write."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2, lr=0.05, nesterov=False,
                                                                   weight_decay=5e-4, milestones=[]))
    threads: int | None = None
    """torch threads (None: torch's default)."""


# ----------------------------------------------------------------------------- building
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
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def to_dict(config: Any) -> dict:
    """The config as plain data (for JSON/YAML)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a raw config mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        node = data
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load ``cls`` from a YAML file (or defaults) with dotted overrides; validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False))
