"""``services.reaper``: what a command started is ended when the command ends; what its process
already had before is left alone."""
from __future__ import annotations

import subprocess
import time

from services.reaper import GRACE_S, reaping

from conftest import process_alive


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
