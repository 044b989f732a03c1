"""The learner: :func:`train_loop_per_worker` runs the in-process engine inside a Ray Train worker.

Ray appears only at the seams: the worker's rank and world size, gradient averaging across
workers, ``ray.train.report`` with a ``Checkpoint`` after each epoch, and ``ray.train.get_checkpoint``
to resume. Everything else is :mod:`mtkd.engine` and :func:`mtkd.runner.fit`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from mtkd.config import ExperimentConfig, from_dict
from mtkd.engine import Distiller
from mtkd.experiment import RunDirectory, eval_loader, load_checkpoint, load_data, train_loader
from mtkd.runner import FitHooks, finish, fit, resume_into
from services.agent.actor import proxy_for
from services.teacher_server.pool import RayTeacherPool


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce the gradients of ``module`` (one flat buffer) and divide by the world size."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _restore(distiller: Distiller, run: RunDirectory, resume: bool) -> None:
    """Ray's own checkpoint (a restarted worker group) first, then ``--resume RUN_DIR``."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, _ = load_checkpoint(Path(folder))
        distiller.load_state_dict(state)
    elif resume:
        resume_into(distiller, run)


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO; our own per-epoch line says it."""
    from ray.train.v2._internal.execution import context as train_context

    for name in ("ray.train", train_context.__file__):  # the context module names its logger by file
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker loop.

    ``loop_config``: ``experiment`` (the config as a dict), ``teacher_handles`` (per teacher, its
    replica actor handles), ``agent`` (the agent actor handle or None), ``resume``,
    ``stop_after_epoch``, ``progress``.
    """
    quiet_ray_train_logs()
    config = from_dict(ExperimentConfig, loop_config["experiment"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    train_set, test_set = load_data(config.data, config.seed)
    pool = RayTeacherPool(loop_config["teacher_handles"], half_precision=config.runtime.half_precision,
                          max_in_flight=config.runtime.prefetch + 1)
    agent = proxy_for(loop_config["agent"]) if loop_config.get("agent") is not None else None
    distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape, agent=agent,
                          grad_sync=average_gradients if world_size > 1 else None)
    run = RunDirectory(config.output_dir)
    _restore(distiller, run, loop_config.get("resume", False))

    def report(metrics: dict, folder: Path | None) -> None:
        metrics = {**metrics, "learner/world_size": world_size}
        if folder is not None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        else:
            ray.train.report(metrics)

    # Only rank 0 writes the run folder; the other ranks train on their shards.
    hooks = FitHooks(write=rank == 0, progress=rank == 0 and loop_config.get("progress", False), after_epoch=report)
    history = fit(distiller, train_loader(train_set, config.data, config.seed, rank, world_size),
                  eval_loader(test_set, config.data), run, train_set, hooks, loop_config.get("stop_after_epoch"))
    if rank == 0:
        finish(distiller, run, train_set, history)
