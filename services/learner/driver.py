"""``mtkd distill`` on Ray, the driver: join (or start) Ray, place the teacher replicas (one placement
group: all or none) and start their actors and, for an agent rule that learns from stored experience
(:func:`mtkd.engine.needs_agent_actor`), the agent actor on this node, then run the learners with a
Ray Train ``TorchTrainer``.

The driver is thin and shares no disk with the learners. Checkpoints live in Ray Train's
``storage_path`` (a local folder or any URI pyarrow supports); the run folder on the driver's disk
is written from what the learners send (:mod:`services.learner.events`) and from the final
checkpoint, which the driver downloads. ``--resume`` reuses the Ray Train run's name, so Ray Train
hands its newest checkpoint to the learners; worker failures restart them from it by themselves
(``runtime.max_failures``).
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import ray.train
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.queue import Queue

from mtkd.checkpoint import CheckpointError, read_json, write_json
from mtkd.config import ExperimentConfig, save_config, to_dict
from mtkd.distill import STRATEGIES
from mtkd.engine import PoolMismatchError, agent_kwargs, needs_agent_actor
from mtkd.errors import RUN_ERRORS, LostError, UserError, error_class
from mtkd.experiment import (RAY_RUN_FILE, RunDirectory, load_checkpoint, load_data, no_valid_checkpoint,
                             print_warning, write_checkpoint_folder)
from mtkd.runner import KEEP_CHECKPOINTS, finish, plot_title, prepare_run_dir
from mtkd.tasks import model_registry, task_for_dataset
from services.agent.actor import start_agent_actor
from services.cache import open_store
from services.learner.checkpoints import newest_in_storage, newest_valid, repair_snapshot, with_older
from services.learner.events import EventWriter
from services.learner.lost import lost_error, private_ray_lost
from services.teacher_server.pool import (replica_resources, start_teacher_actors, stop_actors, teacher_bundles,
                                          teacher_placement_group, teacher_source)

PLACEMENT_NOTE_AFTER_S = 30.0
PLACEMENT_TIMEOUT_S = 600.0  # the default of runtime.placement_timeout_s
# how long fit may go on after the private Ray's raylet or GCS died: a run about to end may still end
# (the learners report through their own connections), but this process's Ray client ends it without a
# word 60 s after losing the GCS (gcs_rpc_server_reconnect_timeout_s)
RAY_LOST_GRACE_S = 10.0
log = logging.getLogger(__name__)


class RayUnavailableError(UserError, ValueError):
    """Ray could not be started or joined, or the run's actors cannot be placed on its cluster."""


# ------------------------------------------------------------------------------- joining Ray
def cluster_address(config: ExperimentConfig) -> str | None:
    """The cluster the config names: ``runtime.address`` (``local``: none), else ``RAY_ADDRESS``
    (set inside ``ray job submit``); None when neither names one."""
    if config.runtime.address:
        return None if config.runtime.address == "local" else config.runtime.address
    return os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class RayLink:
    """How this process is on Ray.

    Attributes:
        started: this process started a private Ray (and stops it at the end).
        private: the Ray is not a cluster that may grow: a run that cannot be placed is refused.
    """

    started: bool
    private: bool


def _quiet() -> dict:
    """``ray.init`` settings: driver-side Ray logs at warnings, worker-side at errors."""
    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="ERROR")}


def connect_ray(config: ExperimentConfig) -> RayLink:
    """Join the cluster of :func:`cluster_address`; without one, join the cluster ``ray start``
    started on this machine, else start a private local Ray (``runtime.address: local``: always
    a private one). A Ray this process already joined is used as it is.

    A private Ray advertises at least the logical CPUs the run's actors ask for: teachers and the
    learner take turns (the learner waits on the teachers' outputs), so they can share cores.

    Raises:
        RayUnavailableError: Ray cannot be joined or started (one line naming the cause).
    """
    address = cluster_address(config)
    if ray.is_initialized():
        return RayLink(started=False, private=address is None)
    where = f"the Ray cluster at {address!r}" if address else "a private local Ray"
    try:
        if address:
            ray.init(address=address, **_quiet())
            return RayLink(started=False, private=False)
        num_cpus = math.ceil(max(float(os.cpu_count() or 1), logical_cpus_needed(config)))
        # Without the dashboard, Ray Train's placement-group cleaner cannot reach the state API and
        # warns every second; worker-side Ray logs are kept to errors. The metrics agent still runs
        # (it is not the dashboard): it serves the run's metrics on runtime.metrics_export_port.
        private = {"num_cpus": num_cpus, "include_dashboard": False, **_quiet()}
        if config.runtime.metrics_export_port is not None:
            private["_metrics_export_port"] = config.runtime.metrics_export_port
        if config.runtime.address == "local":
            ray.init(address="local", **private)
            return RayLink(started=True, private=True)
        try:  # address=None: Ray's own lookup, the cluster `ray start` recorded here, else a new local Ray
            ray.init(**private)
            return RayLink(started=True, private=True)
        except ValueError as error:
            if "existing cluster" not in str(error):
                raise
        # Ray found that cluster and refuses to size it (num_cpus): join it as it is
        where = "the Ray cluster `ray start` recorded on this machine (`ray stop` forgets a crashed one)"
        ray.init(**_quiet())
        return RayLink(started=False, private=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RayUnavailableError(f"could not start or join {where}: {first_line}") from error


def connect_ray_keeping_sigterm(config: ExperimentConfig) -> RayLink:
    """:func:`connect_ray`, keeping this process's own SIGTERM handler: ``ray.init`` replaces it with
    one that exits with status 15, which would pre-empt ``mtkd distill``'s (stop, then say how to
    continue, exit 143). A default handler is left to Ray's."""
    if threading.current_thread() is not threading.main_thread():
        return connect_ray(config)
    ours = signal.getsignal(signal.SIGTERM)
    try:
        return connect_ray(config)
    finally:
        if callable(ours) and signal.getsignal(signal.SIGTERM) is not ours:
            signal.signal(signal.SIGTERM, ours)


def ensure_ray(config: ExperimentConfig) -> bool:
    """:func:`connect_ray`; True if it started a private Ray (which the caller stops)."""
    return connect_ray(config).started


# ------------------------------------------------------------------------------- placement
def learner_demand(config: ExperimentConfig, use_gpu: bool) -> dict[str, float]:
    """Ray resources of one learner worker."""
    demand = {"CPU": config.runtime.learner_num_cpus, **config.runtime.learner_resources}
    if use_gpu:
        demand["GPU"] = 1.0
    return demand


def demands(config: ExperimentConfig, use_gpu: bool) -> list[tuple[str, dict[str, float]]]:
    """``(who, resources)`` of every actor the run places: each teacher replica and each learner."""
    out = []
    for spec in config.teachers:
        options = replica_resources(spec, config.runtime)
        need = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
        out += [(f"teacher {spec.name or spec.checkpoint or spec.address!r}", need)] * max(1, spec.replicas)
    return out + [("learner", learner_demand(config, use_gpu))] * config.runtime.num_learners


def logical_cpus_needed(config: ExperimentConfig) -> float:
    """CPUs the run's actors ask Ray for: learners plus teacher replicas."""
    return sum(need.get("CPU", 0.0) for _, need in demands(config, use_gpu=False))


def learners_use_gpu(config: ExperimentConfig) -> bool:
    """``runtime.device`` on Ray: cpu -> no; cuda -> yes; auto -> when the cluster has a GPU per learner."""
    if config.runtime.device == "cpu":
        return False
    if config.runtime.device.startswith("cuda"):
        return True
    return float(ray.cluster_resources().get("GPU", 0.0)) >= config.runtime.num_learners


def placement_problems(config: ExperimentConfig, use_gpu: bool) -> list[str]:
    """What cannot be placed on the cluster as it is now: totals, and demands no single node can hold."""
    totals = {k: float(v) for k, v in ray.cluster_resources().items()}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    wanted: dict[str, float] = {}
    problems = []
    for who, need in demands(config, use_gpu):
        for name, amount in need.items():
            wanted[name] = wanted.get(name, 0.0) + amount
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0) for node in nodes):
            shown = ", ".join(f"{k}: {v:g}" for k, v in need.items() if v > 0)
            problems.append(f"no node of the Ray cluster can hold a {who} ({shown})")
    for name, amount in wanted.items():
        if amount > totals.get(name, 0.0) + 1e-9:
            problems.append(f"the run's actors ask for {amount:g} {name} in all but the Ray cluster has "
                            f"{totals.get(name, 0.0):g}" + _hint(name))
    return list(dict.fromkeys(problems))


def _hint(resource: str) -> str:
    if resource == "CPU":
        return "; lower runtime.teacher_num_cpus or runtime.learner_num_cpus, or add nodes"
    if resource == "GPU":
        return "; set runtime.teacher_num_gpus=0 (teachers) or runtime.device=cpu (learners), or add GPU nodes"
    return f"; start nodes with --resources='{{\"{resource}\": N}}' or drop it from the config"


def check_resources(config: ExperimentConfig, use_gpu: bool, private: bool) -> None:
    """Refuse (private Ray) or warn about (a cluster, which may autoscale) actors that cannot be placed."""
    problems = placement_problems(config, use_gpu)
    if problems and private:
        raise RayUnavailableError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    for message in problems:
        print(f"[mtkd] warning: {message}; waiting for the cluster to grow", file=sys.stderr)


def wait_for_placement(group: PlacementGroup | None, config: ExperimentConfig) -> None:
    """Wait until Ray has placed every bundle of the teachers' placement group (all at once), at most
    ``runtime.placement_timeout_s``; a note on stderr after :data:`PLACEMENT_NOTE_AFTER_S`.

    Raises:
        RayUnavailableError: not placed in time: one line naming what the bundles ask for against what
            the cluster has free (:func:`placement_shortfall`). The caller removes the group.
    """
    if group is None:
        return
    timeout = config.runtime.placement_timeout_s
    ready, _ = ray.wait([group.ready()], timeout=min(timeout, PLACEMENT_NOTE_AFTER_S))
    if not ready and timeout > PLACEMENT_NOTE_AFTER_S:
        print(f"[mtkd] waiting for the teacher replicas' placement group ({group.bundle_count} bundle(s), "
              f"all or none; up to {timeout:.0f} s)", file=sys.stderr, flush=True)
        ready, _ = ray.wait([group.ready()], timeout=timeout - PLACEMENT_NOTE_AFTER_S)
    if not ready:
        raise RayUnavailableError(f"the teacher replicas were not placed within {timeout:g} s: "
                                  f"{placement_shortfall(teacher_bundles(config))}")


def placement_shortfall(bundles: list[dict[str, float]]) -> str:
    """What ``bundles`` ask for against what the Ray cluster has free now, and what is missing, e.g.
    ``their placement group asks for CPU 2, GPU 1 and the Ray cluster has CPU 1 of 4, GPU 0 of 0 free
    (missing CPU 1, GPU 1); ...``."""
    asked: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            asked[name] = asked.get(name, 0.0) + amount
    free, total = ray.available_resources(), ray.cluster_resources()
    has = ", ".join(f"{k} {free.get(k, 0.0):g} of {total.get(k, 0.0):g}" for k in asked)
    missing = {k: v - free.get(k, 0.0) for k, v in asked.items() if v > free.get(k, 0.0) + 1e-9}
    head = (f"their placement group ({len(bundles)} bundle(s)) asks for {_amounts(asked)} and the Ray cluster has "
            f"{has} free")
    if missing:
        return (f"{head} (missing {_amounts(missing)}); free them, add nodes, or raise runtime.placement_timeout_s"
                + "".join(_hint(k) for k in missing if k != "CPU"))
    largest = max(bundles, key=lambda b: sum(b.values()))
    return (f"{head}, but no node has a bundle's {_amounts(largest)} free at once; free resources on one node, add "
            f"nodes, or raise runtime.placement_timeout_s")


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in resources.items())


def describe_teachers(handles: list[list], timeout_s: float = PLACEMENT_TIMEOUT_S) -> list[dict]:
    """The teachers' descriptions (one per teacher), once every replica is placed and loaded (at most
    ``timeout_s``).

    All replicas of a teacher must compute alike (same precision and numerics: the cache keys and
    the numbers depend on it); a replica that failed to load (a missing checkpoint, a wrong digest,
    an unreachable address) ends the run with its error in one line."""
    refs = [[replica.describe.remote() for replica in replicas] for replicas in handles]
    flat = [ref for group in refs for ref in group]
    ready, _ = ray.wait(flat, num_returns=len(flat), timeout=min(timeout_s, PLACEMENT_NOTE_AFTER_S))
    if len(ready) < len(flat) and timeout_s > PLACEMENT_NOTE_AFTER_S:
        print(f"[mtkd] waiting for {len(flat) - len(ready)} teacher actor(s) to be placed and loaded "
              f"(up to {timeout_s:.0f} s)", file=sys.stderr, flush=True)
    try:
        deadline = time.monotonic() + timeout_s
        described = [ray.get(group, timeout=max(deadline - time.monotonic(), 0.0)) for group in refs]
    except GetTimeoutError as error:
        raise RayUnavailableError(f"the teacher actors were not placed and loaded within {timeout_s:g} s "
                                  f"(runtime.placement_timeout_s); check that the cluster has the resources they ask "
                                  f"for") from error
    except RayActorError as error:
        raise RayUnavailableError(f"a teacher actor failed to start: {actor_failure(error)}") from error
    for group in described:
        name = group[0].get("name")
        precisions = sorted({str(d.get("precision")) for d in group})
        if len(precisions) > 1:
            raise RayUnavailableError(
                f"the replicas of teacher {name!r} resolved to different precisions {precisions} on their nodes; "
                f"set runtime.teacher_precision explicitly or place them on alike nodes (teachers[i].resources)")
        numerics = sorted({str(d.get("numerics")) for d in group})
        if len(numerics) > 1:
            print(f"[mtkd] warning: the replicas of teacher {name!r} run on different hardware {numerics}: their "
                  f"outputs may differ in the last bits, and the cache keys name the first", file=sys.stderr)
    return [group[0] for group in described]


def warn_if_local_cache(cache_url: str | None, private: bool) -> None:
    """On a cluster, a private Redis (``cache.url: local``) serves this node only: say so."""
    if cache_url == "local" and not private:
        print("[mtkd] warning: cache.url=local serves on this node's loopback only; teachers on other nodes "
              "compute without it (point cache.url at a shared Redis)", file=sys.stderr)


def actor_failure(error: BaseException) -> str:
    """The last ``SomeError: message`` line of a Ray actor error (its cause), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    chosen = causes[-1] if causes else (lines[0] if lines else type(error).__name__)
    return re.sub(r"^(mtkd|services)[\w.]*\.", "", chosen)


# ------------------------------------------------------------------------------- checks
def preflight(config: ExperimentConfig, storage: Path | str, name: str, resume: bool,
              run: RunDirectory | None = None) -> str | None:
    """Driver-side checks before the teachers and learners start: names, and on resume that the Ray
    Train run has a valid checkpoint (:func:`resume_checkpoint`; a newer broken one is named in a
    warning). Ray Train's record of the run's checkpoints, cut short by a process killed while
    writing it, is rebuilt from the checkpoint folders with a warning (Ray Train would refuse to
    start: :func:`services.learner.checkpoints.repair_snapshot`). (The learners'
    :class:`mtkd.session.Session` checks the pool against the data and the checkpoint, and returns
    what it refuses.)

    Returns:
        On resume, the path of the checkpoint Ray Train will hand the learners (its newest, which
        the learners then check as the driver did), else None.
    """
    model_registry(config.data.name).get(config.student)
    STRATEGIES.get(config.distill.strategy)
    if not resume:
        return None
    moved = repair_snapshot(str(storage), name)
    if moved:
        print_warning(f"Ray Train's record of the run's checkpoints was cut short (kept as {moved!r}); "
                      f"rebuilt from the checkpoint folders")
    newest = latest_checkpoint(storage, name)
    resume_checkpoint(newest, run or RunDirectory(config.output_dir), warn=print_warning)
    return newest.path


def resume_checkpoint(newest: ray.train.Checkpoint, run: RunDirectory,
                      warn: Callable[[str], None] | None = None) -> ray.train.Checkpoint:
    """The newest valid of the Ray Train run's checkpoints, from ``newest`` back (their files are
    checked against their digests and loaded); ``warn`` gets a line per newer one passed over.

    Raises:
        CheckpointError: none is valid (one line naming the run folder).
    """
    found = newest_valid(newest, warn)
    if found is None:
        raise CheckpointError(no_valid_checkpoint(run.path, with_older(newest), name=lambda c: c.path))
    return found[0]


def resumable_epoch(config: ExperimentConfig) -> int | None:
    """The epoch of the Ray run's newest valid checkpoint in its Ray Train storage (what ``--resume``
    continues after), or None: no Ray Train run recorded, or no valid checkpoint yet."""
    run = RunDirectory(Path(config.output_dir).resolve())
    record = run.path / RAY_RUN_FILE
    if not record.is_file():
        return None
    storage = config.runtime.storage_path or str(run.path / "ray")
    try:
        newest = latest_checkpoint(storage, read_json(record)["name"])
    except (CheckpointError, KeyError, TypeError):
        return None
    found = newest_valid(newest)
    return None if found is None else int(found[1][1].get("epoch", 0))


def latest_checkpoint(storage: Path | str, name: str):
    """The newest checkpoint of Ray Train run ``name`` in ``storage``: Ray Train's own record of it,
    else (that record cut short by a process killed while writing it) the newest ``checkpoint_*``
    folder there."""
    try:
        checkpoint = Result.from_path(f"{storage}/{name}").checkpoint
    except Exception as error:  # noqa: BLE001 - Ray raises several kinds for a missing run or a broken record
        checkpoint = newest_in_storage(str(storage), name)
        if checkpoint is None:
            raise CheckpointError(f"no Ray Train run {name!r} to resume in {str(storage)!r}: {error}") from error
    if checkpoint is None:
        raise CheckpointError(f"the Ray Train run {name!r} in {str(storage)!r} has no checkpoint to resume from")
    return checkpoint


def train_run_name(run: RunDirectory, storage: str, resume: bool) -> str:
    """The Ray Train run's name: the recorded one on resume (so Ray Train restores its checkpoints),
    else a fresh one (so it never reloads an earlier launch's)."""
    record = run.path / RAY_RUN_FILE
    if resume:
        if not record.is_file():
            raise CheckpointError(f"{str(run.path)!r} has no {RAY_RUN_FILE}: it was not run on Ray, resume it with "
                                  f"--runtime inprocess")
        return read_json(record)["name"]
    name = f"learner-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    write_json(record, {"name": name, "storage_path": storage})
    return name


def raise_run_error(error: dict) -> None:
    """Re-raise the library error a learner returned (:func:`services.learner.train_loop.run_error`):
    same class, else its base (a class this process has not imported), so the same exit code."""
    base = error_class(error.get("base", "")) or RuntimeError
    try:
        raised = (error_class(error["type"]) or base)(error["message"])
    except TypeError:  # a class made with more than a message (RpcFailure)
        raised = base(error["message"])
    raise raised


def worker_error(error: BaseException) -> BaseException:
    """The library error a worker raised (a bad checkpoint...); else, for a lost node, actor or
    process, a :class:`mtkd.errors.LostError` naming it (:func:`services.learner.lost.lost_error`);
    else Ray's own error."""
    for rank in sorted(getattr(error, "worker_failures", {}) or {}):
        failure = error.worker_failures[rank]
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, RUN_ERRORS):
            return cause
    return lost_error(error)


# ------------------------------------------------------------------------------- the run
def run_ray(config: ExperimentConfig, resume: bool = False, stop_after_epoch: int | None = None,
            progress: bool = True, overwrite: bool = False) -> dict:
    """Distill on Ray. Returns the same summary as :func:`mtkd.runner.run_inprocess`."""
    config.output_dir = str(Path(config.output_dir).resolve())
    for spec in config.teachers:
        teacher_source(spec)  # a malformed spec fails before any actor starts
    run = RunDirectory(config.output_dir)
    prepare_run_dir(run, resume, overwrite)
    storage = config.runtime.storage_path or str(run.path / "ray")
    name = train_run_name(run, storage, resume)
    save_config(config, run.path / "config.yaml")
    checked = preflight(config, storage, name, resume, run)
    with open_store(config.cache.url, config.cache.max_memory_mb) as store:
        link = connect_ray_keeping_sigterm(config)
        warn_if_local_cache(config.cache.url, link.private)
        try:
            return _run(config, run, storage, name, stop_after_epoch, progress, link,
                        store.url if store is not None else None, checked)
        except RayError as error:  # a node, raylet or GCS lost outside the learners: one line, exit 4
            raise lost_error(error) from error


def fit(trainer: TorchTrainer, lost: Callable[[], str | None] | None = None):
    """``trainer.fit()`` in a helper thread, the main thread waiting: Ray Train registers its own
    SIGINT handler when fit runs on the main thread (it aborts the run, and fit then returns as if
    the run had ended), which would pre-empt this process's. Here SIGINT/SIGTERM reach the main
    thread's handlers (``mtkd distill``: stop, clean up, say how to continue).

    ``lost`` (:func:`services.learner.lost.private_ray_lost`) is asked while waiting: once it has named
    a lost raylet or GCS of the private Ray for :data:`RAY_LOST_GRACE_S` and fit has not ended, the
    wait ends with a :class:`mtkd.errors.LostError` naming it (Ray restores neither; fit would
    otherwise wait on a Ray that no longer answers, or this process's Ray client end it without a
    word when it gives up on the GCS)."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="mtkd-train-fit", daemon=True)
    thread.start()
    lost_since = None
    while thread.is_alive():
        thread.join(0.2)
        what = lost() if lost is not None and thread.is_alive() else None
        lost_since = (lost_since or time.monotonic()) if what else None
        if what and time.monotonic() - lost_since >= RAY_LOST_GRACE_S:
            raise LostError(what)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _run(config: ExperimentConfig, run: RunDirectory, storage: str, name: str, stop_after_epoch: int | None,
         progress: bool, link: RayLink, cache_url: str | None, checked_checkpoint: str | None = None) -> dict:
    teacher_handles: list[list] = []
    agent = events = group = None
    try:
        use_gpu = learners_use_gpu(config)
        check_resources(config, use_gpu, link.private)
        group = teacher_placement_group(config)  # removed in finally, whatever happens next
        wait_for_placement(group, config)
        start_teacher_actors(config, into=teacher_handles, cache_url=cache_url, group=group)
        descriptions = describe_teachers(teacher_handles, config.runtime.placement_timeout_s)
        train_set, _ = load_data(config.data, config.seed)
        if needs_agent_actor(config):  # else the learner's engine builds the agent in its own process
            task = task_for_dataset(train_set, config.distill.region_grid)
            agent = start_agent_actor(*task.state_layout(descriptions, _num_classes(descriptions)), **agent_kwargs(config))
        events = Queue(actor_options=driver_node_actor())
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop,
            train_loop_config={"experiment": to_dict(config), "teacher_handles": teacher_handles, "agent": agent,
                               "events": events, "cache_url": cache_url, "stop_after_epoch": stop_after_epoch,
                               "checked_checkpoint": checked_checkpoint},
            scaling_config=ScalingConfig(num_workers=config.runtime.num_learners, use_gpu=use_gpu,
                                         resources_per_worker=learner_demand(config, use_gpu)),
            run_config=RunConfig(name=name, storage_path=storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                                 failure_config=FailureConfig(max_failures=config.runtime.max_failures),
                                 # the driver prints one line per epoch; Ray Train's own INFO lines are noise
                                 logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        with EventWriter(events, run, config.optim.epochs, plot_title(config), progress) as writer:
            try:
                result = fit(trainer, private_ray_lost if link.started else None)
            except Exception as error:  # TrainingFailedError after the allowed restarts
                raise worker_error(error) from error
        if result.return_value and "error" in result.return_value:
            raise_run_error(result.return_value["error"])
        return summarise(config, run, result, train_set, descriptions, writer.history)
    except Exception as error:  # the private Ray's raylet or GCS lost: that is what the run lost, whatever Ray raised
        what = private_ray_lost() if link.started else None
        if what and not (isinstance(error, LostError) and str(error) == what):
            raise LostError(what) from error
        raise
    finally:
        # with the private Ray's raylet or GCS gone, its actors went with it (or go with ray.shutdown), and
        # killing them would wait on a GCS that no longer answers
        if not (link.started and private_ray_lost()):
            stop_actors(teacher_handles)
            for actor in (agent, getattr(events, "actor", None)):
                if actor is not None:
                    ray.kill(actor)
            if group is not None:
                remove_placement_group(group)
        if link.started:
            ray.shutdown()


def driver_node_actor() -> dict:
    """Actor options of the run's event queue: no CPU, on the driver's node where it can (a CPU-less
    actor may land on any node, and one that carries only the driver's events should not be lost
    with another node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}


def summarise(config: ExperimentConfig, run: RunDirectory, result, train_set, descriptions: list[dict],
              history: list[dict]) -> dict:
    """Download the final checkpoint into the run folder, export the student, return the summary."""
    if result.checkpoint is None:
        raise CheckpointError("the learners reported no checkpoint")
    epoch = int(result.metrics["epoch"])
    folder = run.checkpoint_dir(epoch)
    # downloaded into a hidden folder, verified, renamed into place; only then are older ones pruned
    write_checkpoint_folder(folder, lambda partial: result.checkpoint.to_directory(str(partial)))
    run.prune(KEEP_CHECKPOINTS)
    state, _ = load_checkpoint(folder)
    summary = finish(config, run, train_set, descriptions, history, state["module"], epoch)
    return {**summary, "runtime": "ray", "ray_run": str(result.path), "history": history}


def _num_classes(descriptions: list[dict]) -> int:
    classes = {int(d["num_classes"]) for d in descriptions}
    if len(classes) != 1:
        raise PoolMismatchError(f"teachers disagree on the class count: {sorted(classes)}")
    return classes.pop()


def _train_loop(loop_config: dict) -> dict:
    # Imported in the worker so that the driver does not need the learner's imports at pickling time.
    from services.learner.train_loop import train_loop_per_worker

    return train_loop_per_worker(loop_config)


__all__ = ["RayLink", "RayUnavailableError", "check_resources", "cluster_address", "connect_ray", "ensure_ray",
           "learner_demand", "logical_cpus_needed", "preflight", "run_ray", "worker_error"]
