"""benchmarks/gpu.py: its settings grid, its --quick CPU run end to end (one JSON object whose numbers
are positive, finite and consistent), and a short CUDA run where a GPU is present."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # --quick takes seconds on a quiet 2-core machine, minutes on a loaded one


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_gpu", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(*args: str, json_path: Path | None = None) -> dict:
    extra = ["--json", str(json_path)] if json_path else []
    result = subprocess.run([sys.executable, "benchmarks/gpu.py", *args, *extra], cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout)
    assert "img/s" in result.stderr  # the readable table
    if json_path:
        assert json.loads(json_path.read_text()) == report
    return report


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_report(report: dict, strategies, precisions, layouts) -> None:
    results = report["results"]
    keys = {(r["strategy"], r["teacher_precision"], r["student_precision"], r["channels_last"]) for r in results}
    expected = set()
    for s in strategies:
        for t, st in precisions:
            for cl in layouts:
                expected.add((s, st if s == "ce" else t, st, cl))
    assert keys == expected and len(results) == len(expected)
    assert report["torch"] == torch.__version__ and report["device_name"]
    for r in results:
        assert positive(r["images_per_s"]) and positive(r["s_per_step_median"]), r
        assert len(r["s_per_step_rounds"]) == report["rounds"]
        assert math.isfinite(r["peak_memory_mb"]) and r["peak_memory_mb"] >= 0
        steps = report["rounds"] * report["timed_steps"]
        assert math.isclose(r["images_per_s"], steps * report["batch_size"] / sum(
            s * report["timed_steps"] for s in r["s_per_step_rounds"]), rel_tol=2e-2)
    for r in results:
        base = next(b for b in results if b["strategy"] == r["strategy"] and b["teacher_precision"] == "fp32"
                    and b["student_precision"] == "fp32" and b["channels_last"] in ("off", "auto"))
        assert math.isclose(r["speedup"], r["images_per_s"] / base["images_per_s"], rel_tol=1e-2)
        if r is base:
            assert r["speedup"] == 1.0


def test_settings_grid():
    gpu = load_benchmark()
    args = gpu.parse_args(["--device", "cpu", "--precisions", "fp32,bf16/fp32,bf16", "--channels-last", "on,off"])
    settings = gpu.settings_of(args)
    # ce runs no teacher: fp32 and bf16/fp32 are one setting
    assert len(settings) == 2 * 3 * 2 + 2 * 2
    assert gpu.parse_precision("bf16") == ("bf16", "bf16") and gpu.parse_precision("fp16") == ("fp16", "bf16")
    assert gpu.parse_precision("bf16/fp32") == ("bf16", "fp32")
    with pytest.raises(SystemExit):
        gpu.parse_precision("fp16/fp16")
    quick = gpu.parse_args(["--quick"])
    assert (quick.device.type, quick.batch_size, quick.channels_last) == ("cpu", 8, ["auto"])


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_quick_cpu(tmp_path):  # about 10 s with one thread on a busy 2-core machine
    report = run("--quick", json_path=tmp_path / "gpu.json")
    assert report["device"] == "cpu" and report["quick"] and report["batch_size"] == 8
    assert report["peak_memory"].startswith("peak growth of the process's resident set")
    check_report(report, ("ce", "aver", "mtkd_rl"), (("fp32", "fp32"), ("bf16", "bf16")), ("auto",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_cuda_short(tmp_path):
    report = run("--device", "cuda", "--batch-size", "32", "--steps", "3", "--warmup", "2",
                 "--precisions", "fp32,bf16", "--channels-last", "on,off", json_path=tmp_path / "gpu.json")
    assert report["device"].startswith("cuda") and report["cudnn_benchmark"] and not report["skipped"]
    assert report["peak_memory"].startswith("torch.cuda.max_memory_allocated")
    check_report(report, ("ce", "aver", "mtkd_rl"), (("fp32", "fp32"), ("bf16", "bf16")), ("on", "off"))
    for r in report["results"]:
        assert r["peak_memory_mb"] >= r["resident_memory_mb"] > 0
