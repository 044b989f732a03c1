"""``teacher_precision: auto``: the probe measures every candidate setting, keeps a teacher whose
reduced-precision outputs disagree with fp32 in fp32 (with the reason), and caches its decision on
disk under a key that changes with anything the decision depends on. ``compile_teachers: auto``:
the break-even arithmetic, a measurement made once and read from the cache, the log line."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mtkd.models import Outputs, create_model
from mtkd.precision_probe import (ASSUMED_COMPILE_S, ASSUMED_SAVING, EXACT, Bounds, CompileMeasurement, ProbeCache,
                                  Setting, Trial, break_even_calls, choose_setting, compile_decision, compile_key,
                                  decide, logit_kl, plan_from, planned_teacher_calls, probe_teacher,
                                  setting_from_label, worth_measuring)
from mtkd.teachers import Teacher

BF16 = Setting("bf16", channels_last=True, fold_batchnorm=True)


class HugeLogits(nn.Module):
    """A real conv net whose logits are ~1e4 apart by ~1: bf16 (8 significant bits, a step of 64 at
    1e4) rounds their differences away, so its softmax is far from fp32's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(0.5, 1.5, 20).reshape(5, 4))
            self.fc.bias.fill_(1e4)

    def forward(self, x):
        feature = torch.relu(self.bn(self.conv(x)))
        embedding = feature.mean((2, 3))
        return Outputs(self.fc(embedding), embedding, feature)


def meta_of(name: str, shape=(1, 12, 12), digest: str = "d0") -> dict:
    return {"model": name, "num_classes": 5, "input_shape": list(shape), "weights_digest": digest}


def test_a_teacher_that_disagrees_in_bf16_is_kept_in_fp32_with_the_reason(tmp_path, capsys):
    meta = meta_of("huge")
    report = probe_teacher(HugeLogits().eval(), meta, torch.device("cpu"), 8, settings=[EXACT, BF16], repeats=1)
    bf16 = next(t for t in report.trials if t.setting == BF16.label)
    assert not bf16.agrees and bf16.logit_kl > 1e-3 and "logit KL" in bf16.note
    assert report.chosen == "fp32" and "bf16+nhwc+foldbn rejected: logit KL" in report.reason
    # the same through a teacher built with precision=auto: the reason is in its log line and describe()
    teacher = Teacher(HugeLogits(), meta, precision="auto", probe_batch=8, probe_cache=str(tmp_path))
    assert teacher.precision == "fp32" and teacher.describe()["probe"]["chosen"] in ("fp32", "fp32+nhwc")
    assert "rejected: logit KL" in capsys.readouterr().err


def test_agreeing_settings_are_measured_and_the_choice_follows_the_timings():
    meta = meta_of("resnet8", (1, 16, 16))
    model = create_model("resnet8", num_classes=5, in_channels=1)
    report = probe_teacher(model, meta, torch.device("cpu"), 4, settings=[EXACT, Setting("fp32", True), BF16],
                           repeats=1)
    assert [t.setting for t in report.trials] == ["fp32", "fp32+nhwc", "bf16+nhwc+foldbn"]
    assert all(t.agrees and t.ms_per_batch > 0 for t in report.trials)
    assert report.trials[0].logit_kl == 0.0 and report.trials[0].feature_rel_error == 0.0
    fastest = min(report.trials, key=lambda t: t.ms_per_batch)
    assert report.chosen in ("fp32", fastest.setting)
    assert next(iter(model.parameters())).is_contiguous()  # the caller's module is left as it was


def test_decide_keeps_exact_fp32_unless_another_is_faster_by_the_margin():
    def trials(*ms):
        return [Trial(label, m, 0.0, 0.0, True) for label, m in zip(("fp32", "fp32+nhwc", "bf16+nhwc+foldbn"), ms)]

    assert decide(trials(10.0, 9.8, 9.9), Bounds(margin=0.05))[0] == "fp32"  # 2% faster: noise
    assert decide(trials(10.0, 9.0, 5.0), Bounds(margin=0.05))[0] == "bf16+nhwc+foldbn"
    disagreeing = trials(10.0, 9.0, 5.0)
    disagreeing[2] = Trial("bf16+nhwc+foldbn", 5.0, 0.1, 0.0, False, "logit KL 0.1 > 0.001")
    chosen, reason = decide(disagreeing, Bounds(margin=0.05))
    assert chosen == "fp32+nhwc" and "bf16+nhwc+foldbn rejected" in reason
    assert setting_from_label("bf16+nhwc+foldbn") == BF16 and setting_from_label("fp32") == EXACT
    assert logit_kl(torch.zeros(2, 3), torch.tensor([[float("inf"), 0, 0], [0, 0, 0]])) == float("inf")


def test_the_decision_is_cached_and_any_key_change_probes_again(tmp_path):
    model = create_model("resnet8", num_classes=5, in_channels=1)
    cache = ProbeCache(tmp_path)
    settings = [EXACT, BF16]

    def choose(meta, batch, **kw):
        return choose_setting(model, meta, torch.device("cpu"), batch, cache=cache, settings=settings, **kw)

    first = choose(meta_of("resnet8", (1, 16, 16)), 4)
    second = choose(meta_of("resnet8", (1, 16, 16)), 4)
    assert not first.cached and second.cached and second.chosen == first.chosen
    assert second.trials == first.trials and len(list(tmp_path.glob("*.json"))) == 1
    assert not choose(meta_of("resnet8", (1, 16, 16)), 8).cached  # batch shape
    assert not choose(meta_of("resnet8", (1, 16, 16), digest="d1"), 4).cached  # other weights
    assert not choose(meta_of("resnet8", (1, 16, 16)), 4, bounds=Bounds(max_logit_kl=1e-4)).cached  # bounds
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        assert not choose(meta_of("resnet8", (1, 16, 16)), 4).cached  # threads
    finally:
        torch.set_num_threads(threads)
    key = second.key
    assert {"device", "torch", "weights_digest", "batch_shape", "threads"} <= set(key)
    assert key["device"].startswith("cpu: ")
    cache.path(key).write_text("{not json")  # a damaged entry is probed again, not trusted
    assert not choose(meta_of("resnet8", (1, 16, 16)), 4).cached


def test_mtkd_probe_prints_the_table_and_a_second_call_reads_the_cache(tmp_path, teacher_dirs, capsys):
    from mtkd.cli import main

    teachers = "teachers=[" + ", ".join(f"{{checkpoint: {d}}}" for d in teacher_dirs) + "]"
    argv = ["probe", teachers, "data.batch_size=8", f"runtime.probe_cache={tmp_path}", "runtime.device=cpu",
            "runtime.runtime=inprocess", "data.train_subset=64"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "| resnet8 |" in first and "| vgg8 |" in first and "probed in" in first and "fp32 ms" in first
    assert main(argv) == 0
    assert capsys.readouterr().out.count("| cached |") == 2  # no probe the second time
    assert main([*argv, "runtime.teacher_precision=fp32"]) == 0
    assert "fp32 (fixed by runtime.teacher_precision)" in capsys.readouterr().out


def test_mtkd_probe_prints_the_students_row_and_what_compile_auto_would_do(tmp_path, teacher_dirs, capsys):
    from mtkd.cli import main

    teachers = "teachers=[" + ", ".join(f"{{checkpoint: {d}}}" for d in teacher_dirs) + "]"
    argv = ["probe", teachers, "data.batch_size=8", f"runtime.probe_cache={tmp_path}", "runtime.device=cpu",
            "runtime.runtime=inprocess", "runtime.student_precision=auto", "runtime.teacher_precision=fp32",
            "student=resnet8", "data.train_subset=80", "optim.epochs=2", "optim.milestones=[]"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    student = next(line for line in first.splitlines() if line.startswith("| student resnet8 |"))
    assert "probed in" in student and "fp32+nhwc" in first  # every candidate timed
    assert "compile_teachers auto (false in this config)" in first
    assert "| resnet8 | 20 |" in first and "stay eager" in first  # 2 epochs x 10 batches: too short to measure
    assert main(argv) == 0
    assert "| student resnet8 |" in (second := capsys.readouterr().out) and "| cached |" in second


# ---------------------------------------------------------------------- compile_teachers: auto
class Tiny(nn.Module):
    """A two-layer conv net: inductor compiles it in seconds on a CPU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        feature = torch.relu(self.conv(x))
        embedding = feature.mean((2, 3))
        return Outputs(self.fc(embedding), embedding, feature)


def test_break_even_arithmetic():
    assert break_even_calls(60.0, 12.0) == pytest.approx(5000)  # 60 s / 12 ms
    assert break_even_calls(60.0, 0.0) == float("inf") and break_even_calls(-1.0, 5.0) == 0.0
    assert compile_decision(5001, 60.0, 112.0, 100.0, margin=0.05) == (True, "5001 calls > break-even 5000")
    assert compile_decision(5000, 60.0, 112.0, 100.0, margin=0.05)[0] is False
    chosen, reason = compile_decision(10**9, 60.0, 103.0, 100.0, margin=0.05)  # 3% faster: noise
    assert not chosen and "not 5% faster" in reason
    # measure only when even a pessimistic saving of ASSUMED_SAVING would repay ASSUMED_COMPILE_S
    threshold = round(ASSUMED_COMPILE_S / (ASSUMED_SAVING * 0.1))  # eager 100 ms: 12000 calls
    assert worth_measuring(threshold + 1, 100.0) and not worth_measuring(threshold - 1, 100.0)
    bounds = Bounds()
    assert plan_from("t", 10**6, None, 100.0, bounds).decision == "measure"
    assert plan_from("t", 100, None, 100.0, bounds).decision == "eager"
    assert plan_from("t", None, None, 100.0, bounds).reason == "the run's number of calls is unknown"
    good = CompileMeasurement({}, 60.0, 112.0, 100.0, 0.0, 1e-7)
    assert plan_from("t", 6000, good, None, bounds).decision == "compile"
    wrong = CompileMeasurement({}, 60.0, 112.0, 100.0, 0.5, 1e-7)  # compiled outputs off: never compiled
    plan = plan_from("t", 10**9, wrong, None, bounds)
    assert plan.decision == "eager" and "disagree" in plan.reason


def test_a_cached_measurement_decides_and_the_line_gives_its_numbers(tmp_path, capsys):
    meta = meta_of("tiny")
    key = compile_key(meta, torch.device("cpu"), 8, torch.get_num_threads(), EXACT)
    ProbeCache(tmp_path).put(CompileMeasurement(key, 61.2, 100.0, 87.7, 0.0, 1e-7))
    teacher = Teacher(Tiny(), meta, compile="auto", probe_batch=8, probe_cache=str(tmp_path), planned_calls=24000)
    assert teacher.compiled and "compiled" in teacher.describe()["numerics"]
    assert ("compile_teachers auto: tiny: compile 61.2 s, saves 12.3 ms/call, 24000 calls -> compile "
            "(24000 calls > break-even 4976) [cached]") in capsys.readouterr().err
    recorded = teacher.describe()["compile"]
    assert recorded["decision"] == "compile" and recorded["break_even_calls"] == 4976 and recorded["calls"] == 24000
    short = Teacher(Tiny(), meta, compile="auto", probe_batch=8, probe_cache=str(tmp_path), planned_calls=4000)
    assert not short.compiled and short.describe()["compile"]["decision"] == "eager"
    assert "cpu-fp32-torch" in short.describe()["numerics"]


def test_a_short_run_does_not_compile_to_measure(tmp_path, capsys):
    teacher = Teacher(Tiny(), meta_of("tiny"), compile="auto", probe_batch=8, probe_cache=str(tmp_path),
                      planned_calls=50)
    assert not teacher.compiled and not list(tmp_path.glob("*.json"))
    plan = teacher.describe()["compile"]
    assert plan["decision"] == "eager" and plan["source"] == "not measured" and plan["compile_s"] is None
    assert "compile_teachers auto: tiny: not measured, 50 calls -> eager (50 calls x" in capsys.readouterr().err
    assert not Teacher(Tiny(), meta_of("tiny"), compile="auto", probe_cache=str(tmp_path)).compiled  # calls unknown
    with pytest.raises(ValueError, match="expected True, False or 'auto', got 'yes'"):
        Teacher(Tiny(), meta_of("tiny"), compile="yes")


@pytest.mark.slow  # a real inductor compile of a tiny net
def test_compile_auto_measures_once_and_a_second_teacher_reads_the_measurement(tmp_path, capsys):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    # a run long enough for even a pessimistic saving to pay: compiled once to measure
    first = Teacher(Tiny(), meta_of("tiny"), compile="auto", probe_batch=8, probe_cache=str(tmp_path),
                    planned_calls=10**9)
    plan = first.describe()["compile"]
    assert plan["source"] == "measured" and plan["compile_s"] >= 0 and plan["eager_ms"] > 0
    assert counters["stats"]["unique_graphs"] > graphs and len(list(tmp_path.glob("*.json"))) == 1
    assert first.compiled == (plan["decision"] == "compile")  # kept compiled when it pays: not wasted
    images = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        eager = first.model(images)
    assert torch.allclose(first.infer(images).logits, eager[0], rtol=1e-4, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    second = Teacher(Tiny(), meta_of("tiny"), compile="auto", probe_batch=8, probe_cache=str(tmp_path),
                     planned_calls=10)
    again = second.describe()["compile"]
    assert again["source"] == "cached" and again["compile_s"] == plan["compile_s"] and again["decision"] == "eager"
    assert counters["stats"]["unique_graphs"] == graphs  # no second compile
    assert "[cached]" in capsys.readouterr().err


def test_planned_teacher_calls_count_the_batches_the_teachers_compute():
    from mtkd.config import ExperimentConfig, load_config

    def calls(*overrides, train_size=1000):
        config = load_config(ExperimentConfig, None, ["data.batch_size=64", "optim.epochs=3", "optim.milestones=[]",
                                                      *overrides])
        return planned_teacher_calls(config, train_size)

    assert calls() == 3 * 15  # the last partial batch is dropped
    assert calls("cache.url=local", "data.augment_bank=2") == 2 * 15  # the cache serves the repeats
    assert calls("cache.url=local", "data.augment=false") == 15
    assert calls("cache.url=local") == 3 * 15  # fresh augmentations every epoch: no repeats
    assert calls("distill.strategy=ce") == 0
    assert calls("data.train_subset=640", train_size=None) == 3 * 10
