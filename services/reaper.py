"""Nothing left behind by ``mtkd distill``, even killed with SIGKILL: a watchdog process.

A private Ray's raylet and GCS die with the process that started them, but not everything below
them does: Ray's dashboard and runtime-env agents and the private ``redis-server`` of
``cache.url: local`` outlive a driver killed with ``kill -9`` (measured: ``benchmarks/faults.py``).
:func:`reaping` starts this file as a separate small process (standard library only) that records,
every half second, the processes started below the command since the watchdog started (not those
the command's process already had), and holds the read end of a pipe whose write end only the
command holds. When the pipe closes (the command exited or was killed), it waits :data:`GRACE_S`
for them to end by themselves, then sends SIGTERM, and SIGKILL a second later, to every recorded
process still running (same pid and start time, so a reused pid is never hit).
Processes of a cluster the command joined are not below it and are never touched.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

POLL_S = 0.5
GRACE_S = 3.0


def _stat(pid: int) -> list[str] | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree(root: int) -> dict[int, str]:
    """``root``'s descendants (not ``root``): pid -> start time (the kernel's, in clock ticks)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and len(fields) > 19:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
                starts[int(entry.name)] = fields[19]
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = starts[pid]
        todo += children.get(pid, [])
    return found


def _alive(pid: int, start: str) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z" and len(fields) > 19 and fields[19] == start


def _signal_all(recorded: dict[int, str], sig: int) -> list[int]:
    hit = []
    for pid, start in recorded.items():
        if _alive(pid, start):
            try:
                os.kill(pid, sig)
                hit.append(pid)
            except OSError:
                pass
    return hit


def watch(parent: int, pipe_fd: int) -> None:
    """Record ``parent``'s tree until ``pipe_fd`` reads EOF, then end what is left of it. Only
    processes started after this watchdog are recorded: what the command started, not what its
    process already had (the command may run inside a process that has children of its own)."""
    recorded: dict[int, str] = {}
    me = os.getpid()
    born = int((_stat(me) or ["0"] * 20)[19])
    while True:
        recorded.update({pid: start for pid, start in tree(parent).items() if pid != me and int(start) > born})
        readable, _, _ = select.select([pipe_fd], [], [], POLL_S)
        if readable and not os.read(pipe_fd, 4096):
            break
    deadline = time.time() + GRACE_S
    while time.time() < deadline and any(_alive(pid, start) for pid, start in recorded.items()):
        time.sleep(0.1)
    if _signal_all(recorded, signal.SIGTERM):
        time.sleep(1.0)
        _signal_all(recorded, signal.SIGKILL)


@contextmanager
def reaping() -> Iterator[None]:
    """While inside, a watchdog records this process's tree; when this process ends (however), it
    ends what is left of the tree (:func:`watch`). Linux only (``/proc``); elsewhere a no-op."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    read_end, write_end = os.pipe()  # both close-on-exec: no other child inherits the write end
    try:
        subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid()), str(read_end)],
                         pass_fds=(read_end,), stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(read_end)
    try:
        yield
    finally:
        os.close(write_end)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal's group is the command's to handle
    watch(int(sys.argv[1]), int(sys.argv[2]))
