"""The learner: :func:`train_loop_per_worker` runs the in-process engine inside a Ray Train worker.

Ray appears only at the seams: the worker's rank and world size, gradient averaging across
workers, and ``ray.train.report`` with a ``Checkpoint`` after each epoch. Everything else is
:mod:`mtkd.engine` and :func:`mtkd.runner.fit`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from mtkd.checkpoint import state_dict_digest
from mtkd.config import ExperimentConfig, from_dict
from mtkd.engine import Distiller
from mtkd.experiment import RunDirectory, eval_loader, load_data, train_loader
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


def check_replicas_in_sync(module: torch.nn.Module) -> None:
    """Raise if the workers' parameters differ (gradient averaging keeps them equal bit for bit).

    Batch-norm running statistics are each worker's own and are not compared.
    """
    digest = state_dict_digest(dict(module.named_parameters()))
    mine = torch.tensor([int(digest[:15], 16)], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if len({int(t) for t in everyone}) != 1:
        raise RuntimeError(f"learner workers diverged: parameter digests {[hex(int(t)) for t in everyone]}")


def _restore(distiller: Distiller, run: RunDirectory, folder: str | None, rank: int) -> None:
    """Continue from the checkpoint folder the launcher resumes from, if any (checked again against
    the pool); only rank 0 rewrites the run's logs."""
    if folder:
        resume_into(distiller, run, Path(folder), write=rank == 0)


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO; our own per-epoch line says it."""
    from ray.train.v2._internal.execution import context as train_context

    for name in ("ray.train", train_context.__file__):  # the context module names its logger by file
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker loop.

    ``loop_config``: ``experiment`` (the config as a dict), ``teacher_handles`` (per teacher, its
    replica actor handles), ``agent`` (the agent actor handle or None), ``stop_after_epoch``,
    ``progress``, ``resume_from`` (a checkpoint folder, checked by the launcher, or None).
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
    _restore(distiller, run, loop_config.get("resume_from"), rank)

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
    if world_size > 1:
        check_replicas_in_sync(distiller.module)
    if rank == 0:
        finish(distiller, run, train_set, history)
