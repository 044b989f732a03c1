"""What a Ray failure lost, in a few words: a node, an actor, a worker process, an object, Ray itself.

Ray restarts actors and learner workers by itself (teachers ``runtime.teacher_max_restarts`` times,
past which the pool names the teacher and the batch; the agent without limit; the learners
``runtime.max_failures`` times); a failure that still reaches the driver ends the run.
:func:`lost_error` turns Ray's multi-line error (a ``TrainingFailedError`` wrapping a worker's
``ActorDiedError``, a ``NodeDiedError``, a ``RaySystemError`` of a dead raylet or GCS...) into a
:class:`mtkd.errors.LostError` naming what was lost; ``mtkd distill`` prints it in one line with
the command that continues the run.
"""
from __future__ import annotations

import re
import signal
from typing import Iterator

from ray.exceptions import (GetTimeoutError, LocalRayletDiedError, NodeDiedError, ObjectLostError, OwnerDiedError,
                            RayActorError, RaySystemError, RayTaskError, WorkerCrashedError)

from mtkd.errors import UNWRITABLE_ERRNOS, LostError
from services.reaper import failed_agent

ACTORS = {"RayTrainWorker": "the learner worker", "TeacherActor": "a teacher actor", "AgentBackend": "the agent actor",
          "_QueueActor": "the event queue actor", "TrainController": "Ray Train's controller"}


def causes(error: BaseException) -> Iterator[tuple[BaseException, int | None]]:
    """``error`` and everything it wraps, each with the learner rank it came from (or None):
    Ray Train's ``worker_failures`` (by rank), ``controller_failure``, ``health_check_failure``,
    a task error's ``cause``, ``__cause__`` and ``__context__``."""
    seen: set[int] = set()
    todo: list[tuple[BaseException, int | None]] = [(error, None)]
    while todo:
        current, rank = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current, rank
        failures = getattr(current, "worker_failures", None) or {}
        todo += [(failures[r], r) for r in sorted(failures)]
        for attribute in ("controller_failure", "health_check_failure", "cause", "__cause__", "__context__"):
            inner = getattr(current, attribute, None)
            if isinstance(inner, BaseException):
                todo.append((inner, rank))


def _field(error: BaseException, name: str) -> str | None:
    """A ``name: value`` line of Ray's actor error text (``class_name``, ``name``, ``pid``, ``ip``)."""
    match = re.search(rf"^\s*{name}: (\S+)\s*$", str(error), re.MULTILINE)
    return match.group(1) if match else None


def _actor(error: RayActorError, rank: int | None) -> str:
    class_name = _field(error, "class_name") or ""
    what = ACTORS.get(class_name, f"the actor {class_name}" if class_name else "an actor")
    details = [f"rank {rank}"] if class_name == "RayTrainWorker" and rank is not None else []
    if _field(error, "name"):
        details.append(str(_field(error, "name")))
    if error.actor_id:
        details.append(f"actor {error.actor_id[:12]}")
    if _field(error, "ip"):
        details.append(f"on {_field(error, 'ip')}")
    if error.preempted or re.search(r"\bits node (?:has )?died\b|\bnode (?:has )?died\b|\bnode was (?:removed|"
                                    r"terminated|preempted)\b", str(error), re.IGNORECASE):
        what += " and its node"
    return f"{what} ({', '.join(details)})" if details else what


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:120] if lines else type(error).__name__


def lost_what(error: BaseException) -> str | None:
    """What ``error`` says was lost (``"the learner worker (rank 0, actor 1f2e...)"``), or None when
    it is not a lost node, process or object (a bug, a library error)."""
    for cause, rank in causes(error):
        if isinstance(cause, NodeDiedError):
            node = re.search(r"\b([0-9a-f]{16,})\b", str(cause))
            return f"a Ray node ({node.group(1)[:12]})" if node else f"a Ray node ({_first_line(cause)})"
        if isinstance(cause, RayActorError) and not cause.actor_init_failed:
            return _actor(cause, rank)
        if isinstance(cause, LocalRayletDiedError):
            return "the raylet of this node"
        if isinstance(cause, WorkerCrashedError):
            return "a Ray worker process" + (f" (learner rank {rank})" if rank is not None else "")
        if isinstance(cause, OwnerDiedError):
            return "the process owning an object of the run"
        if isinstance(cause, ObjectLostError):
            return f"an object of the run ({getattr(cause, 'object_ref_hex', '')[:12]})"
        if isinstance(cause, RaySystemError):
            return f"the Ray system: raylet or GCS ({_first_line(cause)})"
        if isinstance(cause, GetTimeoutError):  # a teacher or the agent that never answered: gone, not placed again
            return f"an actor's answer ({_first_line(cause)})"
        if isinstance(cause, RayTaskError):
            continue  # its cause is walked next
    return None


# the private Ray's processes this process started, root cause first: a lost GCS ends its raylet 60 s later
RAY_PROCESSES = (("gcs_server", "the GCS"), ("raylet", "the raylet"))


def private_ray_lost() -> str | None:
    """The raylet or GCS of the private Ray this process started (``ray.init`` without a cluster) that
    is no longer running, named with how it ended (``the raylet of the private Ray (pid 123, killed
    by SIGKILL)``; a raylet that ended because one of its agents died says which), or None: they all
    run, or this process started no Ray (a joined cluster's processes are not this process's). Ray
    restarts neither, and what runs on the node dies with its raylet."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for kind, label in RAY_PROCESSES:
        for info in list(processes.get(kind, [])):
            process = getattr(info, "process", None)
            code = process.poll() if process is not None else None
            if code is None:
                continue
            try:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            except ValueError:
                how = f"killed by signal {-code}"
            agent = _failed_agent(node) if kind == "raylet" and code >= 0 else None
            return f"{label} of the private Ray (pid {process.pid}, {how}" + (f": its {agent} died)" if agent else ")")
    return None


def _failed_agent(node) -> str | None:
    """The agent whose death ended the raylet (``dashboard agent``), from the raylet's log, or None."""
    try:
        return failed_agent(node.get_logs_dir_path())
    except AttributeError:
        return None


def lost_error(error: BaseException) -> BaseException:
    """A :class:`mtkd.errors.LostError` naming what ``error`` lost; else the ``OSError`` it wraps
    of storage that cannot be written (a read-only run folder: ``mtkd distill`` says so in one
    line); else ``error`` itself."""
    what = lost_what(error)
    if what:
        return LostError(what)
    for cause, _ in causes(error):
        if isinstance(cause, OSError) and cause.errno in UNWRITABLE_ERRNOS:
            return cause
    return error


__all__ = ["causes", "lost_error", "lost_what", "private_ray_lost"]
