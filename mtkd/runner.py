"""The in-process runtime: ``mtkd distill --runtime inprocess`` (the reference engine).

:func:`run_inprocess` is an explicit epoch loop over a :class:`mtkd.session.Session` that records
each epoch in the run folder (:func:`train_and_record`); the Ray learner runs the same session
and reports to Ray Train instead (``services/learner/train_loop.py``).
"""
from __future__ import annotations

import shutil
import sys
from typing import Callable

import torch
from tqdm import tqdm

from mtkd.config import ConfigError, ExperimentConfig, save_config
from mtkd.devices import resolve_device
from mtkd.errors import RunExistsError
from mtkd.experiment import RAY_RUN_FILE, RunDirectory, export_student
from mtkd.plot import plot_run
from mtkd.session import Session
from mtkd.teachers import LocalTeacherPool, load_teacher, probe_options, teacher_manifest
from mtkd.tracking import open_tracker

KEEP_CHECKPOINTS = 2


def epoch_line(metrics: dict, epochs: int) -> str:
    """The one progress line of a finished epoch."""
    line = f"epoch {metrics['epoch']}/{epochs}  loss {metrics['loss/total']:.4f}  train acc {metrics['train/acc']:.4f}"
    if "test/acc" in metrics:
        line += f"  test acc {metrics['test/acc']:.4f}"
    if "test/miou" in metrics:
        line += f"  test mIoU {metrics['test/miou']:.4f}"
    return line + f"  ({metrics['time/epoch_s']:.1f} s)"


def load_local_pool(config: ExperimentConfig) -> LocalTeacherPool:
    """Load every teacher of the config in this process, on ``runtime.device`` in ``runtime.teacher_precision``."""
    teachers = []
    rt = config.runtime
    for spec in config.teachers:
        if spec.checkpoint is None:
            raise ConfigError(f"teacher {spec.name or spec.address!r} has no checkpoint; teachers served over gRPC "
                             f"(address) need the Ray runtime")
        teachers.append(load_teacher(spec.checkpoint, spec.name or None, device=resolve_device(rt.device),
                                     precision=rt.teacher_precision, compile=rt.compile_teachers,
                                     **probe_options(config)))
    return LocalTeacherPool(teachers)


def plot_title(config: ExperimentConfig) -> str:
    """The title of a run's plot: the student and the strategy."""
    return f"{config.student} - {config.distill.strategy}"


def train_and_record(session: Session, run: RunDirectory, *, progress: bool = True,
                     stop_after_epoch: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the session's remaining epochs; after each, append its steps and metrics to the run
    folder, checkpoint (the newest :data:`KEEP_CHECKPOINTS` kept), redraw the plot, print one line
    (and hand the metrics to ``on_epoch``: tracking).

    Returns:
        Every epoch's metrics so far, the earlier ones (a resumed run) read from the run folder.
    """
    config = session.config
    history = run.read(run.metrics_path)
    for epoch in session.epochs(stop_after_epoch):
        bar = tqdm(total=len(session.train_loader), desc=f"epoch {epoch + 1}/{config.optim.epochs}",
                   disable=None if progress else True,  # None: no bar when stderr is not a terminal
                   leave=False, file=sys.stderr, mininterval=1.0)

        def on_step(record: dict) -> None:
            run.append(run.steps_path, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)

        try:
            metrics = session.train_epoch(on_step)
        finally:
            bar.close()
        history.append(metrics)
        run.append(run.metrics_path, metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        session.save(run.checkpoint_dir(session.epoch), metrics)
        run.prune(KEEP_CHECKPOINTS)
        plot_run(history, run.plot_path, title=plot_title(config))
        if progress:
            print(epoch_line(metrics, config.optim.epochs), file=sys.stderr)
    return history


def finish(config: ExperimentConfig, run: RunDirectory, train_set, descriptions: list[dict], history: list[dict],
           module_state: dict, epochs: int, student_setting: dict | None = None) -> dict:
    """Export the student of ``module_state`` (teacher format) and return the run's summary
    (``student_setting``: how the student trained, kept in the meta)."""
    meta = {"model": config.student, "num_classes": train_set.num_classes,
            "in_channels": train_set.image_shape[0], "input_shape": list(train_set.image_shape),
            "dataset": {"name": train_set.name, "digest": train_set.digest, "mean": list(train_set.mean),
                        "std": list(train_set.std), "options": dict(config.data.options)},
            "test_accuracy": history[-1]["test/acc"] if history else None,
            "distilled_with": config.distill.strategy, "teachers": teacher_manifest(descriptions),
            # how each teacher computed, and for teacher_precision / compile_teachers auto the probe's
            # timings and agreement, the compile's break-even
            "teacher_settings": [{k: d.get(k) for k in ("name", "precision", "numerics", "probe", "compile")}
                                 for d in descriptions],
            "student_setting": student_setting}
    summary = {"run_dir": str(run.path), "epochs": epochs, "test_acc": meta["test_accuracy"],
               "plot": str(run.plot_path), "student": str(run.path / "student")}
    if history and "test/miou" in history[-1]:  # segmentation
        meta["task"] = "segmentation"
        meta["test_miou"] = summary["test_miou"] = history[-1]["test/miou"]
    if history and "test/map" in history[-1]:  # detection
        meta["task"] = "detection"
        meta["test_map"] = summary["test_map"] = history[-1]["test/map"]
        meta["test_map50"] = summary["test_map50"] = history[-1]["test/map50"]
    export_student(run.path / "student", module_state, meta)
    return summary


def prepare_run_dir(run: RunDirectory, resume: bool, overwrite: bool) -> None:
    """A fresh run refuses a folder holding checkpoints of either runtime unless told to overwrite (no
    data is lost silently: re-running the command of a crashed run must not discard its progress).
    The checkpoints held include those of the recorded Ray Train run in an external local
    ``runtime.storage_path`` (:meth:`RunDirectory.held_checkpoints`); ``overwrite`` deletes that
    run's folder there too, and nothing else of the storage.

    Raises:
        RunExistsError: a fresh run into a folder holding checkpoints, without ``overwrite``.
    """
    if resume:
        return
    held = run.held_checkpoints()
    if held and not overwrite:
        shown = held[-1].relative_to(run.path) if held[-1].is_relative_to(run.path) else held[-1]
        raise RunExistsError(f"run folder {str(run.path)!r} already has checkpoints ({shown}); "
                             f"pass --resume to continue it, --overwrite to discard them and start again, or "
                             f"choose another output_dir")
    stale = [run.path / "checkpoints", run.path / "ray"]  # an earlier run's checkpoints must never be picked up
    recorded = run.recorded_ray_run()
    if overwrite and recorded is not None:  # its Ray Train run in an external storage_path: only with --overwrite
        stale.append(recorded)
    for folder in stale:
        if folder.exists():
            shutil.rmtree(folder)
    (run.path / RAY_RUN_FILE).unlink(missing_ok=True)
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
    session = Session.build(config, load_local_pool(config), store=store)
    run = RunDirectory(config.output_dir)
    prepare_run_dir(run, resume, overwrite)
    if resume:
        _, state, meta = run.load_resumable()  # the newest valid checkpoint; newer broken ones are named
        session.load(state, meta)
        run.truncate(run.metrics_path, "epoch", session.epoch)  # the work done after that checkpoint
        run.truncate(run.steps_path, "step", session.distiller.global_step)
    save_config(config, run.path / "config.yaml")
    with open_tracker(config, run.path, resume) as tracker:  # MLflow / TensorBoard, when tracking is on
        history = train_and_record(session, run, progress=progress, stop_after_epoch=stop_after_epoch,
                                   on_epoch=tracker.log_epoch)
        summary = finish(config, run, session.train_set, session.distiller.descriptions, history,
                         session.distiller.module.state_dict(), session.epoch,
                         {"setting": session.distiller.student_setting.label, "probe": session.distiller.student_probe})
        tracker.log_student(run.path / "student")
    summary["history"] = history
    return summary


__all__ = ["KEEP_CHECKPOINTS", "epoch_line", "finish", "load_local_pool", "plot_title", "prepare_run_dir",
           "run_inprocess", "train_and_record"]
