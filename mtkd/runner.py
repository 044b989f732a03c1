"""The in-process runtime: ``mtkd distill --runtime inprocess`` (the reference engine).

The epoch loop here (:func:`fit`) is shared with the Ray learner, which passes its own hooks.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from mtkd.checkpoint import CheckpointError
from mtkd.config import ExperimentConfig, save_config
from mtkd.engine import Distiller
from mtkd.experiment import (RunDirectory, eval_loader, export_student, load_checkpoint, load_data, save_checkpoint,
                             train_loader)
from mtkd.plot import plot_run
from mtkd.teachers import LocalTeacherPool, check_same_pool, load_teacher, teacher_manifest

KEEP_CHECKPOINTS = 2


@dataclass
class FitHooks:
    """Where the runtimes differ. ``write``: this process writes the run folder (rank 0).
    ``after_epoch(metrics, checkpoint_folder)``: e.g. ``ray.train.report``."""

    write: bool = True
    progress: bool = True
    after_epoch: Callable[[dict, Path | None], None] | None = None


def load_local_pool(config: ExperimentConfig) -> LocalTeacherPool:
    """Load every teacher of the config in this process."""
    teachers = []
    for spec in config.teachers:
        if spec.checkpoint is None:
            raise ValueError(f"teacher {spec.name or spec.address!r} has no checkpoint; teachers served over gRPC "
                             f"(address) need the Ray runtime")
        teachers.append(load_teacher(spec.checkpoint, spec.name or None))
    return LocalTeacherPool(teachers)


def run_meta(config: ExperimentConfig, distiller: Distiller, train_set, metrics: dict | None = None) -> dict:
    """What a checkpoint records besides tensors: epoch, step, teacher manifest, data, student."""
    return {
        "epoch": distiller.epoch, "global_step": distiller.global_step, "student": config.student,
        "teachers": teacher_manifest(distiller.descriptions), "dataset": {"name": train_set.name,
                                                                          "digest": train_set.digest},
        "num_classes": train_set.num_classes, "input_shape": list(train_set.image_shape), "metrics": metrics or {},
    }


def check_resumable(meta: dict, descriptions: list[dict], student: str) -> None:
    """Refuse to continue a checkpoint (its ``meta``) with another teacher pool or student."""
    check_same_pool(meta["teachers"], teacher_manifest(descriptions))
    if meta["student"] != student:
        raise CheckpointError(f"student differs: the run trains {meta['student']!r}, got {student!r}")


def resume_into(distiller: Distiller, run: RunDirectory, folder: Path | None = None, write: bool = True) -> None:
    """Load a checkpoint (default: the newest of ``run``) into ``distiller``; refuse a different pool
    or student. With ``write``, drop the log lines of work done after that checkpoint."""
    state, meta = load_checkpoint(folder or run.checkpoint_to_resume())
    check_resumable(meta, distiller.descriptions, distiller.config.student)
    distiller.load_state_dict(state)
    if write:
        run.truncate(run.metrics_path, "epoch", distiller.epoch)
        run.truncate(run.steps_path, "step", distiller.global_step)


def fit(distiller: Distiller, train_ld, test_ld, run: RunDirectory, train_set, hooks: FitHooks,
        stop_after_epoch: int | None = None) -> list[dict]:
    """Train from ``distiller.epoch`` to ``optim.epochs``: per epoch train, evaluate, log, checkpoint."""
    config = distiller.config
    history = run.read(run.metrics_path) if hooks.write else []
    last_epoch = min(config.optim.epochs, stop_after_epoch or config.optim.epochs)
    while distiller.epoch < last_epoch:
        bar = tqdm(total=len(train_ld), desc=f"epoch {distiller.epoch + 1}/{config.optim.epochs}",
                   disable=not hooks.progress, leave=False, file=sys.stderr, mininterval=1.0)

        def on_step(step: int, batch, result) -> None:
            if hooks.write:
                run.append(run.steps_path, {"step": step, "epoch": distiller.epoch + 1, "batch": batch.index,
                                            "loss": result.loss, "ce": result.ce, "kd": result.kd,
                                            "feature": result.feature})
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{result.correct / result.batch:.3f}", refresh=False)

        metrics = distiller.train_epoch(train_ld, on_step)
        bar.close()
        metrics.update(distiller.evaluate(test_ld))
        folder = None
        if hooks.write:
            history.append(metrics)
            run.append(run.metrics_path, metrics)
            folder = run.checkpoint_dir(distiller.epoch)
            save_checkpoint(folder, distiller.state_dict(), run_meta(config, distiller, train_set, metrics))
            run.prune(KEEP_CHECKPOINTS)
            plot_run(history, run.plot_path, title=f"{config.student} - {config.distill.strategy}")
        if hooks.progress:
            print(f"epoch {metrics['epoch']}/{config.optim.epochs}  loss {metrics['loss/total']:.4f}  "
                  f"train acc {metrics['train/acc']:.4f}  test acc {metrics['test/acc']:.4f}  "
                  f"({metrics['time/epoch_s']:.1f} s)", file=sys.stderr)
        if hooks.after_epoch is not None:
            hooks.after_epoch(metrics, folder)
    return history


def finish(distiller: Distiller, run: RunDirectory, train_set, history: list[dict]) -> dict:
    """Export the student (teacher format) and return the run's summary."""
    meta = {"model": distiller.config.student, "num_classes": train_set.num_classes,
            "in_channels": train_set.image_shape[0], "input_shape": list(train_set.image_shape),
            "dataset": {"name": train_set.name, "digest": train_set.digest},
            "test_accuracy": history[-1]["test/acc"] if history else None,
            "distilled_with": distiller.config.distill.strategy, "teachers": teacher_manifest(distiller.descriptions)}
    export_student(run.path / "student", distiller.module.state_dict(), meta)
    return {"run_dir": str(run.path), "epochs": distiller.epoch, "test_acc": meta["test_accuracy"],
            "plot": str(run.plot_path), "student": str(run.path / "student")}


def prepare_run_dir(run: RunDirectory, resume: bool, overwrite: bool) -> None:
    """A fresh run refuses a folder holding checkpoints unless told to overwrite (no data is lost silently)."""
    if resume:
        return
    if run.latest_checkpoint() is not None and not overwrite:
        raise FileExistsError(f"run folder {str(run.path)!r} already has checkpoints; pass --resume to continue it, "
                              f"--overwrite to start again, or choose another output_dir")
    for stale in ("checkpoints", "ray"):  # an earlier run's checkpoints must never be picked up
        if (run.path / stale).exists():
            shutil.rmtree(run.path / stale)
    run.create()
    for path in (run.metrics_path, run.steps_path):
        path.unlink(missing_ok=True)


def run_inprocess(config: ExperimentConfig, resume: bool = False, stop_after_epoch: int | None = None,
                  progress: bool = True, overwrite: bool = False) -> dict:
    """Train a student in this process. With ``resume``, continue ``config.output_dir``."""
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    torch.manual_seed(config.seed)
    train_set, test_set = load_data(config.data, config.seed)
    pool = load_local_pool(config)
    distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape)
    run = RunDirectory(config.output_dir)
    prepare_run_dir(run, resume, overwrite)
    if resume:
        resume_into(distiller, run)
    save_config(config, run.path / "config.yaml")
    history = fit(distiller, train_loader(train_set, config.data, config.seed), eval_loader(test_set, config.data),
                  run, train_set, FitHooks(progress=progress), stop_after_epoch)
    summary = finish(distiller, run, train_set, history)
    summary["history"] = history
    return summary


__all__ = ["FitHooks", "check_resumable", "fit", "finish", "load_local_pool", "resume_into", "prepare_run_dir", "run_inprocess", "run_meta"]
