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

The watchdog also says what Ray did not: when one of a private Ray's agents dies (the dashboard
agent, the runtime-env agent), the raylet ends itself ("fate-shares") and Ray's client ends the
command at once (exit 1, no Python code of ours runs, the last line one of Ray's). The command
writes ``end`` into the pipe when it ends by itself (leaving the block, or, when it leaves it with
an error, at exit, once its last line is printed); a pipe closed without it, with the raylet's log
naming a failed agent, makes the watchdog print the command's last line: what was lost and how to
continue the run.
"""
from __future__ import annotations

import atexit
import os
import re
import select
import shlex
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


def raylet_log_dir(pid: int) -> str | None:
    """The ``--log_dir`` of ``pid`` when it is a raylet (its program is named ``raylet``), else None."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv or Path(argv[0]).name != "raylet":
        return None
    return next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--log_dir=")), None)


def failed_agent(log_dir: str) -> str | None:
    """The agent whose death ended the raylet (``dashboard agent``), from ``log_dir/raylet.out``, or None."""
    path = Path(log_dir) / "raylet.out"
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 65536))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return None
    found = re.findall(r"one Ray agent failed, agent_name = (\w+)", tail)
    return found[-1].replace("_", " ") if found else None


def lost_line(run_dir: str, log_dirs: list[str]) -> str | None:
    """The last line for a command that Ray ended (a raylet whose agent failed), or None."""
    for log_dir in log_dirs:
        agent = failed_agent(log_dir)
        if agent:
            return (f"mtkd: error: lost the raylet of the private Ray (its {agent} died, and Ray ended this "
                    f"command); continue with: mtkd distill --resume {shlex.quote(run_dir)}")
    return None


def watch(parent: int, pipe_fd: int, run_dir: str | None = None) -> None:
    """Record ``parent``'s tree until ``pipe_fd`` reads EOF, then end what is left of it. Only
    processes started after this watchdog are recorded: what the command started, not what its
    process already had (the command may run inside a process that has children of its own). With
    ``run_dir``, a command that did not say ``end`` and whose raylet lost an agent gets its last
    line (:func:`lost_line`) on this process's stderr (the command's)."""
    recorded: dict[int, str] = {}
    log_dirs: list[str] = []
    said = b""
    me = os.getpid()
    born = int((_stat(me) or ["0"] * 20)[19])
    while True:
        for pid, start in tree(parent).items():
            if pid != me and int(start) > born:
                recorded[pid] = start
                if run_dir:  # every time: a process read between its fork and its exec is not a raylet yet
                    log_dir = raylet_log_dir(pid)
                    if log_dir and log_dir not in log_dirs:
                        log_dirs.append(log_dir)
        readable, _, _ = select.select([pipe_fd], [], [], POLL_S)
        if readable:
            chunk = os.read(pipe_fd, 4096)
            if not chunk:
                break
            said += chunk
    if run_dir and b"end" not in said:
        line = lost_line(run_dir, log_dirs)
        if line:
            print(line, file=sys.stderr, flush=True)
    deadline = time.time() + GRACE_S
    while time.time() < deadline and any(_alive(pid, start) for pid, start in recorded.items()):
        time.sleep(0.1)
    if _signal_all(recorded, signal.SIGTERM):
        time.sleep(1.0)
        _signal_all(recorded, signal.SIGKILL)


@contextmanager
def reaping(run_dir: str | None = None) -> Iterator[None]:
    """While inside, a watchdog records this process's tree; when this process ends (however), it
    ends what is left of the tree (:func:`watch`), and, given the command's ``run_dir``, says how to
    continue a run that Ray ended. Linux only (``/proc``); elsewhere a no-op."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    read_end, write_end = os.pipe()  # both close-on-exec: no other child inherits the write end
    try:
        subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid()), str(read_end),
                          *([str(run_dir)] if run_dir is not None else [])],
                         pass_fds=(read_end,), stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(read_end)
    try:
        yield
    except BaseException:
        # the command's last line (the error, how to continue) is printed after this block: Ray may
        # still end the process before it, so "end" is said only when the process exits by itself
        atexit.register(_say_end, write_end)
        raise
    _say_end(write_end)


def _say_end(write_end: int) -> None:
    """Tell the watchdog that this process ends by itself (not killed, not ended by Ray), then let it go."""
    try:
        os.write(write_end, b"end")
    except OSError:
        pass
    finally:
        os.close(write_end)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal's group is the command's to handle
    watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
