"""One trial of ``mtkd tune``: a Ray Tune function trainable that trains one experiment on the
search's shared teacher actors, the agent in its own process.

Like the Ray learner, it is an explicit epoch loop over a :class:`mtkd.session.Session`: build
the session (its experiment is the base plus its sampled values), continue from the checkpoint
Tune hands it (``tune.get_checkpoint()``), then per epoch train and ``tune.report(metrics,
checkpoint)``, so that ASHA can stop it and an interrupted search continues it.

One case needs more than Tune's checkpoint: Tune records a trial's checkpoints in its experiment
state, which it saves now and then, while the checkpoint folder is written when the epoch is
reported. A search killed between the two leaves a checkpoint on disk that Tune's state does not
know of; the trial then continues from that one (:func:`newer_checkpoint`) and reports its epoch
again, so that no checkpointed epoch is trained twice (``test_tune.py`` kills a search in that gap).
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from mtkd.checkpoint import META_FILE, CheckpointError, read_json
from mtkd.distill import STRATEGIES
from mtkd.engine import teacher_fields
from mtkd.experiment import load_checkpoint
from mtkd.session import Session
from services.cache import RedisStore
from services.teacher_server.pool import RayTeacherPool
from services.tune.spec import trial_config

CHECKPOINT_GLOB = "checkpoint_*"  # Tune's checkpoint folders in a trial's folder
TRIAL_DIR = "trial_{}"  # a trial's folder, by its id


def trial_dirname(trial) -> str:
    """Tune's folder of a trial: ``trial_<id>`` (stable across a resume)."""
    return TRIAL_DIR.format(trial.trial_id)


def scalar_metrics(metrics: dict) -> dict:
    """The finite numbers of an epoch's metrics (what Tune records and ASHA compares)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def checkpoint_epoch(folder: Path) -> int | None:
    """The epoch of the checkpoint in ``folder`` (its metadata only), None if that does not read."""
    try:
        return int(read_json(folder / META_FILE).get("epoch", 0))
    except (CheckpointError, OSError, ValueError, TypeError, AttributeError):
        return None


def newer_checkpoint(trial_folder: Path, known_epoch: int) -> tuple[dict, dict, Path] | None:
    """``(state, meta, folder)`` of the newest checkpoint in a trial's folder that is newer than
    ``known_epoch`` (the epoch of Tune's checkpoint, 0 without one) and loads; None if there is none.

    Only metadata is read until such a folder is found, so the usual case (Tune's checkpoint is the
    newest) reads no tensors here. A folder cut short by the interruption is passed over.
    """
    if not trial_folder.is_dir():
        return None  # storage this process cannot list: Tune's checkpoint is all there is
    for folder in sorted(trial_folder.glob(CHECKPOINT_GLOB), reverse=True):
        epoch = checkpoint_epoch(folder)
        if epoch is None:
            continue
        if epoch <= known_epoch:
            return None
        try:
            state, meta = load_checkpoint(folder)
        except (CheckpointError, OSError, ValueError, KeyError, RuntimeError):
            continue  # a copy cut short by the interruption: take the one before
        return state, meta, folder
    return None


def restore(session: Session, trial_folder: Path) -> None:
    """Continue from Tune's checkpoint of this trial, or from a newer one in its folder (then report
    that epoch again, so that Tune's table and ASHA know where the trial is)."""
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as tune_folder:
        known_epoch = (checkpoint_epoch(Path(tune_folder)) or 0) if tune_folder else 0
        newer = newer_checkpoint(trial_folder, known_epoch)
        if newer is None:
            if tune_folder is not None:
                session.restore(Path(tune_folder))
            return
    state, meta, folder = newer
    session.load(state, meta)
    if meta.get("metrics"):
        with tempfile.TemporaryDirectory(prefix="mtkd-tune-") as copy:
            shutil.copytree(folder, copy, dirs_exist_ok=True)
            tune.report(scalar_metrics(meta["metrics"]), checkpoint=tune.Checkpoint.from_directory(copy))


def tune_trial(params: dict, *, experiment: dict, teacher_handles: list[list], cache_url: str | None,
               experiment_path: str) -> None:
    """One trial: train the experiment ``experiment`` + ``params`` on the shared teacher actors,
    reporting scalar metrics and a checkpoint after every epoch."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # Ray logs every checkpoint at INFO
    config = trial_config(experiment, params)
    rt = config.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    device = torch.device("cuda" if rt.device != "cpu" and ray.get_gpu_ids() else "cpu")
    pool = RayTeacherPool(teacher_handles, fields=teacher_fields(STRATEGIES.get(config.distill.strategy)),
                          half_precision=rt.half_precision, max_in_flight=rt.prefetch + 1)
    try:
        session = Session.build(config, pool, store=RedisStore(cache_url) if cache_url else None, device=device)
        restore(session, Path(experiment_path) / TRIAL_DIR.format(tune.get_context().get_trial_id()))
        for _ in session.epochs():
            metrics = session.train_epoch()
            with tempfile.TemporaryDirectory(prefix="mtkd-tune-") as folder:
                session.save(Path(folder), metrics)
                tune.report(scalar_metrics(metrics), checkpoint=tune.Checkpoint.from_directory(folder))
    finally:
        pool.close()
