"""``services.reaper``: what a command started is ended when the command ends; what its process
already had before is left alone."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from services.reaper import GRACE_S, reaping

from conftest import process_alive

REPO = Path(__file__).resolve().parents[2]


def test_the_watchdog_ends_what_the_block_started_and_nothing_else():
    before = subprocess.Popen(["sleep", "60"])
    try:
        with reaping():
            time.sleep(0.2)  # the watchdog is up
            started = subprocess.Popen(["sleep", "60"], start_new_session=True)  # as Ray starts its processes
            time.sleep(1.0)  # recorded (every 0.5 s)
        deadline = time.time() + GRACE_S + 10
        while process_alive(started.pid) and time.time() < deadline:
            started.poll()  # reap the zombie
            time.sleep(0.1)
        assert not process_alive(started.pid) and started.wait(1) == -15  # SIGTERM from the watchdog
        assert process_alive(before.pid)
    finally:
        before.kill()
        before.wait()


ENDED_BY_RAY = """
import os, subprocess, sys, time
from services.reaper import reaping
how = sys.argv[3]
try:
    with reaping(sys.argv[1]):
        time.sleep(0.3)  # the watchdog is up (it records what starts after it)
        # a raylet (its program named raylet) whose log says an agent failed, as the private Ray's does
        subprocess.Popen(["bash", "-c", f"exec -a raylet {sys.executable} -c 'import time; time.sleep(60)' "
                          f"--log_dir={sys.argv[2]}"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # not the pipe the test reads
        time.sleep(2.0)  # recorded (every 0.5 s)
        if how == "ray-ends-it":
            os._exit(1)  # as Ray's client ends the process: no Python code runs after it
        if how.startswith("error"):
            raise RuntimeError("lost")
except RuntimeError:
    if how == "error-then-ray-ends-it":
        os._exit(1)  # Ray ends the process before the command printed its own last line
    print("mtkd: error: lost ...; continue with: ...", file=sys.stderr)
    sys.exit(4)
"""


def test_a_command_that_ray_ended_gets_its_last_line_from_the_watchdog(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "raylet.out").write_text("[2026-12-08 00:00:00,000 E 1 1] The raylet exited immediately because one Ray "
                                     "agent failed, agent_name = dashboard_agent.\n")
    hows = ("ray-ends-it", "error-then-ray-ends-it", "error-then-exits", "ends-by-itself")
    runs = {how: subprocess.Popen([sys.executable, "-c", ENDED_BY_RAY, str(tmp_path / "my run"), str(logs), how],
                                  cwd=REPO, stderr=subprocess.PIPE, text=True) for how in hows}
    stderr = {how: run.communicate(timeout=60)[1] for how, run in runs.items()}  # EOF once the watchdog is done
    line = ("mtkd: error: lost the raylet of the private Ray (its dashboard agent died, and Ray ended this command); "
            f"continue with: mtkd distill --resume '{tmp_path / 'my run'}'")
    for how in ("ray-ends-it", "error-then-ray-ends-it"):
        assert runs[how].returncode == 1 and stderr[how].strip().splitlines()[-1] == line, how
    # a command that ends by itself says its own last line (or none): the watchdog says nothing
    assert runs["error-then-exits"].returncode == 4 and stderr["error-then-exits"].strip().splitlines() == [
        "mtkd: error: lost ...; continue with: ..."]
    assert runs["ends-by-itself"].returncode == 0 and stderr["ends-by-itself"] == ""
