"""The driver's side of the learners' events: each epoch appears once in the run folder, and an epoch
whose checkpoint was persisted but whose line never reached the folder (the driver died, or lost Ray,
in between) is written from the checkpoint on resume."""
from __future__ import annotations

import pytest

pytest.importorskip("ray")

from mtkd.experiment import RunDirectory  # noqa: E402
from services.learner.events import EventWriter  # noqa: E402


def epoch_metrics(epoch: int) -> dict:
    return {"epoch": epoch, "step": 4 * epoch, "loss/total": 1.0 / epoch, "test/acc": 0.1 * epoch}


def writer(tmp_path) -> EventWriter:
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir(parents=True, exist_ok=True)
    return EventWriter(queue=None, run=run, epochs=4, title="t", progress=False)


def test_a_resume_writes_the_epoch_line_its_checkpoint_ends_when_the_folder_lost_it(tmp_path):
    events = writer(tmp_path)
    events.handle({"kind": "start", "epoch": 0, "global_step": 0, "steps_per_epoch": 4, "restored": None})
    events.handle({"kind": "epoch", "metrics": epoch_metrics(1)})
    # epoch 2's checkpoint was persisted, its line was not: the resumed learner restores epoch 2
    resumed = writer(tmp_path)
    resumed.handle({"kind": "start", "epoch": 2, "global_step": 8, "steps_per_epoch": 4, "restored": epoch_metrics(2)})
    resumed.handle({"kind": "epoch", "metrics": epoch_metrics(3)})
    run = RunDirectory(tmp_path / "run")
    assert [m["epoch"] for m in run.read(run.metrics_path)] == [1, 2, 3]
    assert run.read(run.metrics_path)[1] == epoch_metrics(2)


def test_a_resume_never_writes_an_epoch_line_twice(tmp_path):
    events = writer(tmp_path)
    events.handle({"kind": "start", "epoch": 0, "global_step": 0, "steps_per_epoch": 4, "restored": None})
    for epoch in (1, 2):
        events.handle({"kind": "epoch", "metrics": epoch_metrics(epoch)})
    resumed = writer(tmp_path)
    resumed.handle({"kind": "start", "epoch": 2, "global_step": 8, "steps_per_epoch": 4, "restored": epoch_metrics(2)})
    # and a resume from an older checkpoint drops the lines of the work it does again
    again = writer(tmp_path)
    again.handle({"kind": "start", "epoch": 1, "global_step": 4, "steps_per_epoch": 4, "restored": epoch_metrics(1)})
    run = RunDirectory(tmp_path / "run")
    assert [m["epoch"] for m in run.read(run.metrics_path)] == [1]
