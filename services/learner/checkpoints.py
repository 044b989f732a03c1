"""Which Ray Train checkpoint a resumed run continues from.

Ray Train hands a restarted or resumed learner its newest checkpoint (``ray.train.get_checkpoint()``).
Its ``checkpoint_*`` folders hold the files of :func:`mtkd.experiment.save_checkpoint`, digests
included, so they are checked as the in-process runtime checks its own: newest first, a folder
whose files are missing, cut short or altered is passed over for the one before it
(:func:`mtkd.experiment.newest_loadable`). The driver checks before the learners start (and warns);
the learners choose the same way (they may run where the driver cannot read the storage).
"""
from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Callable

import pyarrow.fs
from ray.train import Checkpoint

from mtkd.checkpoint import META_FILE, CheckpointError
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


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's own list of a run's checkpoints


def newest_in_storage(storage: str, name: str) -> Checkpoint | None:
    """The newest ``checkpoint_*`` folder of Ray Train run ``name`` in ``storage``, found by listing
    it (not from Ray Train's snapshot file, which a process killed while writing it leaves empty),
    or None."""
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(str(storage))
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(posixpath.join(root, name)))
    except (OSError, ValueError):  # no such run, or storage that cannot be listed
        return None
    folders = sorted(info.path for info in infos if info.type == pyarrow.fs.FileType.Directory
                     and posixpath.basename(info.path).startswith(CHECKPOINT_PREFIX))
    return Checkpoint(folders[-1], filesystem=filesystem) if folders else None


def repair_snapshot(storage: str, name: str) -> str | None:
    """Rewrite Ray Train's snapshot file of run ``name`` when it is empty or does not parse (Ray Train
    writes it in place, so a process killed meanwhile leaves it cut short, and Ray Train then refuses
    to start the run and to hand the learners a checkpoint). The broken file is kept as
    ``<file>.broken``; the new one lists the run's ``checkpoint_*`` folders whose ``meta.json`` reads
    (its metrics and epoch), oldest first, with Ray Train's own schema.

    Returns:
        The path of the broken file set aside, or None (the file parses, is absent, or the storage
        cannot be read).
    """
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(str(storage))
    except (OSError, ValueError):
        return None
    run_dir = posixpath.join(root, name)
    path = posixpath.join(run_dir, SNAPSHOT_FILE)
    try:
        with filesystem.open_input_stream(path) as stream:
            if isinstance(json.loads(stream.read().decode()), dict):
                return None
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        pass
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (_CheckpointManagerState,
                                                                                  _TrainingResultState)

    results = []
    for info in sorted(filesystem.get_file_info(pyarrow.fs.FileSelector(run_dir)), key=lambda i: i.path):
        folder = posixpath.basename(info.path)
        if info.type != pyarrow.fs.FileType.Directory or not folder.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            with filesystem.open_input_stream(posixpath.join(info.path, META_FILE)) as stream:
                meta = json.loads(stream.read().decode())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        metrics = {**(meta.get("metrics") or {}), "epoch": meta.get("epoch")}
        results.append(_TrainingResultState(checkpoint_dir_name=folder, metrics=metrics))
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=results[-1] if results else None, pending_training_results=[],
        pending_validation_specs=[], current_report_index=len(results), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    filesystem.move(path, f"{path}.broken")
    with filesystem.open_output_stream(f"{path}.partial") as stream:
        stream.write(state.json().encode())
    filesystem.move(f"{path}.partial", path)
    return f"{path}.broken"


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


__all__ = ["load_ray_checkpoint", "newest_in_storage", "newest_valid", "repair_snapshot", "with_older"]
