"""``mtkd tune``: a hyper-parameter search with Ray Tune over one shared teacher pool.

A tune file (YAML) has three parts::

    experiment: {...}            # an ExperimentConfig mapping, or a path to one (relative to the tune file)
    search_space:                # dotted experiment keys -> one sampler each
      distill.temperature: {uniform: [2.0, 6.0]}
      agent.mixing: {grid: [static, dynamic]}
    tune: {num_samples: 4, ...}  # TuneSettings below

The driver joins (or starts) Ray, starts the teacher actors once, and runs every trial against
them: a trial is a Tune function trainable that builds its experiment (the base plus its sampled
values) and trains it with :class:`mtkd.engine.Distiller` and :func:`mtkd.runner.fit`, the agent
in-process. After every epoch it reports scalar metrics and a checkpoint, so that ASHA can stop it
and an interrupted search continues it (``--resume``). At the end it prints a table, writes
``results.jsonl`` and ``best_config.yaml`` into the search folder and returns a summary.

This module keeps its top-level imports light (the ``mtkd`` parser imports it for every command);
Ray, Tune and torch are imported where they are used.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import types
import typing
import uuid
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
STATE_SAVE_PERIOD_S = "1"  # Tune's experiment state is saved this often (its default is 10 s or more)
STATS_TIMEOUT_S = 60.0

# Keys a search may not vary, with why. A key is refused when it is one of these or lies below one.
_SHARED_POOL = ("trials share one teacher pool, started once for the whole search; set it under experiment: "
                "instead")
_SHARED_IMAGES = ("it changes the images the shared teachers see (and the cache keys); set it under experiment: "
                  "instead")
_PER_SEARCH = "it is the same for every trial of a search; set it under experiment: instead"
FIXED_KEYS: dict[str, str] = {
    "teachers": _SHARED_POOL,
    "runtime.teacher_precision": _SHARED_POOL,
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
}


class SearchFailedError(ValueError):
    """No trial of a search reported its metric (every one failed)."""


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
    over ``values = (lo, hi)`` (both ends included for ``randint``)."""

    kind: str
    values: tuple

    def to_tune(self):
        """The Ray Tune domain of this sampler."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper end is excluded

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


def _plain(value: Any) -> Any:
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
        node[keys[-1]] = _plain(value)
    try:
        return from_dict(ExperimentConfig, data)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _check_experiment(config: ExperimentConfig, where: str) -> None:
    """What the config classes leave to start-up: names in registries, the agent's settings, ranges."""
    from mtkd.distill import STRATEGIES
    from mtkd.distill.agent import MIXINGS, RULES
    from mtkd.models import MODELS
    from mtkd.registry import UnknownNameError

    try:
        MODELS.get(config.student)
        STRATEGIES.get(config.distill.strategy)
    except UnknownNameError as error:
        raise ConfigError(f"{where}: {error}") from None
    checks = [
        (config.agent.rule in RULES, f"agent.rule: expected one of {', '.join(RULES)}, got {config.agent.rule!r}"),
        (config.agent.mixing in MIXINGS, f"agent.mixing: expected one of {', '.join(MIXINGS)}, got "
                                         f"{config.agent.mixing!r}"),
        (config.agent.agent_step >= 1, f"agent.agent_step: expected an int >= 1, got {config.agent.agent_step}"),
        (config.optim.epochs >= 1, f"optim.epochs: expected an int >= 1, got {config.optim.epochs}"),
        (config.distill.temperature > 0, f"distill.temperature: expected a number > 0, got "
                                         f"{config.distill.temperature:g}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")


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


# --------------------------------------------------------------------------- the trial
def trial_dirname(trial) -> str:
    """Tune's folder of a trial: ``trial_<id>`` (stable across a resume)."""
    return f"trial_{trial.trial_id}"


def scalar_metrics(metrics: dict) -> dict:
    """The finite numbers of an epoch's metrics (what Tune records and ASHA compares)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def newest_checkpoint(trial_folder: Path) -> tuple[dict, dict, Path] | None:
    """``(state, meta, folder)`` of the newest checkpoint in a trial's folder that loads, or None.

    Tune records a trial's checkpoints in its experiment state, which it saves now and then; the
    folders themselves are written before the epoch is reported. Resuming from the newest folder on
    disk means that a search killed between the two never trains an epoch twice.
    """
    from mtkd.checkpoint import CheckpointError
    from mtkd.experiment import load_checkpoint

    if not trial_folder.is_dir():
        return None
    for folder in sorted(trial_folder.glob("checkpoint_*"), reverse=True):
        try:
            state, meta = load_checkpoint(folder)
        except (CheckpointError, OSError, ValueError, KeyError, RuntimeError):
            continue  # a copy cut short by the interruption: take the one before
        return state, meta, folder
    return None


def tune_trial(params: dict, *, experiment: dict, teacher_handles: list[list], cache_url: str | None,
               experiment_path: str) -> None:
    """One trial (a Tune function trainable): train the experiment ``experiment`` + ``params`` on the
    shared teacher actors, the agent in this process, reporting scalar metrics and a checkpoint after
    every epoch; continue from the trial's newest checkpoint when there is one."""
    import ray
    import torch
    from ray import tune

    from mtkd.cache import CacheContext, dataset_cache_id
    from mtkd.checkpoint import META_FILE, read_json
    from mtkd.distill import STRATEGIES
    from mtkd.engine import Distiller, teacher_fields
    from mtkd.experiment import eval_loader, load_checkpoint, load_data, save_checkpoint, train_loader
    from mtkd.runner import FitHooks, check_resumable, fit, run_meta
    from services.cache import RedisStore
    from services.teacher_server.pool import RayTeacherPool

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # Ray logs every checkpoint at INFO
    config = trial_config(experiment, params)
    rt = config.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    device = torch.device("cuda" if rt.device != "cpu" and ray.get_gpu_ids() else "cpu")
    torch.manual_seed(config.seed)
    train_set, test_set = load_data(config.data, config.seed)
    cache = None
    if cache_url:
        cache = (RedisStore(cache_url),
                 CacheContext(dataset_cache_id(train_set), config.data.crop_padding, config.cache.value_dtype))
    pool = RayTeacherPool(teacher_handles, fields=teacher_fields(STRATEGIES.get(config.distill.strategy)),
                          half_precision=rt.half_precision, max_in_flight=rt.prefetch + 1, cache=cache)
    distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape, device=device)
    found = newest_checkpoint(Path(experiment_path) / f"trial_{tune.get_context().get_trial_id()}")
    known_epoch = 0  # the newest epoch Tune's own (saved now and then) state knows of
    if tune.get_checkpoint() is not None:
        with tune.get_checkpoint().as_directory() as folder:
            if found is None:  # storage this process cannot list
                found = (*load_checkpoint(Path(folder)), Path(folder))
                known_epoch = int(found[1].get("epoch", 0))
            else:  # only its epoch is needed: the metadata, not the tensors
                known_epoch = int(read_json(Path(folder) / META_FILE).get("epoch", 0))
    if found is not None:
        state, meta, folder = found
        check_resumable(meta, distiller.descriptions, config.student)
        distiller.load_state_dict(state)
        if int(meta.get("epoch", 0)) > known_epoch and meta.get("metrics"):
            # killed after the checkpoint was written but before Tune saved its state: report that
            # epoch again, so that Tune (the table, ASHA) knows where the trial is
            with tempfile.TemporaryDirectory(prefix="mtkd-tune-") as copy:
                shutil.copytree(folder, copy, dirs_exist_ok=True)
                tune.report(scalar_metrics(meta["metrics"]), checkpoint=tune.Checkpoint.from_directory(copy))

    def report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="mtkd-tune-") as folder:
            save_checkpoint(Path(folder), distiller.state_dict(), run_meta(config, distiller, train_set, metrics))
            tune.report(scalar_metrics(metrics), checkpoint=tune.Checkpoint.from_directory(folder))

    try:
        fit(distiller, train_loader(train_set, config.data, config.seed), eval_loader(test_set, config.data), None,
            train_set, FitHooks(write=False, progress=False, after_epoch=report))
    finally:
        pool.close()


# --------------------------------------------------------------------------- progress
def _make_trial_lines():
    from ray import tune

    class TrialLines(tune.Callback):
        """One line on stderr per trial result and per trial end (``enabled`` switches them off)."""

        enabled = True  # a class attribute: the instance is pickled with the search, the switch is not

        def __init__(self, metric: str, epochs: int):
            self.metric, self.epochs = metric, epochs

        def _say(self, text: str) -> None:
            if TrialLines.enabled:
                print(f"[tune] {text}", file=sys.stderr, flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            shown = ", ".join(f"{k}={_format(v)}" for k, v in trial.config.items())
            self._say(f"trial {trial.trial_id} starts: {shown}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            epochs = int(trial.config.get("optim.epochs", self.epochs))
            value = result.get(self.metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            self._say(f"trial {trial.trial_id} epoch {result.get('epoch', '?')}/{epochs}  {self.metric} {shown}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._say(f"trial {trial.trial_id} ended after epoch {trial.last_result.get('epoch', 0)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._say(f"trial {trial.trial_id} failed (see the table)")

    TrialLines.__module__, TrialLines.__qualname__ = __name__, "TrialLines"
    return TrialLines


def trial_lines_class():
    """The ``TrialLines`` callback class (a ``ray.tune.Callback``), made on first use."""
    if "TrialLines" not in globals():
        globals()["TrialLines"] = _make_trial_lines()
    return globals()["TrialLines"]


def __getattr__(name: str):
    # TrialLines subclasses ray.tune.Callback; it is made on first use (importing Tune takes seconds)
    # and is then a module attribute, so that a pickled search finds it by name.
    if name == "TrialLines":
        return trial_lines_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- the driver
def run_tune(spec: TuneSpec, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or with ``resume`` continue) the search of ``spec``; returns its summary.

    Joins the cluster of ``experiment.runtime.address`` (as ``mtkd distill`` does) or starts a private
    Ray sized for the teachers plus ``max_concurrent_trials`` trials, opens the cache, starts the
    teacher actors once, runs the trials with Ray Tune and ASHA, then stops the actors. Prints the
    results table on stdout and writes results.jsonl and best_config.yaml into the search folder.

    Raises:
        ConfigError: the search does not fit the pool or the data (agent buffer, classes...).
        CheckpointError: ``resume`` and the folder holds no restorable search.
        FileExistsError: a fresh search into a folder that holds one (without ``overwrite``).
    """
    import ray

    from mtkd.checkpoint import CheckpointError
    from services.cache import open_store
    from services.learner.driver import cluster_address, ensure_ray, warn_if_local_cache
    from services.teacher_server.pool import teacher_source

    search_dir = spec.search_dir.resolve()
    spec.settings.output_dir = str(search_dir)
    experiment_path = search_dir / spec.settings.name
    for teacher in spec.base.teachers:
        teacher_source(teacher)  # a malformed spec fails before anything starts
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(str(experiment_path)):
            raise CheckpointError(f"{str(search_dir)!r} holds no Ray Tune state to resume (expected "
                                  f"{str(experiment_path / 'tuner.pkl')!r}); start the search afresh with --config")
    else:
        _prepare_search_dir(spec, search_dir, overwrite)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_PERIOD_S)
    private = cluster_address(spec.base) is None
    with open_store(spec.base.cache.url, spec.base.cache.max_memory_mb) as store:
        sizing = copy.deepcopy(spec.base)  # a private Ray holds the teachers and this many trials
        sizing.runtime.num_learners = spec.settings.max_concurrent_trials or 1
        started = ensure_ray(sizing)
        try:
            warn_if_local_cache(spec.base.cache.url, private)
            outcome = _search(spec, experiment_path, resume, progress, private, store.url if store else None)
        finally:
            if started:
                ray.shutdown()
    return _finish(spec, search_dir, experiment_path, outcome)


def _prepare_search_dir(spec: TuneSpec, search_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a search Tune could resume (unless ``overwrite``); clear what an
    earlier search left; save the resolved search."""
    tune_dir = search_dir / spec.settings.name
    if (tune_dir / "tuner.pkl").exists() and not overwrite:
        raise FileExistsError(f"search folder {str(search_dir)!r} already holds a search; pass --resume {search_dir} "
                              f"to continue it, --overwrite to start again, or choose another tune.output_dir")
    shutil.rmtree(tune_dir, ignore_errors=True)
    for name in (SEARCH_FILE, RESULTS_FILE, BEST_CONFIG_FILE):
        (search_dir / name).unlink(missing_ok=True)
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / SEARCH_FILE).write_text(yaml.safe_dump(json.loads(json.dumps(spec.as_yaml())), sort_keys=False))


def _search(spec: TuneSpec, experiment_path: Path, resume: bool, progress: bool, private: bool,
            cache_url: str | None) -> dict:
    """Start the teachers, run Tune, collect the results and the actors' counts; stop the teachers."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from mtkd.engine import check_agent_buffer, check_pool
    from mtkd.experiment import load_data
    from services.learner.driver import check_resources, describe_teachers, learners_use_gpu
    from services.teacher_server.pool import start_teacher_actors, stop_actors

    base, settings = spec.base, spec.settings
    handles: list[list] = []
    try:
        use_gpu = learners_use_gpu(base)
        check_resources(base, use_gpu, private)
        run_id = f"tune-{uuid.uuid4().hex[:8]}"
        start_teacher_actors(base, into=handles, run_id=run_id, cache_url=cache_url)
        descriptions = describe_teachers(handles)
        train_set, _ = load_data(base.data, base.seed)
        check_pool(descriptions, train_set.num_classes, train_set.image_shape)
        batches = len(train_set) // base.data.batch_size
        check_agent_buffer(base, descriptions, train_set.num_classes, batches)
        for key, sampler in spec.search.items():
            for value in sampler.candidates():
                config = trial_config(spec.experiment, {key: value})
                try:
                    check_agent_buffer(config, descriptions, train_set.num_classes,
                                       len(train_set) // config.data.batch_size)
                except ConfigError as error:
                    raise ConfigError(f"search_space.{key}={value!r}: {error}") from None
        at_start = actor_stats(handles)
        resources = {"CPU": base.runtime.learner_num_cpus, **base.runtime.learner_resources}
        if use_gpu:
            resources["GPU"] = 1.0
        trainable = tune.with_resources(
            tune.with_parameters(tune_trial, experiment=spec.experiment, teacher_handles=handles,
                                 cache_url=cache_url, experiment_path=str(experiment_path)),
            tune.PlacementGroupFactory([resources]))
        trial_lines = trial_lines_class()
        trial_lines.enabled = progress
        if resume:
            tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: sampler.to_tune() for key, sampler in spec.search.items()},
                tune_config=tune.TuneConfig(
                    metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs,
                                            grace_period=settings.grace_period,
                                            reduction_factor=settings.reduction_factor),
                    search_alg=BasicVariantGenerator(max_concurrent=settings.max_concurrent_trials or 0,
                                                     random_state=settings.seed),
                    trial_dirname_creator=trial_dirname, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=settings.name, storage_path=str(experiment_path.parent), verbose=0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    callbacks=[trial_lines(settings.metric, base.optim.epochs)]))
        # Tune prints a banner and hints on stdout, where the table and the summary go: send them to
        # stderr (nowhere with --quiet). Its warnings and errors are logged (stderr) as before.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if progress else devnull):
            grid = tuner.fit()
        rows = trial_rows(grid, spec)
        at_end = actor_stats(handles)
    finally:
        stop_actors(handles)
    return {"rows": rows, "teachers": _teacher_report(run_id, descriptions, at_start, at_end)}


def actor_stats(handles: list[list]) -> list[list[dict | None]]:
    """Per teacher, per replica: the actor's ``stats()`` (pid, node, calls served), None if it does not answer."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    out = []
    for replicas in handles:
        row = []
        for handle in replicas:
            try:
                row.append(ray.get(handle.stats.remote(), timeout=STATS_TIMEOUT_S))
            except (GetTimeoutError, RayError):
                row.append(None)
        out.append(row)
    return out


def _teacher_report(run_id: str, descriptions: list[dict], at_start: list, at_end: list) -> list[dict]:
    """Per teacher replica: its actor's name, its process id when the search started and at the end
    (equal: the same process served the whole search), and the calls it served."""
    report = []
    for t, (start_row, end_row) in enumerate(zip(at_start, at_end)):
        for r, (start, end) in enumerate(zip(start_row, end_row)):
            report.append({"teacher": descriptions[t]["name"], "actor": f"mtkd-teacher-{t}-{r}-{run_id}",
                           "pid_at_start": (start or {}).get("pid"), "pid": (end or {}).get("pid"),
                           "calls": (end or {}).get("calls")})
    return report


# ----------------------------------------------------------------------------- results
def trial_rows(grid, spec: TuneSpec) -> list[dict]:
    """One record per trial of a Tune ``ResultGrid``: id, sampled values, epochs, final and best metric,
    status (done: trained all its epochs; stopped: ASHA stopped it; error; pending: never trained;
    unfinished: the search was interrupted while it trained)."""
    metric, sign = spec.settings.metric, (1.0 if spec.settings.mode == "max" else -1.0)
    analysis = getattr(grid, "_experiment_analysis", None)  # the trials' statuses, in the grid's order
    statuses = [t.status for t in analysis.trials] if analysis is not None else [None] * len(grid)
    rows = []
    for result, tune_status in zip(grid, statuses):
        params = {k: _plain(result.config.get(k)) for k in spec.search}
        epochs = trial_config(spec.experiment, params).optim.epochs
        last = result.metrics or {}
        history = []
        frame = result.metrics_dataframe
        if frame is not None and metric in frame and "epoch" in frame:
            history = [(int(e), float(v)) for e, v in zip(frame["epoch"], frame[metric]) if v == v]
        final = last.get(metric)
        if final is not None and not any(e == last.get("epoch") for e, _ in history):
            history.append((int(last["epoch"]), float(final)))
        best = max(history, key=lambda item: sign * item[1]) if history else (None, None)
        run = int(last.get("epoch", 0) or 0)
        if result.error or tune_status == "ERROR":
            status = "error"
        elif tune_status not in (None, "TERMINATED"):  # the search was interrupted
            status = "pending" if tune_status == "PENDING" and not run else "unfinished"
        else:
            status = "done" if run >= epochs else "stopped" if run else "pending"
        rows.append({"trial": Path(result.path).name.removeprefix("trial_"), "params": params, "status": status,
                     "epochs_run": run, "epochs": epochs, "step": int(last.get("step", 0) or 0), "metric": metric,
                     "final": float(final) if final is not None else None, "best": best[1], "best_epoch": best[0],
                     "error": _error_line(result.error) if result.error else None, "path": result.path})
    return sorted(rows, key=lambda row: row["trial"])


def _error_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The trial with the best final metric (the first of equals), None if no trial reported one."""
    scored = [row for row in rows if row["final"] is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda row: sign * row["final"])  # max keeps the first of equals


def _format(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict], search_keys: list[str], metric: str, best: dict | None) -> str:
    """The results table: one row per trial; the best one is marked with ``*``."""
    header = ["trial", *search_keys, "epochs", f"{metric} final", f"{metric} best", "status"]
    body = []
    for row in rows:
        mark = "*" if best is not None and row["trial"] == best["trial"] else " "
        body.append([f"{mark}{row['trial']}", *(_format(row["params"].get(k)) for k in search_keys),
                     f"{row['epochs_run']}/{row['epochs']}",
                     "-" if row["final"] is None else f"{row['final']:.4f}",
                     "-" if row["best"] is None else f"{row['best']:.4f}", row["status"]])
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    for row in rows:
        if row["error"]:
            lines.append(f"trial {row['trial']} failed: {row['error']}")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _finish(spec: TuneSpec, search_dir: Path, experiment_path: Path, outcome: dict) -> dict:
    from mtkd.config import save_config

    rows, settings = outcome["rows"], spec.settings
    with open(search_dir / RESULTS_FILE, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
    best = best_row(rows, settings.mode)
    print(format_table(rows, list(spec.search), settings.metric, best))
    counts = {status: sum(row["status"] == status for row in rows)
              for status in ("done", "stopped", "error", "pending", "unfinished")}
    if counts["pending"] or counts["unfinished"]:
        print(f"\nthe search was interrupted ({counts['pending']} trial(s) pending, {counts['unfinished']} unfinished); "
              f"continue it with: mtkd tune --resume {_shown(search_dir)}")
    summary = {"search_dir": str(search_dir), "tune_dir": str(experiment_path), "trials": len(rows), **counts,
               "metric": settings.metric, "mode": settings.mode, "results": str(search_dir / RESULTS_FILE),
               "teachers": outcome["teachers"]}
    if best is None:
        first = next((row["error"] for row in rows if row["error"]), "no trial reported a result")
        raise SearchFailedError(f"no trial of the search reported {settings.metric}; {first}")
    config = trial_config(spec.experiment, best["params"])
    config.output_dir = str(search_dir / "best")
    save_config(config, search_dir / BEST_CONFIG_FILE)
    shown = _shown(search_dir / BEST_CONFIG_FILE)
    print(f"\nbest: trial {best['trial']} {settings.metric} {best['final']:.4f} -> {shown} "
          f"(mtkd distill --config {shown})")
    return {**summary, "best_trial": best["trial"], "best_value": best["final"], "best_params": best["params"],
            "best_config": str(search_dir / BEST_CONFIG_FILE)}


# ---------------------------------------------------------------------------- command line
def cmd_tune(args: argparse.Namespace) -> dict:
    """``mtkd tune``: load the tune file (or the saved search of ``--resume``) and run it."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"experiment.runtime.address={args.address}")
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues the saved search; pass no --config")
        if args.overrides:
            raise ConfigError(f"--resume continues the search as it was saved; overrides are not accepted (got "
                              f"{' '.join(args.overrides)})")
        spec = load_saved_search(args.resume, overrides)
    else:
        if not args.config:
            raise ConfigError("mtkd tune needs --config TUNE_FILE (configs/tune-*.yaml) or --resume SEARCH_DIR")
        spec = load_tune(args.config, overrides)
    return run_tune(spec, resume=bool(args.resume), progress=not args.quiet, overwrite=args.overwrite)


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``tune`` sub-command to the ``mtkd`` parser's sub-parsers; returns it."""
    p = subparsers.add_parser("tune", help="search hyper-parameters with Ray Tune and ASHA over one shared teacher pool")
    p.add_argument("--config", help="tune file: experiment, search_space, tune (configs/tune-*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides of the tune file, e.g. tune.num_samples=8 experiment.optim.epochs=4")
    p.add_argument("--resume", metavar="SEARCH_DIR", help="continue an interrupted search (its tune.output_dir)")
    p.add_argument("--address", help="Ray cluster to join (as for mtkd distill: default $RAY_ADDRESS, or a cluster "
                                     "started with `ray start` here, else a private local Ray; 'local' forces a "
                                     "private one)")
    p.add_argument("--overwrite", action="store_true", help="replace a search already in tune.output_dir")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines on stderr")
    p.set_defaults(func=cmd_tune)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``mtkd`` parser with ``tune`` (added here unless ``services.cli`` already has it)."""
    from services.cli import build_parser as services_parser

    parser = services_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "tune" not in sub.choices:
        add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m services.tune tune --config ...``: the ``mtkd`` command with ``tune``."""
    from mtkd.cli import run

    return run(build_parser(), argv)


if __name__ == "__main__":
    from services.tune import main as _main  # the module's own names, not __main__'s (they are pickled)

    sys.exit(_main())
