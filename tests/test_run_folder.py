"""A fresh run never discards an earlier run's checkpoints, of either runtime, without --overwrite."""
from __future__ import annotations

import pytest

from mtkd.checkpoint import META_FILE
from mtkd.errors import USER_EXIT, RunExistsError, exit_code
from mtkd.experiment import RunDirectory
from mtkd.runner import prepare_run_dir


def ray_checkpoint(run: RunDirectory):
    folder = run.path / "ray" / "learner-20261207-120000-abcdef" / "checkpoint_000001"
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"progress")
    return folder


def inprocess_checkpoint(run: RunDirectory, complete: bool = True):
    folder = run.checkpoint_dir(2)
    folder.mkdir(parents=True)
    if complete:
        (folder / META_FILE).write_text("{}")
    return folder


@pytest.mark.parametrize("make", [ray_checkpoint, inprocess_checkpoint])
def test_a_new_run_refuses_a_folder_holding_checkpoints(tmp_path, make):
    run = RunDirectory(tmp_path / "run")
    held = make(run)
    with pytest.raises(RunExistsError, match="--resume.*--overwrite") as refused:
        prepare_run_dir(run, resume=False, overwrite=False)
    assert held.name in str(refused.value) and exit_code(refused.value) == USER_EXIT
    assert held.is_dir()  # nothing was removed
    prepare_run_dir(run, resume=True, overwrite=False)
    assert held.is_dir()
    prepare_run_dir(run, resume=False, overwrite=True)  # the only way to discard them
    assert not held.exists() and run.held_checkpoints() == []


def test_a_folder_without_a_complete_checkpoint_is_reused(tmp_path):
    run = RunDirectory(tmp_path / "run")
    partial = inprocess_checkpoint(run, complete=False)  # killed while writing: nothing to continue from
    (run.path / "ray" / "learner-x").mkdir(parents=True)  # a Ray run that never reached a checkpoint
    assert run.held_checkpoints() == []
    prepare_run_dir(run, resume=False, overwrite=False)
    assert not partial.exists() and not (run.path / "ray").exists()
