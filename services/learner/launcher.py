"""``mtkd distill`` on Ray: start (or join) Ray, the teacher actors and the agent actor, then run
the learner with a Ray Train ``TorchTrainer``."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mtkd.config import ExperimentConfig, save_config, to_dict
from mtkd.experiment import RunDirectory
from mtkd.runner import prepare_run_dir
from services.agent.actor import start_agent_actor
from services.teacher_server.pool import start_teacher_actors, stop_actors

# Ray Train polls its workers every 2 s by default; a short run would spend most of its time waiting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def logical_cpus_needed(config: ExperimentConfig) -> float:
    """CPUs the run's actors ask Ray for: learners plus teacher replicas."""
    rt = config.runtime
    replicas = sum(max(1, t.replicas) for t in config.teachers)
    return rt.num_learners * rt.learner_num_cpus + replicas * rt.teacher_num_cpus


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
    available = float(ray.cluster_resources().get("CPU", 0.0))
    needed = logical_cpus_needed(config)
    if needed > available + 1e-9:
        message = (f"the run's actors ask for {needed:g} CPUs ({config.runtime.num_learners} learner(s) x "
                   f"{config.runtime.learner_num_cpus:g}, teacher replicas x {config.runtime.teacher_num_cpus:g}) "
                   f"but the Ray cluster has {available:g}; lower runtime.teacher_num_cpus or "
                   f"runtime.learner_num_cpus, or add nodes")
        if config.runtime.address:  # an autoscaling cluster may still grow
            logging.getLogger(__name__).warning(message)
        else:
            raise ValueError(message)


def run_ray(config: ExperimentConfig, resume: bool = False, stop_after_epoch: int | None = None,
            progress: bool = True, overwrite: bool = False) -> dict:
    """Distill on Ray. Returns the same summary as :func:`mtkd.runner.run_inprocess`."""
    config.output_dir = str(Path(config.output_dir).resolve())
    run = RunDirectory(config.output_dir)
    prepare_run_dir(run, resume, overwrite)
    save_config(config, run.path / "config.yaml")
    started = ensure_ray(config)
    teacher_handles, agent = [], None
    try:
        check_resources(config)
        teacher_handles = start_teacher_actors(config)
        descriptions = ray.get([replicas[0].describe.remote() for replicas in teacher_handles], timeout=600)
        if config.distill.strategy == "mtkd_rl":
            a = config.agent
            agent = start_agent_actor([int(d["embedding_dim"]) for d in descriptions], _num_classes(descriptions),
                                      rule=a.rule, mixing=a.mixing, agent_step=a.agent_step, lr=a.lr,
                                      concentration=a.concentration, seed=config.seed + 2)
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop,
            train_loop_config={"experiment": to_dict(config), "teacher_handles": teacher_handles, "agent": agent,
                               "resume": resume, "stop_after_epoch": stop_after_epoch, "progress": progress},
            scaling_config=ScalingConfig(num_workers=config.runtime.num_learners, use_gpu=False,
                                         resources_per_worker={"CPU": config.runtime.learner_num_cpus}),
            run_config=RunConfig(name="learner", storage_path=str(run.path / "ray")),
        )
        trainer.fit()
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


__all__ = ["check_resources", "ensure_ray", "logical_cpus_needed", "run_ray"]
