"""``mtkd demo`` end to end, shrunk to seconds: teachers trained then reused from the cache, every
strategy distilled on Ray with the teachers' outputs shared through a private Redis, the table with
gains, the comparison and class-trust plots; and the accuracy benchmark's quick mode."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.demo import format_table

from conftest import needs_fashion

pytestmark = [needs_fashion, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# One torch thread for teachers and students: on a busy 2-core machine two OpenMP threads crawl (the
# benchmark's six tiny runs measured 85 s with two threads, 15 s with one). Not part of a teacher's cache key.
ONE_THREAD = ["teacher.threads=1", "student.runtime.threads=1"]
# The teachers are those of the accuracy benchmark's --quick mode (512 images, 500 test images, one epoch).
TINY = ["teacher.data.train_subset=512", "teacher.data.test_subset=500", "teacher.optim.epochs=1",
        "teacher_models=[resnet8, vgg8]", "student.data.train_subset=256", "student.data.test_subset=300",
        "student.optim.epochs=2", "student.optim.milestones=[1]", "student.runtime.teacher_precision=fp32", *ONE_THREAD]


def test_format_table_shows_each_students_gain_over_ce_and_aver():
    table = format_table([("vgg8", "teacher", "-", 0.9), ("resnet8", "student", "ce", 0.80),
                          ("resnet8", "student", "aver", 0.815), ("resnet8", "student", "mtkd_rl", 0.8275)])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "role", "strategy", "test", "acc", "vs", "ce", "vs", "aver"]
    assert lines[2].split() == ["vgg8", "teacher", "-", "90.00%"]
    assert lines[3].split() == ["resnet8", "student", "ce", "80.00%"]
    assert lines[4].split() == ["resnet8", "student", "aver", "81.50%", "+1.50"]
    assert lines[5].split() == ["resnet8", "student", "mtkd_rl", "82.75%", "+2.75", "+1.25"]


def test_format_table_adds_a_camkd_column_when_camkd_ran():
    table = format_table([("resnet8", "student", "ce", 0.80), ("resnet8", "student", "aver", 0.815),
                          ("resnet8", "student", "camkd", 0.82), ("resnet8", "student", "mtkd_rl", 0.8275)])
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["vs", "camkd"]
    assert lines[4].split() == ["resnet8", "student", "camkd", "82.00%", "+2.00", "+0.50"]
    assert lines[5].split() == ["resnet8", "student", "mtkd_rl", "82.75%", "+2.75", "+1.25", "+0.75"]


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    """One ``cache_dir`` for the demo test's two runs (the second reuses the first's teachers)."""
    return tmp_path_factory.mktemp("teachers")


@pytest.mark.ray
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_demo_runs_end_to_end_on_ray_and_reuses_its_teachers(tmp_path, teacher_cache):
    command = [sys.executable, "-m", "services.cli", "demo"]
    overrides = [f"cache_dir={teacher_cache}", f"output_dir={tmp_path / 'demo'}", *TINY]
    # three of the demo's strategies (camkd's column is format_table's test): one Ray Train start less
    first = subprocess.run([*command, *overrides, "strategies=[ce, aver, mtkd_rl]"], cwd=REPO, capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and "core_worker" not in first.stderr, first.stderr[-3000:]
    assert first.stderr.count("epoch 2/2") == 3  # one line per epoch and run, no repeats
    table = first.stdout[: first.stdout.index("\nplots:")]
    assert re.search(r"resnet8\s+student\s+mtkd_rl\s+\d+\.\d\d%(\s+[+-]\d+\.\d\d){2}", table), table
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    assert {r["strategy"] for r in summary["table"] if r["role"] == "student"} == {"ce", "aver", "mtkd_rl"}
    for plot in ("comparison_plot", "class_trust_plot"):
        assert Path(summary[plot]).stat().st_size > 5000, plot
    mtkd_rl = [json.loads(line) for line in (tmp_path / "demo" / "mtkd_rl" / "metrics.jsonl").read_text().splitlines()]
    assert mtkd_rl[-1]["cache/hit_rate"] == 1.0  # the teachers' outputs came from the aver run

    # Run again with the same cache: the teachers are reused. The students' runtime plays no part in
    # that (the Ray path is the first run's), so the second run is one ce student in-process, not a
    # second private Ray.
    again = subprocess.run([*command, "--runtime", "inprocess", *overrides, "strategies=[ce]"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing") == 2 and "training on" not in again.stderr
