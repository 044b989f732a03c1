"""Which Ray Train checkpoint a resumed run continues from.

Ray Train hands a restarted or resumed learner its newest checkpoint (``ray.train.get_checkpoint()``).
Its ``checkpoint_*`` folders hold the files of :func:`mtkd.experiment.save_checkpoint`, digests
included, so they are checked as the in-process runtime checks its own: newest first, a folder
whose files are missing, cut short or altered is passed over for the one before it
(:func:`mtkd.experiment.newest_loadable`). The driver checks before the learners start (and warns);
the learners choose the same way (they may run where the driver cannot read the storage).
"""
from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Callable

import pyarrow.fs
from ray.train import Checkpoint

from mtkd.checkpoint import CheckpointError
from mtkd.experiment import load_checkpoint, newest_loadable

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's folder names: checkpoint_<date and time>, sortable


def with_older(checkpoint: Checkpoint) -> list[Checkpoint]:
    """``checkpoint`` and the older ``checkpoint_*`` folders beside it in its storage, newest first."""
    path = checkpoint.path.rstrip("/")
    parent, name = posixpath.split(path)
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:  # storage that cannot be listed: Ray Train's checkpoint is all there is
        return [checkpoint]
    older = sorted((info.path for info in infos if info.type == pyarrow.fs.FileType.Directory
                    and posixpath.basename(info.path).startswith(CHECKPOINT_PREFIX)
                    and posixpath.basename(info.path) < name), reverse=True)
    return [checkpoint, *(Checkpoint(p, filesystem=checkpoint.filesystem) for p in older)]


def load_ray_checkpoint(checkpoint: Checkpoint) -> tuple[dict, dict]:
    """:func:`mtkd.experiment.load_checkpoint` of a Ray Train checkpoint (downloaded if remote).

    Raises:
        CheckpointError: it does not verify or load, or cannot be read from the storage.
    """
    try:
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder))
    except OSError as error:
        raise CheckpointError(f"{checkpoint.path!r} cannot be read: {error}") from error


def newest_valid(checkpoint: Checkpoint, warn: Callable[[str], None] | None = None
                 ) -> tuple[Checkpoint, tuple[dict, dict]] | None:
    """The newest valid of ``checkpoint`` and the older ones beside it: ``(checkpoint, (engine
    state, meta))``, or None. ``warn`` gets one line per newer one passed over."""
    return newest_loadable(with_older(checkpoint), load_ray_checkpoint, warn, name=lambda c: c.path)


__all__ = ["load_ray_checkpoint", "newest_valid", "with_older"]
