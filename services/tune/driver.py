"""The driver of ``mtkd tune``: join (or start) Ray, start the teacher actors once, run the trials
with a Ray Tune ``Tuner`` and ASHA, then stop the actors and write the results.

A fresh search builds a ``Tuner``; ``--resume`` continues the one saved in the search folder with
``Tuner.restore`` (after ``Tuner.can_restore``). Progress lines come from :class:`TrialLines`, a
``tune.Callback``; the trials' statuses from the experiment state Tune saves at the end
(``tune.ExperimentAnalysis``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.exceptions import GetTimeoutError, RayError
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from mtkd.checkpoint import CheckpointError
from mtkd.config import ConfigError
from mtkd.engine import check_agent_buffer, check_pool
from mtkd.errors import RunExistsError
from mtkd.experiment import load_data
from services.cache import open_store
from services.learner.driver import (check_resources, connect_ray, describe_teachers, learner_demand, learners_use_gpu,
                                     warn_if_local_cache)
from services.teacher_server.pool import start_teacher_actors, stop_actors, teacher_source
from services.tracking import tune_callbacks
from services.tune.results import finish_search, format_value, trial_rows
from services.tune.spec import BEST_CONFIG_FILE, RESULTS_FILE, SEARCH_FILE, Sampler, TuneSpec, trial_config
from services.tune.trial import trial_dirname, tune_trial

STATE_SAVE_PERIOD_S = "1"  # Tune's experiment state is saved this often (its default is 10 s or more)
STATS_TIMEOUT_S = 60.0


class TrialLines(tune.Callback):
    """One line on stderr per trial start, result and end.

    ``TrialLines.enabled`` (a class attribute) switches them off: a resumed search gets back the
    callback that Tune pickled with it, so the switch of the current command cannot live in it.
    """

    enabled = True

    def __init__(self, metric: str, epochs: int):
        self.metric, self.epochs = metric, epochs

    def _say(self, text: str) -> None:
        if TrialLines.enabled:
            print(f"[tune] {text}", file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in trial.config.items())
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


def tune_domain(sampler: Sampler):
    """The Ray Tune domain of a sampler of the tune file."""
    if sampler.kind == "choice":
        return tune.choice(list(sampler.values))
    if sampler.kind == "grid":
        return tune.grid_search(list(sampler.values))
    if sampler.kind == "uniform":
        return tune.uniform(*sampler.values)
    if sampler.kind == "loguniform":
        return tune.loguniform(*sampler.values)
    return tune.randint(sampler.values[0], sampler.values[1] + 1)  # Tune's upper end is excluded


def run_tune(spec: TuneSpec, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or with ``resume`` continue) the search of ``spec``; returns its summary.

    Joins the cluster of ``experiment.runtime.address`` (as ``mtkd distill`` does) or starts a private
    Ray sized for the teachers plus ``max_concurrent_trials`` trials, opens the cache, starts the
    teacher actors once, runs the trials with Ray Tune and ASHA, then stops the actors. Prints the
    results table on stdout and writes results.jsonl and best_config.yaml into the search folder.

    Raises:
        ConfigError: the search does not fit the pool or the data (agent buffer, classes...).
        CheckpointError: ``resume`` and the folder holds no restorable search.
        RunExistsError: a fresh search into a folder that holds one (without ``overwrite``).
        SearchFailedError: no trial reported the metric.
    """
    search_dir = spec.search_dir.resolve()
    spec.settings.output_dir = str(search_dir)
    experiment_path = search_dir / spec.settings.name
    for teacher in spec.base.teachers:
        teacher_source(teacher)  # a malformed spec fails before anything starts
    if resume:
        if not tune.Tuner.can_restore(str(experiment_path)):
            raise CheckpointError(f"{str(search_dir)!r} holds no Ray Tune state to resume (expected "
                                  f"{str(experiment_path / 'tuner.pkl')!r}); start the search afresh with --config")
    else:
        prepare_search_dir(spec, search_dir, overwrite)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_PERIOD_S)
    with open_store(spec.base.cache.url, spec.base.cache.max_memory_mb) as store:
        sizing = copy.deepcopy(spec.base)  # a private Ray holds the teachers and this many trials
        sizing.runtime.num_learners = spec.settings.max_concurrent_trials or 1
        link = connect_ray(sizing)
        try:
            warn_if_local_cache(spec.base.cache.url, link.private)
            outcome = _search(spec, experiment_path, resume, progress, link.private, store.url if store else None)
        finally:
            if link.started:
                ray.shutdown()
    return finish_search(spec, search_dir, experiment_path, outcome)


def prepare_search_dir(spec: TuneSpec, search_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a search Tune could resume (unless ``overwrite``); clear what an
    earlier search left; save the resolved search."""
    tune_dir = search_dir / spec.settings.name
    if tune.Tuner.can_restore(str(tune_dir)) and not overwrite:
        raise RunExistsError(f"search folder {str(search_dir)!r} already holds a search; pass --resume {search_dir} "
                             f"to continue it, --overwrite to start again, or choose another tune.output_dir")
    shutil.rmtree(tune_dir, ignore_errors=True)
    for name in (SEARCH_FILE, RESULTS_FILE, BEST_CONFIG_FILE):
        (search_dir / name).unlink(missing_ok=True)
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / SEARCH_FILE).write_text(yaml.safe_dump(json.loads(json.dumps(spec.as_yaml())), sort_keys=False))


def _check_search(spec: TuneSpec, descriptions: list[dict]) -> None:
    """Every value a search key can take fits the pool and the data (class counts, the agent's buffer).

    Each trial's :class:`mtkd.session.Session` checks its own config too, but a trial's error only
    shows in the results table once every trial has failed on it: checked here, a search that
    cannot run is refused in one line before any trial starts."""
    base = spec.base
    train_set, _ = load_data(base.data, base.seed)
    check_pool(descriptions, train_set.num_classes, train_set.image_shape)
    check_agent_buffer(base, descriptions, train_set.num_classes, len(train_set) // base.data.batch_size)
    for key, sampler in spec.search.items():
        for value in sampler.candidates():
            config = trial_config(spec.experiment, {key: value})
            try:
                check_agent_buffer(config, descriptions, train_set.num_classes,
                                   len(train_set) // config.data.batch_size)
            except ConfigError as error:
                raise ConfigError(f"search_space.{key}={value!r}: {error}") from None


def _tuner(spec: TuneSpec, experiment_path: Path, resume: bool, trainable) -> tune.Tuner:
    """Tune's ``Tuner``: restored from the search folder with ``resume``, else a fresh one."""
    if resume:
        return tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    settings = spec.settings
    return tune.Tuner(
        trainable,
        param_space={key: tune_domain(sampler) for key, sampler in spec.search.items()},
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs, grace_period=settings.grace_period,
                                    reduction_factor=settings.reduction_factor),
            search_alg=BasicVariantGenerator(max_concurrent=settings.max_concurrent_trials or 0,
                                             random_state=settings.seed),
            trial_dirname_creator=trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(
            name=settings.name, storage_path=str(experiment_path.parent), verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[TrialLines(settings.metric, spec.base.optim.epochs),
                       *tune_callbacks(spec.base, experiment_path.parent, settings.name)]))  # tracking: MLflow, TBX


def trial_statuses(experiment_path: str | Path) -> dict[str, str]:
    """Tune's status of each trial (``TERMINATED``, ``ERROR``, ``PENDING``, ``RUNNING``, ...) by trial
    id, from the experiment state that Tune writes when ``fit`` returns."""
    return {trial.trial_id: trial.status for trial in tune.ExperimentAnalysis(str(experiment_path)).trials}


def _search(spec: TuneSpec, experiment_path: Path, resume: bool, progress: bool, private: bool,
            cache_url: str | None) -> dict:
    """Start the teachers, run Tune, collect the results and the actors' counts; stop the teachers."""
    base = spec.base
    handles: list[list] = []
    try:
        use_gpu = learners_use_gpu(base)
        check_resources(base, use_gpu, private)
        run_id = f"tune-{uuid.uuid4().hex[:8]}"
        start_teacher_actors(base, into=handles, run_id=run_id, cache_url=cache_url)
        descriptions = describe_teachers(handles)
        _check_search(spec, descriptions)
        at_start = actor_stats(handles)
        trainable = tune.with_resources(
            tune.with_parameters(tune_trial, experiment=spec.experiment, teacher_handles=handles,
                                 cache_url=cache_url, experiment_path=str(experiment_path)),
            tune.PlacementGroupFactory([learner_demand(base, use_gpu)]))
        tuner = _tuner(spec, experiment_path, resume, trainable)
        TrialLines.enabled = progress
        # Tune prints a banner and hints on stdout, where the table and the summary go: send them to
        # stderr (nowhere with --quiet). Its warnings and errors are logged (stderr) as before.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if progress else devnull):
            grid = tuner.fit()
        rows = trial_rows(grid, spec, trial_statuses(grid.experiment_path))
        at_end = actor_stats(handles)
    finally:
        stop_actors(handles)
    return {"rows": rows, "teachers": _teacher_report(run_id, descriptions, at_start, at_end)}


def actor_stats(handles: list[list]) -> list[list[dict | None]]:
    """Per teacher, per replica: the actor's ``stats()`` (pid, node, calls served), None if it does not answer."""
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
