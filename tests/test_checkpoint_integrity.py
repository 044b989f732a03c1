"""Checkpoints are written whole or not at all, carry the sha256 of their files, and a run resumes
from the newest valid one: a broken newer one is named and passed over, pruning never gives up the
only valid one, and checkpoints written before digests still load."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtkd import experiment
from mtkd.checkpoint import (DIGESTS_KEY, META_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE, CheckpointError, read_json,
                             write_json)
from mtkd.errors import USER_EXIT, exit_code
from mtkd.experiment import RunDirectory, load_checkpoint, save_checkpoint

from conftest import needs_fashion, small_experiment


def tiny_state(epoch: int) -> tuple[dict, dict]:
    """An engine state and meta of a few tensors (what ``save_checkpoint`` takes), distinct per epoch."""
    torch.manual_seed(epoch)
    state = {"module": {"student.w": torch.randn(64, 32), "student.b": torch.randn(32)}, "strategy": {},
             "epoch": epoch, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1 * epoch}]}}
    return state, {"epoch": epoch, "student": "resnet8"}


def write(run: RunDirectory, *epochs: int) -> None:
    for epoch in epochs:
        save_checkpoint(run.checkpoint_dir(epoch), *tiny_state(epoch))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_meta_lists_the_digests_and_an_altered_or_cut_file_is_named(tmp_path):
    folder = tmp_path / "epoch_0001"
    save_checkpoint(folder, *tiny_state(1))
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_FILE, META_FILE, TRAINER_STATE_FILE])
    files = read_json(folder / META_FILE)[DIGESTS_KEY]
    assert set(files) == {WEIGHTS_FILE, TRAINER_STATE_FILE}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())
    state, meta = load_checkpoint(folder)
    assert torch.equal(state["module"]["student.w"], tiny_state(1)[0]["module"]["student.w"]) and meta["epoch"] == 1

    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of one float: safetensors still loads it, the digest does not match
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights.safetensors' does not match its sha256 in meta.json"):
        load_checkpoint(folder)
    truncate(folder / TRAINER_STATE_FILE)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt' is truncated \(\d+ of \d+ bytes\)"):
        load_checkpoint(folder)


def test_a_checkpoint_written_before_digests_loads_and_a_broken_one_is_still_caught(tmp_path):
    run = RunDirectory(tmp_path / "run")
    write(run, 1, 2)
    for epoch in (1, 2):  # the format before digests: meta.json without "files"
        meta_path = run.checkpoint_dir(epoch) / META_FILE
        write_json(meta_path, {k: v for k, v in read_json(meta_path).items() if k != DIGESTS_KEY})
    warnings: list[str] = []
    folder, state, meta = run.load_resumable(warn=warnings.append)
    assert folder.name == "epoch_0002" and meta["epoch"] == 2 and warnings == []  # nothing to say
    truncate(run.checkpoint_dir(2) / WEIGHTS_FILE)  # without digests, loading still finds it
    folder, _, _ = run.load_resumable(warn=warnings.append)
    assert folder.name == "epoch_0001"
    assert len(warnings) == 1 and "epoch_0002" in warnings[0] and "weights" in warnings[0]


def test_the_newest_valid_checkpoint_is_chosen_and_the_broken_ones_named(tmp_path):
    run = RunDirectory(tmp_path / "run")
    write(run, 1, 2, 3)
    truncate(run.checkpoint_dir(3) / WEIGHTS_FILE)
    (run.checkpoint_dir(2) / TRAINER_STATE_FILE).unlink()
    warnings: list[str] = []
    folder, _, meta = run.load_resumable(warn=warnings.append)
    assert folder == run.checkpoint_dir(1) and meta["epoch"] == 1 and run.resumable_epoch() == 1
    assert len(warnings) == 2
    assert "epoch_0003" in warnings[0] and "weights.safetensors' is truncated" in warnings[0]
    assert "epoch_0002" in warnings[1] and "trainer_state.pt' is missing" in warnings[1]
    assert all(w.endswith(f"resuming from {run.checkpoint_dir(1)} instead") and "\n" not in w for w in warnings)

    truncate(run.checkpoint_dir(1) / META_FILE)
    with pytest.raises(CheckpointError) as none:
        run.load_resumable(warn=warnings.append)
    message = str(none.value)
    assert str(run.path) in message and "no valid checkpoint" in message and "\n" not in message
    assert exit_code(none.value) == USER_EXIT and run.resumable_epoch() is None


def test_a_write_cut_between_files_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path / "run")
    write(run, 1)

    def dies_midway(path, state):  # half a file written, then the process "crashes"
        Path(path).write_bytes(b"\x80\x02half")
        raise OSError("No space left on device")

    monkeypatch.setattr(experiment, "save_trainer_state", dies_midway)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(run.checkpoint_dir(2), *tiny_state(2))
    assert not run.checkpoint_dir(2).exists()  # only the hidden .epoch_0002.partial holds the pieces
    assert [f.name for f in run.complete_checkpoints()] == ["epoch_0001"]
    assert run.checkpoint_to_resume(warn=None) == run.checkpoint_dir(1)

    monkeypatch.undo()  # a crash while the checkpoint of an existing epoch is rewritten keeps the old one
    original = experiment.write_json

    def meta_dies(path, data):
        if Path(path).name == META_FILE:
            raise OSError("interrupted")
        original(path, data)

    monkeypatch.setattr(experiment, "write_json", meta_dies)
    with pytest.raises(OSError, match="interrupted"):
        save_checkpoint(run.checkpoint_dir(1), *tiny_state(7))
    assert load_checkpoint(run.checkpoint_dir(1))[1]["epoch"] == 1
    monkeypatch.undo()
    write(run, 2)  # the next write clears what the cut ones left
    run.prune(2)
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]


def test_pruning_never_gives_up_the_only_valid_checkpoint(tmp_path):
    run = RunDirectory(tmp_path / "run")
    names = lambda: [f.name for f in sorted((run.path / "checkpoints").glob("epoch_*"))]  # noqa: E731
    write(run, 1, 2, 3)
    run.prune(2)
    assert names() == ["epoch_0002", "epoch_0003"]
    truncate(run.checkpoint_dir(3) / WEIGHTS_FILE)
    run.prune(2)  # the newest two are not both valid: epoch 2 is the only valid one and stays
    assert names() == ["epoch_0002", "epoch_0003"]
    write(run, 4)
    truncate(run.checkpoint_dir(4) / WEIGHTS_FILE)
    run.prune(1)  # keep the newest valid (2) and what is newer; nothing valid is older
    assert names() == ["epoch_0002", "epoch_0003", "epoch_0004"]
    truncate(run.checkpoint_dir(2) / WEIGHTS_FILE)
    run.prune(1)  # none valid: nothing is deleted
    assert names() == ["epoch_0002", "epoch_0003", "epoch_0004"]
    write(run, 5)
    run.prune(2)  # valid: 5 only; the corrupt ones older than it go
    assert names() == ["epoch_0005"]


@needs_fashion
def test_a_truncated_newest_checkpoint_resumes_from_the_one_before_bit_identically(tmp_path, teacher_dirs, capsys,
                                                                                   one_torch_thread):
    from mtkd.runner import run_inprocess

    overrides = ["optim.epochs=3", "optim.milestones=[2]", "distill.strategy=mtkd_rl"]
    run_inprocess(small_experiment(tmp_path / "whole", teacher_dirs, overrides), progress=False)
    run_inprocess(small_experiment(tmp_path / "part", teacher_dirs, overrides), stop_after_epoch=2, progress=False)
    run = RunDirectory(tmp_path / "part")
    truncate(run.checkpoint_dir(2) / WEIGHTS_FILE)
    capsys.readouterr()
    resumed = run_inprocess(small_experiment(tmp_path / "part", teacher_dirs, overrides), resume=True, progress=False)
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1
    assert "epoch_0002" in warning[0] and "weights.safetensors' is truncated" in warning[0]
    assert warning[0].endswith(f"resuming from {run.checkpoint_dir(1)} instead")
    assert resumed["epochs"] == 3 and [m["epoch"] for m in run.read(run.metrics_path)] == [1, 2, 3]
    a = experiment.load_weights(tmp_path / "whole" / "student" / WEIGHTS_FILE)
    b = experiment.load_weights(tmp_path / "part" / "student" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [f.name for f in run.complete_checkpoints()] == ["epoch_0002", "epoch_0003"]  # epoch 2 rewritten whole


def test_a_fresh_run_sees_the_recorded_ray_train_run_in_an_external_storage_and_deletes_it_only_with_overwrite(
        tmp_path):
    from mtkd.checkpoint import write_json
    from mtkd.errors import RunExistsError
    from mtkd.experiment import RAY_RUN_FILE
    from mtkd.runner import prepare_run_dir

    storage, run = tmp_path / "storage", RunDirectory(tmp_path / "run")
    recorded, other = storage / "learner-1", storage / "learner-2"  # another run's, in the same storage
    for folder in (recorded, other):
        (folder / "checkpoint_2026-01-01_00-00-01.000000").mkdir(parents=True)
    run.create()
    write_json(run.path / RAY_RUN_FILE, {"name": "learner-1", "storage_path": str(storage)})
    assert run.held_checkpoints() == [recorded / "checkpoint_2026-01-01_00-00-01.000000"]
    with pytest.raises(RunExistsError) as refused:
        prepare_run_dir(run, resume=False, overwrite=False)
    assert "--resume" in str(refused.value) and "--overwrite" in str(refused.value)
    assert str(recorded / "checkpoint_2026-01-01_00-00-01.000000") in str(refused.value) and recorded.is_dir()
    prepare_run_dir(run, resume=False, overwrite=True)
    assert not recorded.exists() and other.is_dir() and not (run.path / RAY_RUN_FILE).exists()
    write_json(run.path / RAY_RUN_FILE, {"name": "../learner-2", "storage_path": str(storage)})  # never outside
    assert run.held_checkpoints() == [] and run.recorded_ray_run() is None
