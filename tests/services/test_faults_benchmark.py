"""``benchmarks/faults.py --quick`` on a real local Ray: the driver killed with SIGKILL mid-run, then
resumed, ends with the uninterrupted run's student bit for bit, every epoch recorded once, no
checkpoint lost and no process left behind (the full benchmark, every fault, is in docs/faults.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from conftest import needs_fashion  # noqa: E402

pytestmark = [needs_fashion, pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_quick_fault_benchmark_loses_nothing(tmp_path, teacher_dirs):
    out = tmp_path / "faults.json"
    done = subprocess.run([sys.executable, "benchmarks/faults.py", "--quick", "--work", str(tmp_path / "work"),
                           "--out", str(out), "--teachers", ",".join(teacher_dirs)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    trials = {t["fault"]: t for t in result["trials"]}
    assert set(trials) == {"driver_kill9"}, result
    assert result["reference"]["epochs_once"] and not result["reference"]["left_over"]
    for fault, trial in trials.items():
        assert not trial["injected"].startswith(("not injected", "no ")), trial  # the fault really happened
        assert trial["identical"] and trial["epochs_once"], trial
        assert trial["left_over"] == [] and trial["checkpoints_lost"] == [], trial
    assert trials["driver_kill9"]["finished"] == "resumed" and trials["driver_kill9"]["checkpoints_before"] >= 1
    assert [r["exit"] for r in trials["driver_kill9"]["runs"]] == [-9, 0]
    assert "| driver_kill9 | 1 | 1/1 | 1/1 (0 direct) | 1/1 | 1/1 | 0 | 0 | -9/0 |" in done.stdout
