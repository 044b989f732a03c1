"""benchmarks/grpc_load.py --quick runs end to end and reports sane numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_grpc_load_benchmark_quick():
    result = subprocess.run([sys.executable, "benchmarks/grpc_load.py", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["in_process"]["images_per_s"] > 0
    assert set(report["served"]) == {"1", "16"} and set(report["ratio_to_in_process"]) == {"1", "16"}
    for clients, served in report["served"].items():
        assert served["failures"] == 0 and served["requests"] >= int(clients), clients
        assert served["images_per_s"] > 0 and 0 < served["p50_ms"] <= served["p99_ms"]
    assert report["max_abs_logit_difference_served_vs_in_process"] <= 1e-4
    wire = report["wire_bytes_per_image"]  # resnet8, 10 classes: 40 bytes of float32 logits per image
    assert 40 < wire["logits_only_float32"] < wire["all_outputs_float32"]
    for outputs in ("logits_only", "all_outputs"):
        assert wire[f"{outputs}_float16"] < 0.75 * wire[f"{outputs}_float32"], outputs
