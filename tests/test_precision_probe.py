"""``teacher_precision: auto``: the probe measures every candidate setting, keeps a teacher whose
reduced-precision outputs disagree with fp32 in fp32 (with the reason), and caches its decision on
disk under a key that changes with anything the decision depends on."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mtkd.models import Outputs, create_model
from mtkd.precision_probe import (EXACT, Bounds, ProbeCache, Setting, Trial, choose_setting, decide, logit_kl,
                                  probe_teacher, setting_from_label)
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
            "runtime.runtime=inprocess"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "| resnet8 |" in first and "| vgg8 |" in first and "probed in" in first and "fp32 ms" in first
    assert main(argv) == 0
    assert capsys.readouterr().out.count("| cached |") == 2  # no probe the second time
    assert main([*argv, "runtime.teacher_precision=fp32"]) == 0
    assert "fp32 (fixed by runtime.teacher_precision)" in capsys.readouterr().out
