"""The accuracy benchmark's quick mode: teachers trained (tiny), then ``ce``, ``aver`` and ``mtkd_rl`` over two
paired seeds in process, with the teachers' outputs shared through a private Redis; the report and its plot."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_fashion

pytestmark = [needs_fashion, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
# One torch thread for teachers and students: on a busy 2-core machine two OpenMP threads crawl.
ONE_THREAD = ["teacher.threads=1", "student.runtime.threads=1"]


@pytest.fixture
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_accuracy_benchmark_quick_mode(tmp_path, teacher_cache):
    run = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quick", "--seeds", "0", "1",
                          "--strategies", "ce", "aver", "mtkd_rl", "--output-dir", str(tmp_path / "acc"),
                          f"cache_dir={teacher_cache}", "teacher_models=[resnet8, vgg8]",
                          "student.runtime.teacher_precision=fp32", *ONE_THREAD],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert set(report["strategies"]) == {"ce", "aver", "mtkd_rl"} and report["seeds"] == [0, 1]
    for entry in report["strategies"].values():
        assert len(entry["final"]["values"]) == 2 and all(0 < v <= 1 for v in entry["final"]["values"])
    # per seed, aver computes the teachers' outputs and mtkd_rl (same batches) reads them all
    assert report["strategies"]["aver"]["cache_hit_rate"] < 0.5
    assert report["strategies"]["mtkd_rl"]["cache_hit_rate"] == 1.0
    assert (tmp_path / "acc" / "accuracy.png").stat().st_size > 5000
