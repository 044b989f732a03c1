"""The Ray runtime with faults: a broken newest Ray Train checkpoint is passed over on resume (named
in a warning), and SIGINT stops ``mtkd distill`` with the resume line, exit 130 and no Ray process
left behind."""
from __future__ import annotations

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


def test_ray_resume_passes_over_a_broken_checkpoint_and_sigint_stops_it_cleanly(tmp_path, teacher_dirs):
    run_dir = tmp_path / "run"
    args = [f"output_dir={run_dir}", f"teachers=[{{checkpoint: {teacher_dirs[0]}}}, {{checkpoint: {teacher_dirs[1]}}}]",
            "student=resnet8", "data.train_subset=128", "data.test_subset=32", "data.batch_size=32",
            "data.crop_padding=2", "optim.epochs=3", "distill.strategy=aver", "runtime.device=cpu",
            "runtime.teacher_precision=fp32"]
    cli = [sys.executable, "-m", "services.cli", "distill", "--quiet", "--address", "local"]
    first = subprocess.run([*cli, "--runtime", "ray", "--stop-after-epoch", "2", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    saved = sorted(f for f in (run_dir / "ray").glob("*/checkpoint_*") if f.is_dir())
    assert len(saved) == 2
    weights = saved[-1] / WEIGHTS_FILE  # epoch 2's, cut to half
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

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
    match = re.match(r"^stopped after epoch (\d); continue with: mtkd distill --resume (\S+)$", lines[-1])
    assert match and match.group(2) == str(run_dir) and match.group(1) in ("1", "2"), lines[-1]
    deadline = time.time() + 30
    while any(process_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in tree if process_alive(pid)]
    assert len(tree) > 3 and not left, f"Ray processes left behind: {left}"
