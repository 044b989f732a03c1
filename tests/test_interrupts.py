"""SIGINT and SIGTERM stop ``mtkd distill`` cleanly: the last line says which epoch was checkpointed
and how to continue, the exit code is 128 + the signal, and ``--resume`` then finishes the run
exactly as an uninterrupted one."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtkd import cli as core
from mtkd.checkpoint import load_weights, uninterrupted
from mtkd.experiment import RunDirectory

from conftest import needs_fashion, small_experiment

REPO = Path(__file__).resolve().parents[1]
RESUME_LINE = re.compile(r"^stopped after epoch (\d+); continue with: mtkd distill --resume (\S+)$")


def test_a_signal_during_a_checkpoint_write_is_held_until_the_write_is_done():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # whatever earlier tests left
    with core.stop_on_signals():
        done = []
        with pytest.raises(core.Interrupted) as stopped:
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(100):  # the handler runs between bytecodes: it must not raise here
                    time.sleep(0.001)
                done.append(True)
        assert done == [True] and stopped.value.signum == signal.SIGINT
        with pytest.raises(core.Interrupted):  # outside a write: at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers are given back


def test_sigterm_prints_the_resume_line_last_and_exits_143(tmp_path, capsys):
    def distill(args):
        with core.stop_on_signals(), core.say_how_to_resume(tmp_path / "my run", lambda: 4):
            print("epoch 5/9 ...", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return {"never": "reached"}

    assert core.run(core.build_parser(distill=distill), ["distill"]) == 143
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == f"stopped after epoch 4; continue with: mtkd distill --resume " \
                                                 f"'{tmp_path / 'my run'}'"

    def no_checkpoint_yet(args):
        with core.stop_on_signals(), core.say_how_to_resume(tmp_path, lambda: None):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)

    assert core.run(core.build_parser(distill=no_checkpoint_yet), ["distill"]) == 130
    assert "stopped before the first checkpoint" in capsys.readouterr().err.splitlines()[-1]


def test_a_lost_node_or_an_unwritable_run_folder_ends_in_one_line_with_the_resume_command(tmp_path, capsys):
    from mtkd.errors import LOST_EXIT, USER_EXIT, LostError

    def lost(args):
        with core.stop_on_signals(), core.say_how_to_resume(tmp_path, lambda: 3):
            raise LostError("a Ray node (4f2a9c01bd77)")

    assert core.run(core.build_parser(distill=lost), ["distill"]) == LOST_EXIT == 4
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mtkd: error: lost a Ray node (4f2a9c01bd77) after epoch 3; continue with: mtkd distill "
                   f"--resume {tmp_path}"]

    def unwritable(args):
        with core.stop_on_signals(), core.say_how_to_resume(tmp_path, lambda: 1):
            (tmp_path / "metrics.jsonl").write_text("")
            os.chmod(tmp_path / "metrics.jsonl", 0o444)
            if os.access(tmp_path / "metrics.jsonl", os.W_OK):  # root: the kernel lets it write anyway
                raise PermissionError(13, "Permission denied", str(tmp_path / "metrics.jsonl"))
            open(tmp_path / "metrics.jsonl", "a").close()

    assert core.run(core.build_parser(distill=unwritable), ["distill"]) == USER_EXIT
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mtkd: error: cannot write the run: [Errno 13] Permission denied")
    assert err[0].endswith(f"; stopped after epoch 1; continue with: mtkd distill --resume {tmp_path}")


def mtkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


@needs_fashion
def test_sigint_mid_run_says_how_to_resume_and_the_resumed_run_equals_an_uninterrupted_one(
        tmp_path, teacher_dirs, one_torch_thread):
    overrides = ["data.train_subset=256", "data.test_subset=32", "optim.epochs=3", "optim.milestones=[2]",
                 "runtime.threads=1"]
    run_dir = tmp_path / "run"
    teachers = f"teachers=[{{checkpoint: {teacher_dirs[0]}}}, {{checkpoint: {teacher_dirs[1]}}}]"
    config = small_experiment(run_dir, teacher_dirs, overrides)
    fixed = [f"output_dir={run_dir}", teachers, "student=resnet8", "data.batch_size=32", "data.crop_padding=2",
             "agent.rule=reference", "agent.agent_step=3", "runtime.device=cpu", "runtime.teacher_precision=fp32"]
    assert config.distill.strategy == "mtkd_rl"  # the default: the agent's state is resumed too
    process = subprocess.Popen(mtkd("distill", "--runtime", "inprocess", "--quiet", *fixed, *overrides), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = RunDirectory(run_dir).checkpoint_dir(1) / "meta.json"
    deadline = time.time() + 120
    while not first.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.is_file(), process.communicate()[1] if process.poll() is not None else "no checkpoint in 120 s"
    process.send_signal(signal.SIGINT)  # during epoch 2
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    match = RESUME_LINE.match(last)
    assert match, last
    epoch = int(match.group(1))
    assert match.group(2) == str(run_dir) and 1 <= epoch < 3 and epoch == RunDirectory(run_dir).resumable_epoch()
    assert out == "" and "Traceback" not in err

    from mtkd.runner import run_inprocess
    from services.cli import main

    assert main(["distill", "--resume", str(run_dir), "--quiet"]) == 0  # in this process: no second start-up

    run_inprocess(small_experiment(tmp_path / "whole", teacher_dirs, overrides), progress=False)
    a = load_weights(tmp_path / "whole" / "student" / "weights.safetensors")
    b = load_weights(run_dir / "student" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
