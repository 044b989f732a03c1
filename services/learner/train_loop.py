"""The learner: :func:`train_loop_per_worker` runs the in-process engine inside a Ray Train worker.

Ray appears only at the seams (as in Ray Train's own examples):

* ``ray.train.torch.get_device()`` and ``ray.train.torch.prepare_model`` (DistributedDataParallel:
  gloo on CPU, NCCL on GPU) with several learners;
* ``ray.train.get_checkpoint()`` first: a restarted (or resumed) learner continues from the newest
  checkpoint in Ray Train's storage;
* ``ray.train.report(metrics, checkpoint)`` after every epoch (rank 0 writes the checkpoint to a
  temporary folder; Ray Train persists it to ``storage_path``).

Everything else is :mod:`mtkd.engine` and :func:`mtkd.runner.fit`. The learners never write the
driver's run folder: rank 0 sends its log lines to the driver (:mod:`services.learner.events`).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from mtkd.cache import CacheContext, dataset_cache_id
from mtkd.cli import USER_ERRORS
from mtkd.config import ExperimentConfig, from_dict
from mtkd.distill import STRATEGIES
from mtkd.engine import Distiller, teacher_fields
from mtkd.experiment import eval_loader, load_checkpoint, load_data, save_checkpoint, train_loader
from mtkd.runner import FitHooks, check_resumable, fit, run_meta
from services.agent.proxy import AgentProxy
from services.cache import RedisStore
from services.learner.collective import all_true, parameter_digests, world
from services.learner.events import EventSender
from services.teacher_server.pool import RayTeacherPool


class LearnersDiverged(RuntimeError):
    """The learners' parameters differ after an epoch (DistributedDataParallel keeps them equal)."""


def quiet_ray_train_logs() -> None:
    """Ray Train's worker logs every report with its whole metrics dict at INFO, under a logger named
    after its file (so ``RunConfig.logging_config`` does not reach it); the driver prints one line per epoch."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def learner_device(config: ExperimentConfig) -> torch.device:
    """The device Ray Train gave this worker (its GPU when the run uses GPUs), else the CPU."""
    return ray.train.torch.get_device() if config.runtime.device != "cpu" else torch.device("cpu")


def wrap_for_data_parallel(config: ExperimentConfig, device: torch.device):
    """``prepare_model`` (DistributedDataParallel; SyncBatchNorm first if asked) with several learners."""
    if world()[1] == 1:
        return None

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if config.runtime.sync_batchnorm:
            if device.type != "cuda":
                raise ValueError("runtime.sync_batchnorm needs learners on CUDA (SyncBatchNorm has no CPU kernels); "
                                 "set runtime.device=cuda or runtime.sync_batchnorm=false")
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return ray.train.torch.prepare_model(module, move_to_device=device)

    return wrap


def restore(distiller: Distiller) -> None:
    """Continue from Ray Train's newest checkpoint, if any (a restart, or ``--resume``)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        state, meta = load_checkpoint(Path(folder))
    check_resumable(meta, distiller.descriptions, distiller.config.student)
    distiller.load_state_dict(state)


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train worker loop.

    ``loop_config``: ``experiment`` (the config as a dict), ``teacher_handles`` (per teacher, its
    replica actor handles), ``agent`` (the agent actor handle or None), ``events`` (the queue to the
    driver), ``cache_url`` (the teachers' Redis or None), ``stop_after_epoch``.

    Returns (rank 0's is the run's ``Result.return_value``): ``{"epochs": N}``, or ``{"error": ...}``
    when the run itself failed (a NaN loss, a checkpoint that does not fit): such errors would fail
    again on a restart, so every learner stops at the same point and the driver raises it.
    """
    quiet_ray_train_logs()
    config = from_dict(ExperimentConfig, loop_config["experiment"])
    rank, world_size = world()
    device = learner_device(config)
    torch.manual_seed(config.seed)
    try:
        train_set, test_set = load_data(config.data, config.seed)
        cache = None
        if loop_config.get("cache_url"):
            cache = (RedisStore(loop_config["cache_url"]),
                     CacheContext(dataset_cache_id(train_set), config.data.crop_padding, config.cache.value_dtype))
        pool = RayTeacherPool(loop_config["teacher_handles"], fields=teacher_fields(STRATEGIES.get(config.distill.strategy)),
                              half_precision=config.runtime.half_precision, max_in_flight=config.runtime.prefetch + 1,
                              cache=cache)
        agent = AgentProxy(loop_config["agent"], device=device) if loop_config.get("agent") is not None else None
        distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape, agent=agent, device=device,
                              wrap_module=wrap_for_data_parallel(config, device),
                              agree=(lambda flag: all_true(flag, device)) if world_size > 1 else None)
        restore(distiller)
        train_ld = train_loader(train_set, config.data, config.seed, rank, world_size)
        events = EventSender(loop_config.get("events") if rank == 0 else None)
        events.start(distiller.epoch, distiller.global_step, len(train_ld))

        def report(metrics: dict) -> None:
            if world_size > 1:
                digests = parameter_digests(distiller.module)
                metrics["learner/param_digests"] = digests
                if len(set(digests)) != 1:
                    raise LearnersDiverged(f"learner parameters differ after epoch {metrics['epoch']}: {digests}")
            metrics["learner/world_size"] = world_size
            metrics["learner/node_id"] = ray.get_runtime_context().get_node_id()
            if rank != 0:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(Path(folder), distiller.state_dict(), run_meta(config, distiller, train_set, metrics))
                events.epoch(metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

        hooks = FitHooks(write=False, progress=False, evaluate=rank == 0, after_step=events.step, after_epoch=report)
        try:
            fit(distiller, train_ld, eval_loader(test_set, config.data), None, train_set, hooks,
                loop_config.get("stop_after_epoch"))
        finally:
            pool.close()
    except USER_ERRORS as error:
        return {"error": {"type": type(error).__name__, "message": str(error)}}
    return {"epochs": distiller.epoch}
