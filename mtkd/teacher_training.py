"""``mtkd train-teacher`` and ``mtkd eval``: supervised training of one network, and evaluation
of any checkpoint. Teacher training is the engine with the ``ce`` strategy and no teachers."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from mtkd.config import DistillConfig, ExperimentConfig, RuntimeConfig, TeacherTrainConfig, save_config
from mtkd.data import BatchLoader, train_test
from mtkd.devices import resolve_device
from mtkd.engine import PoolMismatchError
from mtkd.experiment import RunDirectory
from mtkd.runner import prepare_run_dir, train_and_record
from mtkd.session import Session
from mtkd.tasks import task_for_dataset, task_of
from mtkd.teachers import LocalTeacherPool, load_model_checkpoint, save_teacher


def as_experiment(cfg: TeacherTrainConfig) -> ExperimentConfig:
    """The teacher's training as an experiment: ``ce`` strategy, empty pool, its own run folder."""
    return ExperimentConfig(seed=cfg.seed, output_dir=str(Path(cfg.output_dir) / "run"), student=cfg.model,
                            teachers=[], data=cfg.data, optim=cfg.optim, distill=DistillConfig(strategy="ce"),
                            runtime=RuntimeConfig(runtime="inprocess", prefetch=0, threads=cfg.threads, device=cfg.device,
                                                  student_precision=cfg.precision))


def train_teacher(cfg: TeacherTrainConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` and write a teacher checkpoint folder to ``cfg.output_dir``.

    Returns:
        The checkpoint's metadata (model, classes, input shape, dataset, test accuracy, digest...).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    experiment = as_experiment(cfg)
    session = Session.build(experiment, LocalTeacherPool([]))
    train_set, test_set, distiller = session.train_set, session.test_set, session.distiller
    run = RunDirectory(experiment.output_dir)
    prepare_run_dir(run, resume=False, overwrite=overwrite)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    start = time.perf_counter()
    history = train_and_record(session, run, progress=progress)
    meta = {
        "model": cfg.model, "num_classes": train_set.num_classes, "in_channels": train_set.image_shape[0],
        "input_shape": list(train_set.image_shape), "class_names": list(train_set.class_names or []),
        "dataset": {"name": train_set.name, "digest": train_set.digest, "train_samples": len(train_set),
                    "test_samples": len(test_set), "mean": list(train_set.mean), "std": list(train_set.std),
                    "options": dict(cfg.data.options)},
        "task": task_of(train_set), "test_accuracy": history[-1]["test/acc"], "epochs": cfg.optim.epochs,
        "seed": cfg.seed,
        "trained_with": {"device": str(distiller.device), "precision": distiller.precision,
                         "schedule": cfg.optim.schedule},
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    if "test/miou" in history[-1]:
        meta["test_miou"] = history[-1]["test/miou"]
    if "test/map" in history[-1]:  # detection
        meta["test_map"], meta["test_map50"] = history[-1]["test/map"], history[-1]["test/map50"]
    return save_teacher(cfg.output_dir, distiller.module.student, meta)


def evaluate_checkpoint(folder: str | Path, data_name: str | None = None, root: str | None = None,
                        batch_size: int = 500, device: str = "auto") -> dict:
    """Top-1 accuracy (fp32, on ``device``) of a checkpoint folder on the test split of its dataset (or
    ``data_name``); for a segmentation checkpoint pixel accuracy and mIoU (``test_miou``); for a detector
    COCO mAP (``test_map``, also ``test_accuracy``) and mAP@0.5 (``test_map50``)."""
    model, meta = load_model_checkpoint(folder)
    device = resolve_device(device)
    model.to(device)
    _, test_set = train_test(data_name or meta["dataset"]["name"], root, **meta["dataset"].get("options", {}))
    if test_set.num_classes != meta["num_classes"]:
        raise PoolMismatchError(f"checkpoint {str(folder)!r} predicts {meta['num_classes']} classes but dataset "
                         f"{test_set.name!r} has {test_set.num_classes}")
    if tuple(test_set.image_shape) != tuple(meta["input_shape"]):
        raise PoolMismatchError(f"checkpoint {str(folder)!r} takes input {tuple(meta['input_shape'])} but dataset "
                         f"{test_set.name!r} gives {tuple(test_set.image_shape)}")
    scores = task_for_dataset(test_set).evaluate(model, BatchLoader(test_set, batch_size, shuffle=False), device, "fp32")
    result = {"checkpoint": str(folder), "model": meta["model"], "dataset": test_set.name,
              "samples": len(test_set), "test_accuracy": scores["test/acc"], "test_loss": scores["test/loss"]}
    if "test/miou" in scores:
        result["test_miou"] = scores["test/miou"]
    if "test/map" in scores:  # detection
        result["test_map"], result["test_map50"] = scores["test/map"], scores["test/map50"]
    return result
