"""The speed benchmarks (benchmarks/step_time.py, serving.py, cache_speed.py) run end to end in
their --quick mode and print one JSON object whose numbers are positive, finite and consistent
(every ratio is the ratio of the times or rates printed beside it)."""
from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_fashion

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # a quick run takes well under a minute on a quiet 2-core machine; much longer on a loaded one

pytestmark = [needs_fashion, pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 60)]


def run_quick(script: str, *extra: str) -> dict:
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", *extra], cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-5000:]
    out = result.stdout
    start = 0 if out.startswith("{") else out.rindex("\n{\n") + 1  # anything printed before the report
    return json.loads(out[start:])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def close(a: float, b: float, rel: float = 1e-2) -> bool:
    return math.isclose(a, b, rel_tol=rel)


@pytest.mark.ray
def test_step_time_quick():
    report = run_quick("step_time.py")
    times = report["seconds_per_step"]
    settings = {f"inprocess_{t}_{s}" for t in ("1thread", "defaultthreads") for s in ("aver", "mtkd_rl")}
    settings |= {f"ray_prefetch1_{s}" for s in ("aver", "mtkd_rl")}  # --quick: prefetch 0 is not timed
    assert set(times) == settings
    assert all(positive(v) for v in times.values()), times
    for name, epochs in report["timed_epochs_seconds_per_step"].items():
        assert epochs and all(positive(v) for v in epochs), name
        assert close(statistics.median(epochs), times[name], 1e-3), name
    ratios = report["ratios"]
    for prefix in ("inprocess_1thread", "inprocess_defaultthreads", "ray_prefetch1"):
        assert close(ratios[f"{prefix}:mtkd_rl/aver"], times[f"{prefix}_mtkd_rl"] / times[f"{prefix}_aver"])
    for p in (1,):
        for s in ("aver", "mtkd_rl"):
            assert close(ratios[f"ray_prefetch{p}/inprocess_1thread:{s}"],
                         times[f"ray_prefetch{p}_{s}"] / times[f"inprocess_1thread_{s}"])
    memory = report["peak_memory"]
    for strategy in ("aver", "mtkd_rl"):
        m = memory[strategy]
        assert positive(m["ru_maxrss_mib"]) and positive(m["rss_after_setup_mib"]), m
        assert m["ru_maxrss_mib"] >= m["rss_after_setup_mib"]
    assert close(memory["ratio_ru_maxrss:mtkd_rl/aver"],
                 memory["mtkd_rl"]["ru_maxrss_mib"] / memory["aver"]["ru_maxrss_mib"])
    assert report["agent_rule"] == "meta"  # the default: it learns inside the step and stores no experience
    assert memory["mtkd_rl"]["agent_buffer_bound_mib"] == memory["mtkd_rl"]["agent_buffer_bound_full_epoch_mib"] == 0
    assert report["teachers"] == ["resnet8", "vgg8"] and report["teacher_precision"] == "fp32"
    assert len(report["load_average_1min_before_after"]) == 2


@pytest.mark.ray
def test_serving_quick():
    report = run_quick("serving.py")
    per_r = report["replicas"]
    assert set(per_r) == {"1", "2", "4"}
    batch, latency_s = report["batch_size"], report["latency_ms"] / 1e3
    assert positive(report["learner_seconds_per_step"])
    cap = report["learner_cap_samples_per_s"]
    assert close(cap, batch / report["learner_seconds_per_step"])
    for r, m in per_r.items():
        assert positive(m["samples_per_s"]) and positive(m["ideal_samples_per_s"]), r
        assert close(m["ratio_to_1_replica"], m["samples_per_s"] / per_r["1"]["samples_per_s"]), r
        assert close(m["ideal_samples_per_s"], min(int(r) * batch / latency_s, cap)), r
        assert close(m["measured_over_ideal"], m["samples_per_s"] / m["ideal_samples_per_s"]), r
        # every call sleeps out its latency: R replicas can never serve more than R batches per latency
        assert m["samples_per_s"] <= int(r) * batch / latency_s * 1.02, r
        assert positive(m["serving_only_samples_per_s"]), r
        assert m["serving_only_samples_per_s"] <= int(r) * batch / latency_s * 1.02, r
        assert close(m["serving_only_ratio_to_1_replica"],
                     m["serving_only_samples_per_s"] / per_r["1"]["serving_only_samples_per_s"]), r
    # each replica count trains a warm-up epoch and the timed ones, and serves the timed ones once
    # more without training; every batch is one call
    calls = sum(s["calls"] for s in report["replica_stats"])
    assert calls == 3 * (1 + 2 * report["repeats"]) * report["steps_per_epoch"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_cache_speed_quick():
    report = run_quick("cache_speed.py")
    assert "ray" not in report  # --quick measures in process only
    inproc = report["inprocess"]
    times = inproc["seconds_per_step"]
    assert set(times) == {"cold", "warm", "none"} and all(positive(v) for v in times.values()), times
    assert close(inproc["ratios"]["warm/cold"], times["warm"] / times["cold"])
    assert close(inproc["ratios"]["warm/none"], times["warm"] / times["none"])
    hits = inproc["cache_hit_rate_per_epoch"]
    epochs = 1 + report["timed_epochs"]
    assert hits["warm"] == [1.0] * epochs  # the second run reads every teacher output from the cache
    assert hits["cold"][0] == 0.0 and all(h < 0.5 for h in hits["cold"])  # new crops and flips each epoch
    assert hits["none"] == [None] * epochs
    assert positive(inproc["redis_used_bytes"])
