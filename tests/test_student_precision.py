"""``runtime.student_precision``: fp32 stays the exact computation (``auto`` choosing fp32 trains
bit-identically to it, and its probe leaves the module and the RNG alone), a bf16 student trains with
fp32 master weights, and ``auto``'s decision (timings, agreement, choice) is recorded and cached."""
from __future__ import annotations

import math

import pytest
import torch

from mtkd.config import ExperimentConfig, load_config
from mtkd.data import Batch
from mtkd.engine import Distiller, as_float_outputs, build_trainable
from mtkd.models import create_model
from mtkd.precision_probe import (Bounds, ProbeCache, ProbeReport, Setting, Trial, choose_student_setting,
                                  student_candidates, student_key)
from mtkd.teachers import LocalTeacherPool, Teacher

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Batches of 16 gain nothing from threads (and the keys name the thread count)."""


def pool() -> LocalTeacherPool:
    teachers = []
    for name in ("resnet8", "vgg8"):
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=1)
        meta = {"model": name, "num_classes": 10, "in_channels": 1, "input_shape": list(SHAPE), "weights_digest": name}
        teachers.append(Teacher(model, meta))
    return LocalTeacherPool(teachers)


def experiment(cache, precision: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, ["student=resnet8", "data.batch_size=16", "runtime.runtime=inprocess",
                                                "distill.strategy=aver", f"runtime.probe_cache={cache}",
                                                f"runtime.student_precision={precision}"])


def train(distiller: Distiller, teachers: LocalTeacherPool, steps: int = 3) -> list[float]:
    generator = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        images, labels = torch.randn(16, *SHAPE, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        batch = Batch(0, images, labels, torch.arange(16))
        outputs = [as_float_outputs(o, distiller.device) for o in teachers.collect(teachers.submit(batch))]
        losses.append(distiller.step(images, labels, outputs).loss)
    return losses


def cache_decision(cache, config: ExperimentConfig, teachers: LocalTeacherPool, chosen: str) -> None:
    """Store ``chosen`` as the probe's decision for this student on this machine (as if it had been
    measured fastest here), under the key the engine looks up."""
    module = build_trainable(config, 10, SHAPE, teachers.describe())
    device = torch.device("cpu")
    settings = student_candidates(device)
    key = student_key(module, config.student, SHAPE, device, 16, torch.get_num_threads(), settings, Bounds())
    trials = [Trial(s.label, 1.0, 0.0, 0.0, True) for s in settings]
    ProbeCache(cache).put(ProbeReport(key, chosen, "stored by the test", trials))


def test_auto_probes_training_steps_records_the_decision_and_a_second_run_reads_it(tmp_path, capsys):
    teachers = pool()
    rng = torch.get_rng_state()
    exact = Distiller(experiment(tmp_path, "fp32"), teachers, 10, SHAPE, device="cpu")
    auto = Distiller(experiment(tmp_path, "auto"), teachers, 10, SHAPE, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # the probe drew from its own RNG
    probe = auto.student_probe
    labels = [t["setting"] for t in probe["trials"]]
    assert labels[:2] == ["fp32", "fp32+nhwc"] and probe["chosen"] in labels
    assert all(t["ms_per_batch"] > 0 and t["agrees"] for t in probe["trials"])  # a fresh student agrees
    assert auto.student_setting.label == probe["chosen"] and not probe["cached"]
    assert auto.precision == auto.student_setting.precision
    assert "student_precision auto: probe resnet8" in capsys.readouterr().err
    # the probe trained copies: the module starts from the same weights as the exact run's
    assert all(torch.equal(a, b) for a, b in zip(exact.module.state_dict().values(), auto.module.state_dict().values()))
    again = Distiller(experiment(tmp_path, "auto"), teachers, 10, SHAPE, device="cpu")
    assert again.student_probe["cached"] and again.student_setting == auto.student_setting
    assert exact.student_probe is None and exact.student_setting == Setting()


def test_auto_choosing_fp32_trains_bit_identically_to_fp32(tmp_path):
    teachers = pool()
    cache_decision(tmp_path, experiment(tmp_path, "auto"), teachers, "fp32")
    exact = Distiller(experiment(tmp_path, "fp32"), teachers, 10, SHAPE, device="cpu")
    auto = Distiller(experiment(tmp_path, "auto"), teachers, 10, SHAPE, device="cpu")
    assert auto.student_probe["cached"] and auto.precision == "fp32"
    assert train(exact, teachers) == train(auto, teachers)
    assert all(torch.equal(a, b) for a, b in zip(exact.module.parameters(), auto.module.parameters()))
    assert all(p.is_contiguous() for p in auto.module.parameters())


def test_a_bf16_student_chosen_by_auto_trains_with_fp32_master_weights(tmp_path):
    teachers = pool()
    cache_decision(tmp_path, experiment(tmp_path, "auto"), teachers, "bf16+nhwc")
    distiller = Distiller(experiment(tmp_path, "auto"), teachers, 10, SHAPE, device="cpu")
    assert distiller.precision == "bf16" and distiller.student_setting == Setting("bf16", channels_last=True)
    conv = next(p for p in distiller.module.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in distiller.module.parameters()]
    losses = train(distiller, teachers)
    assert all(math.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in distiller.module.parameters())  # the optimiser's weights stay fp32
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in distiller.optimizer.state.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.module.parameters()))


def test_a_student_whose_bf16_outputs_disagree_stays_in_fp32(tmp_path):
    """The agreement guard: a bound no reduced precision can meet keeps the student exact."""
    config = experiment(tmp_path, "auto")
    module = build_trainable(config, 10, SHAPE, pool().describe())
    settings = [Setting(), Setting("bf16", channels_last=True)]
    report = choose_student_setting(module, "resnet8", SHAPE, torch.device("cpu"), 8, cache=ProbeCache(tmp_path),
                                    bounds=Bounds(max_logit_kl=0.0, max_feature_rel_error=0.0), settings=settings)
    bf16 = report.trials[1]
    assert not bf16.agrees and bf16.feature_rel_error > 0 and report.chosen == "fp32"
    assert "bf16+nhwc rejected" in report.reason
