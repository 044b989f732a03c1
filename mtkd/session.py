"""One run of an experiment, whatever runs it: build it from a config, restore it from a
checkpoint, train and evaluate an epoch, write its checkpoint.

Every runtime is a short epoch loop over a :class:`Session` (as in Ray Train's own examples)::

    session = Session.build(config, pool)                # seed, data, cache, teachers, Distiller
    if checkpoint_folder is not None:
        session.restore(checkpoint_folder)               # refuses another pool or student
    for epoch in session.epochs():
        metrics = session.train_epoch(on_step)           # train, then evaluate (rank 0)
        session.save(folder, metrics)                    # weights, optimiser, agent, RNG, meta

:func:`mtkd.runner.run_inprocess` records the epochs in a run folder; the Ray learner
(``services/learner/train_loop.py``) and the Tune trial report them to Ray instead. The teacher
pool is the caller's: a :class:`mtkd.teachers.LocalTeacherPool` here, a Ray pool in the services.
Nothing here knows about Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mtkd.cache import CacheContext, dataset_cache_id
from mtkd.checkpoint import CheckpointError
from mtkd.config import ExperimentConfig
from mtkd.data import BatchLoader, ImageDataset
from mtkd.engine import Distiller, check_agent_buffer
from mtkd.experiment import eval_loader, load_checkpoint, load_data, save_checkpoint, train_loader
from mtkd.metrics import StepResult
from mtkd.tasks import task_for_dataset
from mtkd.teachers import check_same_pool, teacher_manifest


def step_record(step: int, epoch: int, batch_index: int, result: StepResult) -> dict:
    """One line of ``steps.jsonl``: the step's loss parts.

    Args:
        step: the global step (1-based, counted over the whole run).
        epoch: the epoch being trained (1-based).
        batch_index: the batch's index in the epoch's global order.
        result: the step's scalars.
    """
    return {"step": step, "epoch": epoch, "batch": batch_index, "loss": result.loss, "ce": result.ce, "kd": result.kd,
            "feature": result.feature}


def run_meta(config: ExperimentConfig, distiller: Distiller, train_set: ImageDataset,
             metrics: dict | None = None) -> dict:
    """What a checkpoint records besides tensors: epoch, step, teacher manifest, data, student, metrics."""
    return {
        "epoch": distiller.epoch, "global_step": distiller.global_step, "student": config.student,
        "teachers": teacher_manifest(distiller.descriptions), "dataset": {"name": train_set.name,
                                                                          "digest": train_set.digest},
        "num_classes": train_set.num_classes, "input_shape": list(train_set.image_shape), "metrics": metrics or {},
    }


def check_resumable(meta: dict, descriptions: list[dict], student: str) -> None:
    """Refuse to continue a checkpoint (its ``meta``) with another teacher pool or student.

    Raises:
        CheckpointError: naming the first difference.
    """
    check_same_pool(meta["teachers"], teacher_manifest(descriptions))
    if meta["student"] != student:
        raise CheckpointError(f"student differs: the run trains {meta['student']!r}, got {student!r}")


@dataclass(eq=False)
class Session:
    """A run built from its config; see :meth:`build`.

    Attributes:
        config: the experiment.
        distiller: the engine (student, projectors, optimiser, strategy, counters).
        train_set, test_set: the data splits (subsets taken as configured).
        train_loader: shuffled, augmented batches; with several learners, this rank's share of them.
        test_loader: the whole test split, unaugmented.
        rank, world_size: this learner among the run's learners (``0, 1`` in one process).
    """

    config: ExperimentConfig
    distiller: Distiller
    train_set: ImageDataset
    test_set: ImageDataset
    train_loader: BatchLoader
    test_loader: BatchLoader
    rank: int = 0
    world_size: int = 1

    @classmethod
    def build(cls, config: ExperimentConfig, pool, *, store=None, device: str | torch.device | None = None,
              agent=None, wrap_module: Callable[[nn.Module], nn.Module] | None = None,
              agree: Callable[[bool], bool] | None = None, rank: int = 0, world_size: int = 1) -> "Session":
        """Seed torch with ``config.seed``, load the data, let the pool use the cache, build the engine.

        Args:
            config: the experiment.
            pool: the teacher pool (``describe``, ``submit``, ``collect``; ``use_cache`` with a store).
            store: an :class:`mtkd.cache.OutputStore` the teachers look their outputs up in (keyed
                with this dataset and augmentation), or None (the library has no Redis client).
            device: where the student trains (default: ``config.runtime.device``).
            agent: the agent of a strategy with one, or None: the engine builds its own, in-process.
            wrap_module: wraps the trainable module for forward/backward (DistributedDataParallel).
            agree: with several learners, whether a flag holds on every learner (see ``Distiller``).
            rank, world_size: this learner's share of the training batches.

        Raises:
            PoolMismatchError: the teachers do not fit the dataset (class count, input shape).
            ConfigError: the agent's buffer could outgrow ``runtime.agent_buffer_mb``.
        """
        torch.manual_seed(config.seed)
        train_set, test_set = load_data(config.data, config.seed)
        if store is not None:
            pool.use_cache(store, CacheContext(dataset_cache_id(train_set), config.data.crop_padding,
                                               config.cache.value_dtype))
        task = task_for_dataset(train_set, config.distill.region_grid, config.distill.dense_kd, config.distill.units)
        distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape, agent=agent, device=device,
                              wrap_module=wrap_module, agree=agree, task=task)
        check_agent_buffer(config, distiller.descriptions, train_set.num_classes,
                           len(train_set) // config.data.batch_size, task)
        return cls(config, distiller, train_set, test_set,
                   train_loader(train_set, config.data, config.seed, rank, world_size),
                   eval_loader(test_set, config.data), rank, world_size)

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        """Epochs trained so far (the 0-based index of the next one)."""
        return self.distiller.epoch

    def epochs(self, stop_after_epoch: int | None = None) -> range:
        """The 0-based epochs still to train: up to ``optim.epochs``, or ``stop_after_epoch`` if
        smaller (None or 0: no early stop). Each :meth:`train_epoch` trains the next one."""
        last = self.config.optim.epochs
        if stop_after_epoch:
            last = min(last, stop_after_epoch)
        return range(self.distiller.epoch, last)

    def train_epoch(self, on_step: Callable[[dict], None] | None = None) -> dict:
        """Train the next epoch, then (on rank 0: the learners hold the same weights) evaluate the
        student on the test set.

        Args:
            on_step: called after every step with its :func:`step_record`.

        Returns:
            The epoch's metrics: ``epoch`` (1-based), ``step``, ``lr``, ``loss/*``, ``train/acc``,
            ``weights/*``, the strategy's diagnostics, ``time/epoch_s``; ``test/acc`` and
            ``test/loss`` on rank 0.
        """
        epoch = self.distiller.epoch + 1

        def report_step(step: int, batch, result: StepResult) -> None:
            on_step(step_record(step, epoch, batch.index, result))

        metrics = self.distiller.train_epoch(self.train_loader, report_step if on_step is not None else None)
        if self.rank == 0:
            metrics.update(self.distiller.evaluate(self.test_loader))
        return metrics

    # -------------------------------------------------------------- checkpoints
    def save(self, folder: Path, metrics: dict | None = None) -> None:
        """Write a checkpoint of the run as it is now into ``folder`` (``metrics``: the epoch's, kept in its meta)."""
        save_checkpoint(Path(folder), self.distiller.state_dict(),
                        run_meta(self.config, self.distiller, self.train_set, metrics))

    def restore(self, folder: Path) -> dict:
        """Continue from the checkpoint in ``folder``; returns its meta (epoch, metrics...).

        Raises:
            CheckpointError: it does not load, or it was made with another pool or student.
        """
        state, meta = load_checkpoint(Path(folder))
        self.load(state, meta)
        return meta

    def load(self, state: dict, meta: dict) -> None:
        """Continue from a checkpoint already read (``load_checkpoint``'s ``state, meta``).

        Raises:
            CheckpointError: it was made with another pool or student.
        """
        check_resumable(meta, self.distiller.descriptions, self.config.student)
        self.distiller.load_state_dict(state)


__all__ = ["Session", "check_resumable", "run_meta", "step_record"]
