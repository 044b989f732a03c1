"""The tune file of ``mtkd tune``: its settings, its search space and its checks (no Ray here).

A tune file (YAML) has three parts::

    experiment: {...}            # an ExperimentConfig mapping, or a path to one (relative to the tune file)
    search_space:                # dotted experiment keys -> one sampler each
      distill.temperature: {uniform: [2.0, 6.0]}
      agent.mixing: {grid: [static, dynamic]}
    tune: {num_samples: 4, ...}  # TuneSettings below

:func:`load_tune` reads and checks one (every sampled value must give a valid experiment, and no
key that the trials share may be searched); :func:`load_saved_search` reads back the resolved
search that a search saved (``search.yaml``), for ``--resume``; :func:`trial_config` is the
experiment of one trial.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtkd.config import ConfigError, ExperimentConfig, apply_overrides, from_dict, read_yaml, to_dict

SEARCH_FILE = "search.yaml"  # the resolved search, read back by --resume
RESULTS_FILE = "results.jsonl"
BEST_CONFIG_FILE = "best_config.yaml"
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
# Metrics every trial reports after every epoch (whatever the strategy).
METRICS = ("test/acc", "test/loss", "train/acc", "loss/total", "loss/ce", "loss/kd", "loss/feature")

# Keys a search may not vary, with why. A key is refused when it is one of these or lies below one.
_SHARED_POOL = ("trials share one teacher pool, started once for the whole search; set it under experiment: "
                "instead")
_SHARED_IMAGES = ("it changes the images the shared teachers see (and the cache keys); set it under experiment: "
                  "instead")
_PER_SEARCH = "it is the same for every trial of a search; set it under experiment: instead"
FIXED_KEYS: dict[str, str] = {
    "teachers": _SHARED_POOL,
    "runtime.teacher_precision": _SHARED_POOL,
    "runtime.probe_cache": _SHARED_POOL,
    "runtime.probe_max_logit_kl": _SHARED_POOL,
    "runtime.probe_max_feature_error": _SHARED_POOL,
    "runtime.compile_teachers": _SHARED_POOL,
    "runtime.teacher_num_cpus": _SHARED_POOL,
    "runtime.teacher_num_gpus": _SHARED_POOL,
    "cache": "trials share one cache of teacher outputs; set it under experiment: instead",
    "data.name": _SHARED_IMAGES,
    "data.root": _SHARED_IMAGES,
    "data.train_subset": _SHARED_IMAGES,
    "data.augment": _SHARED_IMAGES,
    "data.crop_padding": _SHARED_IMAGES,
    "data.hflip": _SHARED_IMAGES,
    "data.augment_bank": _SHARED_IMAGES,
    "output_dir": "trials write no run folder (the search folder is tune.output_dir)",
    "runtime.runtime": _PER_SEARCH,
    "runtime.address": _PER_SEARCH,
    "runtime.device": _PER_SEARCH,
    "runtime.num_learners": "a trial trains in one process",
    "runtime.learner_num_cpus": _PER_SEARCH,
    "runtime.learner_resources": _PER_SEARCH,
    "runtime.sync_batchnorm": "a trial trains in one process",
    "runtime.storage_path": _PER_SEARCH,
    "runtime.max_failures": _PER_SEARCH,
    "tracking": _PER_SEARCH,
}



@dataclass
class TuneSettings:
    """The ``tune:`` part of a tune file."""

    name: str = "search"
    """Name of the search: Ray Tune's experiment folder inside ``output_dir``."""
    output_dir: str = "runs/tune"
    """The search's folder: Tune's storage (one folder per trial, with its checkpoints), the resolved
    search (search.yaml), results.jsonl and best_config.yaml."""
    num_samples: int = 4
    """Trials drawn from the search space. With ``grid`` samplers, every grid point is tried this
    many times (num_samples x grid points trials)."""
    metric: str = "test/acc"
    """The metric ASHA compares and the best trial is chosen by, at each trial's last epoch:
    test/acc, test/loss, train/acc, loss/total, loss/ce, loss/kd or loss/feature."""
    mode: str = "max"
    """max or min: whether a larger ``metric`` is better."""
    grace_period: int = 1
    """ASHA: epochs every trial trains before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: at each rung (grace_period x reduction_factor^k epochs) only the best 1/reduction_factor
    of the trials that reached it continue (> 1)."""
    max_concurrent_trials: int | None = None
    """Trials that train at the same time (None: as many as the cluster's CPUs hold). A private Ray
    started for the search advertises the machine's cores, or more if the teacher replicas plus this
    many trials (one when None) need more."""
    seed: int | None = 0
    """Seeds the sampling of the search space, so that a search draws the same trials every time
    (None: different draws each time)."""

    def __post_init__(self) -> None:
        if isinstance(self.name, str) and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ConfigError(f"tune.name: expected a folder name (no '/'), got {self.name!r}")
        if isinstance(self.output_dir, str) and not self.output_dir:
            raise ConfigError("tune.output_dir: expected a folder, got ''")
        if isinstance(self.num_samples, int) and self.num_samples < 1:
            raise ConfigError(f"tune.num_samples: expected an int >= 1, got {self.num_samples}")
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise ConfigError(f"tune.metric: unknown metric {self.metric!r} (valid: {', '.join(METRICS)})")
        if isinstance(self.mode, str) and self.mode not in ("max", "min"):
            raise ConfigError(f"tune.mode: expected max or min, got {self.mode!r}")
        if isinstance(self.grace_period, int) and self.grace_period < 1:
            raise ConfigError(f"tune.grace_period: expected an int >= 1, got {self.grace_period}")
        if isinstance(self.reduction_factor, float) and not self.reduction_factor > 1:
            raise ConfigError(f"tune.reduction_factor: expected a number > 1, got {self.reduction_factor:g}")
        if isinstance(self.max_concurrent_trials, int) and self.max_concurrent_trials < 1:
            raise ConfigError(f"tune.max_concurrent_trials: expected an int >= 1 or null, got "
                              f"{self.max_concurrent_trials}")


@dataclass(frozen=True)
class Sampler:
    """One key's search: ``choice``/``grid`` over ``values``, or ``uniform``/``loguniform``/``randint``
    over ``values = (lo, hi)`` (both ends included for ``randint``). The driver turns it into a Ray
    Tune domain (:func:`services.tune.driver.tune_domain`)."""

    kind: str
    values: tuple

    def candidates(self) -> list:
        """Values that stand for the whole range when checking it: every value, or both ends."""
        return list(self.values)

    def as_yaml(self) -> dict:
        return {self.kind: list(self.values)}


@dataclass
class TuneSpec:
    """A loaded tune file: the base experiment (as data and as a config), the search space (dotted
    key -> :class:`Sampler`) and the settings."""

    experiment: dict
    base: ExperimentConfig
    search: dict[str, Sampler]
    settings: TuneSettings

    @property
    def search_dir(self) -> Path:
        return Path(self.settings.output_dir)

    @property
    def max_epochs(self) -> int:
        """The most epochs any trial can train (ASHA's ``max_t``)."""
        epochs = self.search.get("optim.epochs")
        return max(epochs.candidates()) if epochs is not None else self.base.optim.epochs

    def as_yaml(self) -> dict:
        return {"experiment": self.experiment, "search_space": {k: s.as_yaml() for k, s in self.search.items()},
                "tune": to_dict(self.settings)}


# ------------------------------------------------------------------------------- loading
def load_tune(path: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    """Load and check a tune file; ``overrides`` (``tune.num_samples=8``, ``experiment.optim.epochs=4``,
    ``search_space.distill.beta={uniform: [1, 10]}``) apply to its mapping.

    Raises:
        ConfigError: anything wrong, in one line naming the key.
    """
    path = Path(path)
    data = read_yaml(path, "tune file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"tune file {str(path)!r}: expected a mapping with experiment, search_space and tune, "
                          f"got {type(data).__name__}")
    if isinstance(data.get("experiment"), str):  # a path relative to the tune file
        experiment_path = (path.parent / data["experiment"]).resolve()
        data["experiment"] = read_yaml(experiment_path, f"experiment file (given as {data['experiment']!r}, "
                                                        f"relative to the tune file)") or {}
    return parse_tune(apply_overrides(data, list(overrides or [])))


def parse_tune(data: dict) -> TuneSpec:
    """A :class:`TuneSpec` from the mapping of a tune file (experiment given as a mapping), checked:
    every search key names an experiment field that a search may vary, and every sampled value (each
    choice, both ends of a range) gives a valid experiment."""
    known = ("experiment", "search_space", "tune")
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the tune file (valid keys: {', '.join(known)})")
    experiment = data.get("experiment")
    if not isinstance(experiment, dict):
        raise ConfigError(f"experiment: expected an experiment mapping or a path to one, got {experiment!r}")
    settings = from_dict(TuneSettings, data.get("tune") or {}, "tune")
    base = from_dict(ExperimentConfig, experiment, "experiment")
    _check_experiment(base, "experiment")
    if not base.teachers:
        raise ConfigError("experiment.teachers is empty; a search shares one teacher pool: list at least one teacher")
    if base.runtime.num_learners != 1:
        raise ConfigError(f"experiment.runtime.num_learners: a trial trains in one process; expected 1, got "
                          f"{base.runtime.num_learners}")
    resolved = absolute_paths(to_dict(base))
    space = data.get("search_space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search_space: expected a mapping of experiment keys to samplers, e.g. "
                          f"{{distill.temperature: {{uniform: [2, 6]}}}}, got {space!r}")
    search = {key: _parse_sampler(key, value) for key, value in _flatten_space(space).items()}
    for key, sampler in search.items():
        for value in sampler.candidates():
            _check_experiment(trial_config(resolved, {key: value}, f"search_space.{key}={value!r}"),
                              f"search_space.{key}={value!r}")
    spec = TuneSpec(resolved, from_dict(ExperimentConfig, resolved), search, settings)
    if settings.grace_period > spec.max_epochs:
        raise ConfigError(f"tune.grace_period={settings.grace_period} exceeds the most epochs a trial trains "
                          f"({spec.max_epochs}); lower it or raise experiment.optim.epochs")
    return spec


def absolute_paths(experiment: dict) -> dict:
    """The experiment mapping with its file paths (teacher checkpoints, token files, certificates,
    data.root) made absolute against the current folder, as ``mtkd distill`` reads them: trials run
    in folders of their own."""
    experiment = copy.deepcopy(experiment)
    for teacher in experiment.get("teachers") or []:
        for key in ("checkpoint", "token_file", "root_cert"):
            if teacher.get(key):
                teacher[key] = str(Path(teacher[key]).expanduser().resolve())
    data = experiment.get("data") or {}
    if data.get("root"):
        data["root"] = str(Path(data["root"]).expanduser().resolve())
    return experiment


def _flatten_space(node: dict, prefix: str = "") -> dict:
    """``{distill: {temperature: S}}`` and ``{distill.temperature: S}`` -> ``{"distill.temperature": S}``."""
    out: dict = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        is_sampler = isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SAMPLERS
        if isinstance(value, dict) and not is_sampler and _is_section(dotted):
            out.update(_flatten_space(value, dotted))
        else:
            out[dotted] = value
    return out


def _unwrap(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0]
    return hint


def _is_section(dotted: str) -> bool:
    try:
        return dataclasses.is_dataclass(_field_hint(dotted))
    except ConfigError:
        return False


def _field_hint(dotted: str) -> Any:
    """The type of the ExperimentConfig field ``dotted`` (a section's dataclass, or a value type)."""
    node: Any = ExperimentConfig
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"search_space: {dotted!r}: {where!r} is not a section")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            section = f" of {where}" if where else ""
            raise ConfigError(f"search_space: unknown key {dotted!r} (valid keys{section}: {', '.join(names)})")
        node = _unwrap(typing.get_type_hints(node)[part])
    return node


def _parse_sampler(key: str, value: Any) -> Sampler:
    for fixed, why in FIXED_KEYS.items():
        if key == fixed or key.startswith(fixed + "."):
            raise ConfigError(f"search_space: {key!r} cannot be searched: {why}")
    hint = _field_hint(key)
    if dataclasses.is_dataclass(hint):
        names = ", ".join(f.name for f in dataclasses.fields(hint))
        raise ConfigError(f"search_space: {key!r} is a section; search one of its fields ({names})")
    where = f"search_space.{key}"
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SAMPLERS):
        raise ConfigError(f"{where}: expected one sampler, {{choice: [...]}}, {{grid: [...]}}, {{uniform: [lo, hi]}}, "
                          f"{{loguniform: [lo, hi]}} or {{randint: [lo, hi]}}, got {value!r} (a fixed value belongs "
                          f"under experiment:)")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return Sampler(kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{where}.{kind}: expected [lo, hi], got {args!r}")
    lo, hi = args
    if kind == "randint":
        if hint is not int or not all(type(v) is int for v in (lo, hi)):
            raise ConfigError(f"{where}.randint: expected integer ends for an int field, got {args!r} for a "
                              f"{getattr(hint, '__name__', hint)} field")
        if lo > hi:
            raise ConfigError(f"{where}.randint: expected lo <= hi, got {args!r}")
        return Sampler(kind, (lo, hi))
    if hint is not float:
        raise ConfigError(f"{where}.{kind}: samples real numbers but {key} is a {getattr(hint, '__name__', hint)} "
                          f"field; use {{choice: [...]}} or {{randint: [lo, hi]}}")
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{kind}: expected two numbers, got {args!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"{where}.{kind}: expected finite lo < hi, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.loguniform: expected 0 < lo < hi, got {args!r}")
    return Sampler(kind, (lo, hi))


def plain_value(value: Any) -> Any:
    """Numpy scalars (what Tune samples) as Python numbers, so that the config's type checks hold."""
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    return value


def trial_config(experiment: dict, params: dict, where: str = "trial") -> ExperimentConfig:
    """The experiment of a trial: the base mapping with each dotted key of ``params`` set."""
    data = copy.deepcopy(experiment)
    for dotted, value in params.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = plain_value(value)
    try:
        return from_dict(ExperimentConfig, data)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _check_experiment(config: ExperimentConfig, where: str) -> None:
    """What a trial needs beyond a valid experiment (which ``from_dict`` checks): at least one epoch
    (ASHA's clock is the epoch)."""
    if config.optim.epochs < 1:
        raise ConfigError(f"{where}: optim.epochs: a trial trains at least one epoch; expected an int >= 1, got "
                          f"{config.optim.epochs}")


def load_saved_search(search_dir: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    """The search saved in ``search_dir`` by an earlier ``mtkd tune`` (for ``--resume``)."""
    from mtkd.checkpoint import CheckpointError

    search_dir = Path(search_dir)
    saved = search_dir / SEARCH_FILE
    if not saved.is_file():
        raise CheckpointError(f"{str(search_dir)!r} holds no search to resume: expected {SEARCH_FILE} (written by "
                              f"mtkd tune) in it; pass the search's folder (tune.output_dir)")
    data = apply_overrides(yaml.safe_load(saved.read_text()) or {}, list(overrides or []))
    data.setdefault("tune", {})["output_dir"] = str(search_dir.resolve())  # the folder may have moved
    return parse_tune(data)

