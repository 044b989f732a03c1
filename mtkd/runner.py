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
from mtkd.cache import CacheContext, dataset_cache_id
from mtkd.config import ConfigError, ExperimentConfig, save_config
from mtkd.devices import resolve_device
from mtkd.engine import Distiller, check_agent_buffer
from mtkd.experiment import (RunDirectory, eval_loader, export_student, load_checkpoint, load_data, save_checkpoint,
                             train_loader)
from mtkd.plot import plot_run
from mtkd.teachers import LocalTeacherPool, check_same_pool, load_teacher, teacher_manifest

KEEP_CHECKPOINTS = 2


@dataclass
class FitHooks:
    """Where the runtimes differ.

    Attributes:
        write: this process writes the run folder (metrics, steps, checkpoints, plot).
        progress: show a progress bar and one line per epoch on stderr.
        evaluate: evaluate the student on the test set after each epoch.
        after_step: called with each step's log record (the Ray learner sends them to the driver).
        after_epoch: called with each epoch's metrics (the Ray learner checkpoints and reports).
    """

    write: bool = True
    progress: bool = True
    evaluate: bool = True
    after_step: Callable[[dict], None] | None = None
    after_epoch: Callable[[dict], None] | None = None


def epoch_line(metrics: dict, epochs: int) -> str:
    """The one progress line of a finished epoch."""
    line = f"epoch {metrics['epoch']}/{epochs}  loss {metrics['loss/total']:.4f}  train acc {metrics['train/acc']:.4f}"
    if "test/acc" in metrics:
        line += f"  test acc {metrics['test/acc']:.4f}"
    return line + f"  ({metrics['time/epoch_s']:.1f} s)"


def step_record(step: int, epoch: int, batch_index: int, result) -> dict:
    """One line of ``steps.jsonl``: the step's loss parts."""
    return {"step": step, "epoch": epoch, "batch": batch_index, "loss": result.loss, "ce": result.ce, "kd": result.kd,
            "feature": result.feature}


def load_local_pool(config: ExperimentConfig) -> LocalTeacherPool:
    """Load every teacher of the config in this process, on ``runtime.device`` in ``runtime.teacher_precision``."""
    teachers = []
    rt = config.runtime
    for spec in config.teachers:
        if spec.checkpoint is None:
            raise ValueError(f"teacher {spec.name or spec.address!r} has no checkpoint; teachers served over gRPC "
                             f"(address) need the Ray runtime")
        teachers.append(load_teacher(spec.checkpoint, spec.name or None, device=resolve_device(rt.device),
                                     precision=rt.teacher_precision, compile=rt.compile_teachers))
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
                   disable=None if hooks.progress else True,  # None: no bar when stderr is not a terminal
                   leave=False, file=sys.stderr, mininterval=1.0)

        def on_step(step: int, batch, result) -> None:
            record = step_record(step, distiller.epoch + 1, batch.index, result)
            if hooks.write:
                run.append(run.steps_path, record)
            if hooks.after_step is not None:
                hooks.after_step(record)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{result.correct / result.batch:.3f}", refresh=False)

        metrics = distiller.train_epoch(train_ld, on_step)
        bar.close()
        if hooks.evaluate:
            metrics.update(distiller.evaluate(test_ld))
        if hooks.write:
            history.append(metrics)
            run.append(run.metrics_path, metrics)
            save_checkpoint(run.checkpoint_dir(distiller.epoch), distiller.state_dict(),
                            run_meta(config, distiller, train_set, metrics))
            run.prune(KEEP_CHECKPOINTS)
            plot_run(history, run.plot_path, title=plot_title(config))
        if hooks.progress:
            print(epoch_line(metrics, config.optim.epochs), file=sys.stderr)
        if hooks.after_epoch is not None:
            hooks.after_epoch(metrics)
    return history


def plot_title(config: ExperimentConfig) -> str:
    """The title of a run's plot: the student and the strategy."""
    return f"{config.student} - {config.distill.strategy}"


def finish(config: ExperimentConfig, run: RunDirectory, train_set, descriptions: list[dict], history: list[dict],
           module_state: dict, epochs: int) -> dict:
    """Export the student of ``module_state`` (teacher format) and return the run's summary."""
    meta = {"model": config.student, "num_classes": train_set.num_classes,
            "in_channels": train_set.image_shape[0], "input_shape": list(train_set.image_shape),
            "dataset": {"name": train_set.name, "digest": train_set.digest, "mean": list(train_set.mean),
                        "std": list(train_set.std)},
            "test_accuracy": history[-1]["test/acc"] if history else None,
            "distilled_with": config.distill.strategy, "teachers": teacher_manifest(descriptions)}
    export_student(run.path / "student", module_state, meta)
    return {"run_dir": str(run.path), "epochs": epochs, "test_acc": meta["test_accuracy"],
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
                  progress: bool = True, overwrite: bool = False, store=None) -> dict:
    """Train a student in this process. With ``resume``, continue ``config.output_dir``.

    ``store``: the :class:`mtkd.cache.OutputStore` of ``cache.url`` (the ``mtkd`` command opens it;
    the library itself has no Redis client).
    """
    if config.cache.url and store is None:
        raise ConfigError(f"cache.url={config.cache.url!r} needs the service package (Redis): run the installed "
                          f"`mtkd` command, or set cache.url=null")
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    torch.manual_seed(config.seed)
    train_set, test_set = load_data(config.data, config.seed)
    pool = load_local_pool(config)
    if store is not None:
        pool.use_cache(store, CacheContext(dataset_cache_id(train_set), config.data.crop_padding, config.cache.value_dtype))
    distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape)
    check_agent_buffer(config, distiller.descriptions, train_set.num_classes, len(train_set) // config.data.batch_size)
    run = RunDirectory(config.output_dir)
    prepare_run_dir(run, resume, overwrite)
    if resume:
        resume_into(distiller, run)
    save_config(config, run.path / "config.yaml")
    history = fit(distiller, train_loader(train_set, config.data, config.seed), eval_loader(test_set, config.data),
                  run, train_set, FitHooks(progress=progress), stop_after_epoch)
    summary = finish(config, run, train_set, distiller.descriptions, history, distiller.module.state_dict(),
                     distiller.epoch)
    summary["history"] = history
    return summary


__all__ = ["FitHooks", "check_resumable", "epoch_line", "fit", "finish", "load_local_pool", "plot_title",
           "prepare_run_dir", "resume_into", "run_inprocess", "run_meta", "step_record"]
