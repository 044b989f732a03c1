"""The in-process engine end to end on real data: outputs, exact resume, guards."""
from __future__ import annotations

import json

import pytest
import torch

from mtkd.checkpoint import CheckpointError, load_weights
from mtkd.config import TeacherSpec
from mtkd.distill import STRATEGIES
from mtkd.engine import Distiller, NonFiniteLossError, PoolMismatchError
from mtkd.experiment import RunDirectory
from mtkd.runner import load_local_pool, run_inprocess, train_and_record
from mtkd.session import Session
from mtkd.teachers import LocalTeacherPool, load_model_checkpoint

from conftest import needs_fashion, small_experiment

pytestmark = needs_fashion


def test_distill_writes_metrics_plot_checkpoints_and_student(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "run", teacher_dirs)
    summary = run_inprocess(config, progress=False)
    run = RunDirectory(tmp_path / "run")
    metrics = run.read(run.metrics_path)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("loss/total", "loss/ce", "loss/kd", "loss/feature", "train/acc", "test/acc", "reward/mean",
                "reward/normalized_mean", "weights/logit/resnet8", "weights/feature/vgg8", "agent/loss"):
        assert key in metrics[-1], key
    # warm-up epoch: all weights are 1; afterwards a distribution over the two teachers
    assert metrics[0]["weights/logit/resnet8"] == 1.0
    assert metrics[1]["weights/logit/resnet8"] + metrics[1]["weights/logit/vgg8"] == pytest.approx(1.0, abs=1e-5)
    steps = run.read(run.steps_path)
    assert [s["step"] for s in steps] == list(range(1, 9))  # 128 samples / 32 per batch x 2 epochs
    assert run.plot_path.stat().st_size > 1000
    assert run.latest_checkpoint().name == "epoch_0002"
    model, meta = load_model_checkpoint(summary["student"])
    assert meta["model"] == "resnet8" and meta["test_accuracy"] == metrics[-1]["test/acc"]


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "run", teacher_dirs, ["optim.epochs=1", "distill.strategy=aver"])
    run_inprocess(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_inprocess(config, progress=False)


@pytest.mark.parametrize("agent", [["agent.rule=reference"], ["agent.rule=reinforce", "agent.mixing=dynamic"]],
                         ids=["reference", "reinforce-dynamic"])
def test_resume_is_bit_identical(tmp_path, teacher_dirs, agent):
    overrides = ["optim.epochs=3", "optim.milestones=[2]", "distill.strategy=mtkd_rl", *agent]
    whole = run_inprocess(small_experiment(tmp_path / "whole", teacher_dirs, overrides), progress=False)
    part = small_experiment(tmp_path / "part", teacher_dirs, overrides)
    run_inprocess(part, stop_after_epoch=1, progress=False)
    assert RunDirectory(tmp_path / "part").latest_checkpoint().name == "epoch_0001"
    resumed = run_inprocess(small_experiment(tmp_path / "part", teacher_dirs, overrides), resume=True, progress=False)
    assert resumed["epochs"] == whole["epochs"] == 3
    a = load_weights(tmp_path / "whole" / "student" / "weights.safetensors")
    b = load_weights(tmp_path / "part" / "student" / "weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = lambda d: [s["loss"] for s in RunDirectory(d).read(RunDirectory(d).steps_path)]  # noqa: E731
    assert losses(tmp_path / "whole") == losses(tmp_path / "part")
    ckpt_a = load_weights(tmp_path / "whole" / "checkpoints" / "epoch_0003" / "weights.safetensors")
    ckpt_b = load_weights(tmp_path / "part" / "checkpoints" / "epoch_0003" / "weights.safetensors")
    assert all(torch.equal(ckpt_a[k], ckpt_b[k]) for k in ckpt_a if k.startswith("policy."))


def test_resume_with_another_pool_is_refused(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "run", teacher_dirs, ["optim.epochs=2"])
    run_inprocess(config, stop_after_epoch=1, progress=False)
    swapped = small_experiment(tmp_path / "run", list(reversed(teacher_dirs)), ["optim.epochs=2"])
    with pytest.raises(CheckpointError, match="teacher pool differs at teacher 0.*name was 'resnet8', now 'vgg8'"):
        run_inprocess(swapped, resume=True, progress=False)
    fewer = small_experiment(tmp_path / "run", teacher_dirs[:1], ["optim.epochs=2"])
    with pytest.raises(CheckpointError, match="the run has 2 teachers, got 1"):
        run_inprocess(fewer, resume=True, progress=False)


def test_class_count_and_input_shape_must_agree(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "run", teacher_dirs)
    pool = load_local_pool(config)
    with pytest.raises(PoolMismatchError, match="predicts 10 classes but the dataset has 100"):
        Distiller(config, pool, 100, (1, 28, 28))
    with pytest.raises(PoolMismatchError, match=r"takes input \(1, 28, 28\) but the dataset gives \(3, 32, 32\)"):
        Distiller(config, pool, 10, (3, 32, 32))


class _PoisonedPool(LocalTeacherPool):
    """Real teachers, but the logits of one chosen batch become NaN."""

    def __init__(self, teachers, poison_call: int):
        super().__init__(teachers)
        self.calls, self.poison_call = 0, poison_call

    def collect(self, ticket):
        outputs = super().collect(ticket)
        self.calls += 1
        if self.calls == self.poison_call:
            outputs[0] = outputs[0]._replace(logits=torch.full_like(outputs[0].logits, float("nan")))
        return outputs


def test_non_finite_loss_names_step_and_part_and_keeps_last_checkpoint(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "run", teacher_dirs, ["distill.strategy=aver", "runtime.prefetch=0"])
    session = Session.build(config, _PoisonedPool(load_local_pool(config).teachers, poison_call=6))
    run = RunDirectory(config.output_dir)
    run.create()
    with pytest.raises(NonFiniteLossError, match="epoch 2 step 6: loss part 'kd'"):
        train_and_record(session, run, progress=False)
    assert run.latest_checkpoint().name == "epoch_0001"
    assert [m["epoch"] for m in run.read(run.metrics_path)] == [1]


def test_ce_needs_no_teachers_and_others_need_some(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "ce", [], ["distill.strategy=ce", "optim.epochs=1"])
    assert run_inprocess(config, progress=False)["test_acc"] > 0
    config = small_experiment(tmp_path / "aver", [], ["distill.strategy=aver"])
    with pytest.raises(PoolMismatchError, match="'aver' needs at least one teacher"):
        run_inprocess(config, progress=False)


def test_address_teachers_need_the_ray_runtime(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "run", teacher_dirs)
    config.teachers.append(TeacherSpec(name="far", address="127.0.0.1:1"))
    with pytest.raises(ValueError, match="need the Ray runtime"):
        run_inprocess(config, progress=False)


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_every_strategy_trains_end_to_end(tmp_path, teacher_dirs, strategy):
    config = small_experiment(tmp_path / "run", teacher_dirs, ["optim.epochs=2", f"distill.strategy={strategy}",
                                                              "distill.warmup_epochs=0"])
    run_inprocess(config, progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert len(lines) == 2 and 0 < last["test/acc"] <= 1
    if strategy != "ce":
        total = last["weights/logit/resnet8"] + last["weights/logit/vgg8"]
        assert total == pytest.approx(1.0, abs=1e-5)  # every strategy's weights are a distribution


def test_teacher_names_must_be_unique(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path / "run", [teacher_dirs[0], teacher_dirs[0]])
    with pytest.raises(PoolMismatchError, match="'resnet8' appear"):
        Distiller(config, load_local_pool(config), 10, (1, 28, 28))
    config.teachers[1].name = "resnet8-bis"
    assert Distiller(config, load_local_pool(config), 10, (1, 28, 28)).teacher_names == ["resnet8", "resnet8-bis"]


def test_stop_after_epoch_is_checked_before_training(tmp_path, teacher_dirs):
    overrides = ["optim.epochs=2", "distill.strategy=aver"]
    run_inprocess(small_experiment(tmp_path / "run", teacher_dirs, overrides), stop_after_epoch=1, progress=False)
    again = run_inprocess(small_experiment(tmp_path / "run", teacher_dirs, overrides), resume=True,
                          stop_after_epoch=1, progress=False)
    assert again["epochs"] == 1 and len(again["history"]) == 1
