"""The learner: :func:`train_loop_per_worker` runs a :class:`mtkd.session.Session` inside a Ray
Train worker, as an explicit epoch loop like Ray Train's own examples:

1. build the session: the data, a :class:`RayTeacherPool` over the teacher actors, the engine
   (``ray.train.torch.prepare_model``, i.e. DistributedDataParallel, with several learners);
2. ``ray.train.get_checkpoint()``: a restarted (or resumed) learner continues from the newest
   valid checkpoint in Ray Train's storage (a newer one whose files fail their digests or do not
   load is passed over: :mod:`services.learner.checkpoints`);
3. per epoch: train (rank 0 evaluates), check that the learners' parameters agree, then
   ``ray.train.report(metrics, checkpoint)`` (rank 0 writes the checkpoint to a temporary folder;
   Ray Train persists it to ``storage_path``).

The learners never write the driver's run folder: rank 0 sends its log lines to the driver
(:mod:`services.learner.events`).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.exceptions import RayTaskError

from mtkd.checkpoint import CheckpointError
from mtkd.config import ConfigError, ExperimentConfig, from_dict
from mtkd.distill import STRATEGIES
from mtkd.engine import teacher_fields
from mtkd.errors import RUN_ERRORS, NumericError, UserError
from mtkd.session import Session
from services.agent.proxy import AgentProxy
from services.cache import RedisStore
from services.learner.checkpoints import newest_valid
from services.learner.collective import all_true, parameter_digests
from services.learner.events import EventSender
from services.teacher_server.pool import RayTeacherPool
from services.tracking import learner_tracker


class LearnersDiverged(RuntimeError):
    """The learners' parameters differ after an epoch (DistributedDataParallel keeps them equal)."""


def quiet_worker_logs() -> None:
    """Keep this worker's own INFO lines off the console: Ray Train logs every report, with its
    whole metrics dict, at INFO under a logger outside ``ray.train`` (so ``RunConfig.logging_config``
    does not reach it), through the root logger it configures at INFO. The driver prints one line
    per epoch; warnings and errors still show."""
    logging.getLogger().setLevel(logging.WARNING)


def learner_device(config: ExperimentConfig) -> torch.device:
    """The device Ray Train gave this worker (its GPU when the run uses GPUs), else the CPU."""
    return ray.train.torch.get_device() if config.runtime.device != "cpu" else torch.device("cpu")


def wrap_for_data_parallel(config: ExperimentConfig, device: torch.device, world_size: int):
    """``prepare_model`` (DistributedDataParallel; SyncBatchNorm first if asked) with several learners."""
    if world_size == 1:
        return None

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if config.runtime.sync_batchnorm:
            if device.type != "cuda":
                raise ConfigError("runtime.sync_batchnorm needs learners on CUDA (SyncBatchNorm has no CPU kernels); "
                                 "set runtime.device=cuda or runtime.sync_batchnorm=false")
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return ray.train.torch.prepare_model(module, move_to_device=device)

    return wrap


def check_learners_agree(session: Session, metrics: dict) -> None:
    """With several learners, record every learner's parameter digest in ``metrics`` and raise
    :class:`LearnersDiverged` if they differ."""
    if session.world_size == 1:
        return
    digests = parameter_digests(session.distiller.module)
    metrics["learner/param_digests"] = digests
    if len(set(digests)) != 1:
        raise LearnersDiverged(f"learner parameters differ after epoch {metrics['epoch']}: {digests}")


def run_error(error: BaseException) -> dict:
    """What a learner returns for an expected error (:data:`mtkd.errors.RUN_ERRORS`): ``type``, its
    class name; ``base``, ``UserError`` or ``NumericError``; ``message``. An error raised in an actor
    (a teacher's) is sent as its cause."""
    if isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    base = NumericError if isinstance(error, NumericError) else UserError
    return {"type": type(error).__name__, "base": base.__name__, "message": str(error)}


def restore_newest_valid(session: Session, checkpoint: ray.train.Checkpoint, warn: bool) -> dict:
    """Continue from ``checkpoint`` or, when its files fail their digests or do not load, from the
    newest valid one before it in the storage; with ``warn``, log (WARNING) each one passed over
    (the driver has already named those of the checkpoint it checked before the run). Returns the
    metrics of the epoch the restored checkpoint ends (from its meta).

    Raises:
        CheckpointError: none is valid.
    """
    log = logging.getLogger(__name__)
    found = newest_valid(checkpoint, warn=(lambda line: log.warning("[mtkd] warning: %s", line)) if warn else None)
    if found is None:
        raise CheckpointError(f"no valid checkpoint to resume from in {checkpoint.path!r} or before it")
    _, (state, meta) = found
    session.load(state, meta)
    return meta.get("metrics") or {}


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train worker loop.

    Args:
        loop_config: ``experiment`` (the config as a dict), ``teacher_handles`` (per teacher, its
            replica actor handles), ``agent`` (the agent actor's handle, or None: the engine builds
            its agent in this process), ``events`` (the queue to the driver), ``cache_url`` (the
            teachers' Redis or None), ``stop_after_epoch``, ``checked_checkpoint`` (on ``--resume``,
            the path of the Ray Train checkpoint the driver checked, and warned about, before the run).

    Returns:
        Rank 0's is the run's ``Result.return_value``: ``{"epochs": N}``, or ``{"error":
        run_error(...)}`` when the run itself failed (a NaN loss, a checkpoint that does not fit, a pool
        that does not fit the data): such errors would fail again on a restart, so every learner
        stops at the same point and the driver raises it.
    """
    quiet_worker_logs()
    config = from_dict(ExperimentConfig, loop_config["experiment"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = learner_device(config)
    pool = RayTeacherPool(loop_config["teacher_handles"],
                          fields=teacher_fields(STRATEGIES.get(config.distill.strategy)),
                          half_precision=config.runtime.half_precision, max_in_flight=config.runtime.prefetch + 1)
    try:
        agent = AgentProxy(loop_config["agent"], device=device) if loop_config.get("agent") is not None else None
        session = Session.build(
            config, pool, store=RedisStore(loop_config["cache_url"]) if loop_config.get("cache_url") else None,
            device=device, agent=agent, wrap_module=wrap_for_data_parallel(config, device, world_size),
            agree=(lambda flag: all_true(flag, device)) if world_size > 1 else None, rank=rank, world_size=world_size)
        checkpoint, restored = ray.train.get_checkpoint(), None
        if checkpoint is not None:
            already_named = checkpoint.path == loop_config.get("checked_checkpoint")  # by the driver, on --resume
            restored = restore_newest_valid(session, checkpoint, warn=rank == 0 and not already_named)
        events = EventSender(loop_config.get("events") if rank == 0 else None)
        events.start(session.epoch, session.distiller.global_step, len(session.train_loader), restored)
        with learner_tracker(config, rank, fresh=checkpoint is None) as tracker:  # rank 0, tracking on: MLflow, TB
            for _ in session.epochs(loop_config.get("stop_after_epoch")):
                metrics = session.train_epoch(events.step)
                check_learners_agree(session, metrics)
                metrics["learner/world_size"] = world_size
                metrics["learner/node_id"] = ray.get_runtime_context().get_node_id()
                if rank != 0:
                    ray.train.report(metrics)
                    continue
                with tempfile.TemporaryDirectory() as folder:
                    session.save(Path(folder), metrics)
                    events.epoch(metrics)
                    tracker.log_epoch(metrics)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            tracker.log_final_student(session)
    except RUN_ERRORS as error:
        return {"error": run_error(error)}
    finally:
        pool.close()
    return {"epochs": session.epoch}
