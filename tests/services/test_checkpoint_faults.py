"""The Ray runtime with faults: a fresh run refuses a folder whose Ray Train run (in an external
``runtime.storage_path``) holds checkpoints; a broken newest Ray Train checkpoint is passed over on
resume (named in a warning); SIGINT stops ``mtkd distill`` with the resume line, exit 130 and no Ray
process left behind; a learner lost past its restarts ends the run in one line naming it, exit 4."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from mtkd.checkpoint import WEIGHTS_FILE  # noqa: E402

from conftest import needs_fashion, process_alive, process_tree  # noqa: E402

pytestmark = [needs_fashion, pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def small_run(run_dir, teacher_dirs, *more: str) -> list[str]:
    """Overrides of a 4-steps-per-epoch, 3-epoch Ray run with the session's teachers."""
    return [f"output_dir={run_dir}", f"teachers=[{{checkpoint: {teacher_dirs[0]}}}, {{checkpoint: {teacher_dirs[1]}}}]",
            "student=resnet8", "data.train_subset=128", "data.test_subset=32", "data.batch_size=32",
            "data.crop_padding=2", "optim.epochs=3", "distill.strategy=aver", "runtime.device=cpu",
            "runtime.teacher_precision=fp32", *more]


CLI = [sys.executable, "-m", "services.cli", "distill", "--quiet", "--address", "local"]


def test_ray_resume_passes_over_a_broken_checkpoint_and_sigint_stops_it_cleanly(tmp_path, teacher_dirs):
    run_dir, storage = tmp_path / "run", tmp_path / "storage"  # Ray Train's checkpoints outside the run folder
    args = small_run(run_dir, teacher_dirs, f"runtime.storage_path={storage}")
    cli = CLI
    first = subprocess.run([*cli, "--runtime", "ray", "--stop-after-epoch", "2", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    saved = sorted(f for f in storage.glob("*/checkpoint_*") if f.is_dir())
    assert len(saved) == 2 and not (run_dir / "ray").exists()

    fresh = subprocess.run([*cli, *args], cwd=REPO, capture_output=True, text=True, timeout=120)  # no --resume
    assert fresh.returncode == 2 and len(fresh.stderr.strip().splitlines()) == 1, fresh.stderr
    assert "already has checkpoints" in fresh.stderr and "--resume" in fresh.stderr and "--overwrite" in fresh.stderr
    assert saved[-1].name in fresh.stderr
    assert all(f.is_dir() for f in saved)  # nothing deleted
    weights = saved[-1] / WEIGHTS_FILE  # epoch 2's, cut to half
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    record = saved[-1].parent / "checkpoint_manager_snapshot.json"  # Ray Train's list, as a kill mid-write leaves it
    record.write_text("")

    resumed = subprocess.Popen([*cli, "--resume", str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    steps = run_dir / "steps.jsonl"
    assert len(steps.read_text().splitlines()) == 8  # 4 steps per epoch
    deadline = time.time() + 180
    tree: list[int] = []
    restarted = False
    while time.time() < deadline and resumed.poll() is None:
        count = len(steps.read_text().splitlines())
        restarted = restarted or count <= 4  # the learner resumed after epoch 1: epoch 2's steps dropped
        if restarted and count >= 5:  # ... and it is training epoch 2 again
            tree = process_tree(resumed.pid)
            break
        time.sleep(0.05)
    assert tree, resumed.communicate()[1] if resumed.poll() is not None else "epoch 2 was not restarted"
    resumed.send_signal(signal.SIGINT)
    out, err = resumed.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert resumed.returncode == 130, err
    warning = [line for line in lines if "warning" in line and saved[-1].name in line]
    assert len(warning) == 1 and "weights.safetensors' is truncated" in warning[0], err
    assert warning[0].endswith(f"resuming from {saved[0]} instead")
    assert any("record of the run's checkpoints was cut short" in line for line in lines), err
    match = re.match(r"^stopped after epoch (\d); continue with: mtkd distill --resume (\S+)$", lines[-1])
    assert match and match.group(2) == str(run_dir) and match.group(1) in ("1", "2"), lines[-1]
    deadline = time.time() + 30
    while any(process_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in tree if process_alive(pid)]
    assert len(tree) > 3 and not left, f"Ray processes left behind: {left}"


def test_a_learner_lost_past_its_restarts_ends_the_run_in_one_line_with_the_resume_command(tmp_path, teacher_dirs):
    run_dir = tmp_path / "run"
    run = subprocess.Popen([*CLI, *small_run(run_dir, teacher_dirs, "runtime.max_failures=0")], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = run_dir / "steps.jsonl"
    deadline = time.time() + 180
    learner, tree = None, []
    while time.time() < deadline and run.poll() is None and learner is None:
        if steps.is_file() and len(steps.read_text().splitlines()) >= 5:  # epoch 1 checkpointed, epoch 2 going
            tree = process_tree(run.pid)
            learner = next((pid for pid in tree if Path(f"/proc/{pid}/cmdline").exists()
                            and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker")), None)
        time.sleep(0.05)
    assert learner, run.communicate()[1] if run.poll() is not None else "no learner worker found"
    os.kill(learner, signal.SIGKILL)  # a real death; max_failures=0: Ray Train does not restart it
    out, err = run.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert run.returncode == 4, err
    match = re.match(r"^mtkd: error: lost the learner worker \(rank 0, [^)]*\) after epoch (\d); "
                     r"continue with: mtkd distill --resume (\S+)$", last)
    assert match and match.group(2) == str(run_dir) and match.group(1) in ("1", "2"), err
    assert sum(line.startswith("mtkd: error:") for line in err.splitlines()) == 1, err
    deadline = time.time() + 30
    while any(process_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in tree if process_alive(pid)], "processes left behind"
