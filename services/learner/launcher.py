"""``mtkd distill`` on Ray: start (or join) Ray, the teacher actors and the agent actor, then run
the learner with a Ray Train ``TorchTrainer``."""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import ray
from ray.train import CheckpointConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from mtkd.checkpoint import META_FILE, read_json
from mtkd.cli import USER_ERRORS
from mtkd.config import ExperimentConfig, save_config, to_dict
from mtkd.data import load_dataset
from mtkd.distill import STRATEGIES
from mtkd.engine import agent_kwargs, check_pool
from mtkd.experiment import RunDirectory
from mtkd.models import MODELS
from mtkd.runner import KEEP_CHECKPOINTS, check_resumable, prepare_run_dir
from services.agent.actor import start_agent_actor
from services.teacher_server.pool import start_teacher_actors, stop_actors, teacher_source

# Ray Train polls its workers every 2 s by default; a short run would spend most of its time waiting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def teacher_replicas(config: ExperimentConfig) -> int:
    """Teacher actors the run starts (at least one per teacher)."""
    return sum(max(1, t.replicas) for t in config.teachers)


def logical_cpus_needed(config: ExperimentConfig) -> float:
    """CPUs the run's actors ask Ray for: learners plus teacher replicas."""
    rt = config.runtime
    return rt.num_learners * rt.learner_num_cpus + teacher_replicas(config) * rt.teacher_num_cpus


def ensure_ray(config: ExperimentConfig) -> bool:
    """Connect to ``runtime.address`` or start a private local Ray; returns True if started here.

    A private Ray advertises at least the logical CPUs the run's actors ask for: teachers and the
    learner take turns (the learner waits on the teachers' outputs), so they can share cores.
    """
    if ray.is_initialized():
        return False
    address = config.runtime.address
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        num_cpus = max(float(os.cpu_count() or 1), logical_cpus_needed(config))
        # Without the dashboard, Ray Train's placement-group cleaner cannot reach the state API and
        # warns every second; worker-side Ray logs are kept to errors (our progress lines still show).
        ray.init(address="local", num_cpus=int(-(-num_cpus // 1)), include_dashboard=False,
                 logging_level=logging.WARNING, logging_config=ray.LoggingConfig(log_level="ERROR"))
    return True


def check_resources(config: ExperimentConfig) -> None:
    """Refuse a run whose actors cannot all be placed (they would wait forever)."""
    resources = ray.cluster_resources()
    replicas = teacher_replicas(config)
    problems = []
    cpus, cpus_needed = float(resources.get("CPU", 0.0)), logical_cpus_needed(config)
    if cpus_needed > cpus + 1e-9:
        problems.append(f"the run's actors ask for {cpus_needed:g} CPUs ({config.runtime.num_learners} learner(s) x "
                        f"{config.runtime.learner_num_cpus:g}, {replicas} teacher replica(s) x "
                        f"{config.runtime.teacher_num_cpus:g}) but the Ray cluster has {cpus:g}; lower "
                        f"runtime.teacher_num_cpus or runtime.learner_num_cpus, or add nodes")
    gpus, gpus_needed = float(resources.get("GPU", 0.0)), replicas * config.runtime.teacher_num_gpus
    if gpus_needed > gpus + 1e-9:
        problems.append(f"the teacher actors ask for {gpus_needed:g} GPUs but the Ray cluster has {gpus:g}; "
                        f"set runtime.teacher_num_gpus=0 to run teachers on CPUs")
    for message in problems:
        if config.runtime.address:  # an autoscaling cluster may still grow
            logging.getLogger(__name__).warning(message)
        else:
            raise ValueError(message)


def preflight(config: ExperimentConfig, descriptions: list[dict], run: RunDirectory, resume: bool) -> Path | None:
    """Driver-side checks before a learner starts; returns the checkpoint folder to resume from (or None).

    Names, the pool against the dataset, and on resume the pool and student against the run's
    newest checkpoint: a mistake fails here, in seconds, with the library's own error.
    """
    MODELS.get(config.student)
    STRATEGIES.get(config.distill.strategy)
    dataset = load_dataset(config.data.name, config.data.root, "train")
    check_pool(descriptions, dataset.num_classes, dataset.image_shape)
    if not resume:
        return None
    folder = run.checkpoint_to_resume()
    check_resumable(read_json(folder / META_FILE), descriptions, config.student)
    return folder


def worker_error(error: TrainingFailedError) -> BaseException:
    """The library error a worker raised (NaN loss, bad checkpoint...), else Ray's own error."""
    for rank in sorted(getattr(error, "worker_failures", {}) or {}):
        failure = error.worker_failures[rank]
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, USER_ERRORS):
            return cause
    return error


def run_ray(config: ExperimentConfig, resume: bool = False, stop_after_epoch: int | None = None,
            progress: bool = True, overwrite: bool = False) -> dict:
    """Distill on Ray. Returns the same summary as :func:`mtkd.runner.run_inprocess`."""
    config.output_dir = str(Path(config.output_dir).resolve())
    for spec in config.teachers:
        teacher_source(spec)  # a malformed spec fails before any actor starts
    run = RunDirectory(config.output_dir)
    prepare_run_dir(run, resume, overwrite)
    save_config(config, run.path / "config.yaml")
    started = ensure_ray(config)
    teacher_handles: list[list] = []
    agent = None
    try:
        check_resources(config)
        start_teacher_actors(config, into=teacher_handles)
        descriptions = ray.get([replicas[0].describe.remote() for replicas in teacher_handles], timeout=600)
        resume_from = preflight(config, descriptions, run, resume)
        strategy = STRATEGIES.get(config.distill.strategy)
        if strategy.needs_agent:
            agent = start_agent_actor([int(d["embedding_dim"]) for d in descriptions], _num_classes(descriptions),
                                      **agent_kwargs(config))
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop,
            train_loop_config={"experiment": to_dict(config), "teacher_handles": teacher_handles, "agent": agent,
                               "stop_after_epoch": stop_after_epoch, "progress": progress,
                               "resume_from": str(resume_from) if resume_from else None},
            scaling_config=ScalingConfig(num_workers=config.runtime.num_learners, use_gpu=False,
                                         resources_per_worker={"CPU": config.runtime.learner_num_cpus}),
            # A fresh name per launch: Ray Train would otherwise reload an earlier launch's checkpoints.
            run_config=RunConfig(name=f"learner-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                                 storage_path=str(run.path / "ray"),
                                 checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)),
        )
        try:
            trainer.fit()
        except TrainingFailedError as error:
            raise worker_error(error) from error
    finally:
        stop_actors(teacher_handles)
        if agent is not None:
            ray.kill(agent)
        if started:
            ray.shutdown()
    history = run.read(run.metrics_path)
    return {"run_dir": str(run.path), "epochs": history[-1]["epoch"] if history else 0,
            "test_acc": history[-1]["test/acc"] if history else None, "plot": str(run.plot_path),
            "student": str(run.path / "student"), "runtime": "ray", "history": history}


def _num_classes(descriptions: list[dict]) -> int:
    classes = {int(d["num_classes"]) for d in descriptions}
    if len(classes) != 1:
        raise ValueError(f"teachers disagree on the class count: {sorted(classes)}")
    return classes.pop()


def _train_loop(loop_config: dict) -> None:
    # Imported in the worker so that the driver does not need the learner's imports at pickling time.
    from services.learner.train_loop import train_loop_per_worker

    train_loop_per_worker(loop_config)


__all__ = ["check_resources", "ensure_ray", "logical_cpus_needed", "preflight", "run_ray", "worker_error"]
