"""The session every runtime loops over: build, train an epoch, save, restore into a new session."""
from __future__ import annotations

import pytest

from mtkd.checkpoint import CheckpointError
from mtkd.runner import load_local_pool
from mtkd.session import Session

from conftest import needs_fashion, small_experiment

pytestmark = needs_fashion


def build(tmp_path, teacher_dirs, overrides=()) -> Session:
    config = small_experiment(tmp_path, teacher_dirs, ["optim.epochs=2", "agent.agent_step=2", *overrides])
    return Session.build(config, load_local_pool(config))


def train(session: Session, stop_after_epoch: int | None = None) -> list[dict]:
    steps: list[dict] = []
    for _ in session.epochs(stop_after_epoch):
        metrics = session.train_epoch(steps.append)
        assert {"test/acc", "loss/total", "weights/logit/resnet8"} <= metrics.keys()
    return steps


def test_a_restored_session_continues_exactly(tmp_path, teacher_dirs, one_torch_thread):
    whole = build(tmp_path / "whole", teacher_dirs)
    assert whole.epochs() == range(0, 2) and whole.epochs(stop_after_epoch=1) == range(0, 1)
    reference = train(whole)
    assert [s["step"] for s in reference] == list(range(1, 9)) and reference[-1]["epoch"] == 2

    first = build(tmp_path / "part", teacher_dirs)
    steps = train(first, stop_after_epoch=1)
    first.save(tmp_path / "ckpt", {"epoch": 1})
    second = build(tmp_path / "part", teacher_dirs)  # a new process would build it the same way
    meta = second.restore(tmp_path / "ckpt")
    assert meta["epoch"] == 1 and meta["metrics"] == {"epoch": 1} and second.epochs() == range(1, 2)
    steps += train(second)
    assert steps == reference  # step records (losses included) bit for bit: weights, optimiser, agent, RNG


def test_restore_refuses_another_student(tmp_path, teacher_dirs, one_torch_thread):
    session = build(tmp_path, teacher_dirs, ["distill.strategy=aver"])
    session.save(tmp_path / "ckpt")
    other = build(tmp_path, teacher_dirs, ["distill.strategy=aver", "student=vgg8"])
    with pytest.raises(CheckpointError, match="student differs: the run trains 'resnet8', got 'vgg8'"):
        other.restore(tmp_path / "ckpt")
