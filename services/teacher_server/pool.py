"""The teacher pool on Ray: N replicas per teacher, requests round-robin over replicas, a bound on
requests in flight. It has the verbs of :class:`mtkd.teachers.LocalTeacherPool`
(``describe``, ``submit``, ``collect``), so the engine cannot tell them apart."""
from __future__ import annotations

import uuid
from collections import deque
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import ray
import torch

from mtkd.config import ExperimentConfig
from mtkd.models import Outputs

from .actor import TeacherActor

DEFAULT_TIMEOUT_S = 600.0


def teacher_source(spec) -> dict:
    """The actor's constructor argument for a :class:`mtkd.config.TeacherSpec`."""
    if bool(spec.checkpoint) == bool(spec.address):
        raise ValueError(f"teacher {spec.name!r}: give exactly one of checkpoint and address")
    token = None
    if spec.token_file:
        token = Path(spec.token_file).read_text().strip()
        if not token:
            raise ValueError(f"teacher {spec.name or spec.address!r}: token file {spec.token_file!r} is empty")
    return {"checkpoint": spec.checkpoint, "address": spec.address, "name": spec.name or None, "token": token,
            "root_cert": spec.root_cert}


def start_teacher_actors(config: ExperimentConfig, into: list[list], run_id: str | None = None) -> list[list]:
    """Start ``replicas`` actors per teacher of ``config``, appending each teacher's handles to
    ``into`` as they start (so that a caller's ``finally`` can stop a partly started pool).

    Actors are named ``mtkd-teacher-<teacher>-<replica>-<run_id>`` (findable with ``ray.get_actor``).
    """
    rt = config.runtime
    run_id = run_id or uuid.uuid4().hex[:8]
    device = "cuda" if rt.teacher_num_gpus > 0 else "cpu"
    options = {"num_cpus": rt.teacher_num_cpus, "num_gpus": rt.teacher_num_gpus}
    sources = [teacher_source(spec) for spec in config.teachers]  # every spec checked before any actor starts
    for t, (spec, source) in enumerate(zip(config.teachers, sources)):
        replicas: list = []
        into.append(replicas)
        for r in range(max(1, spec.replicas)):
            replicas.append(TeacherActor.options(name=f"mtkd-teacher-{t}-{r}-{run_id}", **options).remote(source, device))
    return into


def stop_actors(handles: list[list]) -> None:
    for replicas in handles:
        for handle in replicas:
            ray.kill(handle, no_restart=True)


@dataclass
class _Ticket:
    batch_index: int
    refs: list  # one ObjectRef per teacher


class RayTeacherPool:
    """Teacher source backed by actors.

    Args:
        handles: per teacher, its replica handles (from :func:`start_teacher_actors`).
        half_precision: move outputs in float16.
        max_in_flight: most batches submitted and not collected (the engine's prefetch + 1 fits).
        timeout_s: deadline of one ``collect``.
    """

    def __init__(self, handles: list[list], *, half_precision: bool = False, max_in_flight: int = 4,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.handles = handles
        self.half_precision = half_precision
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._next_replica = [0] * len(handles)
        self._in_flight: deque[int] = deque()
        self._descriptions: list[dict] | None = None

    def describe(self) -> list[dict]:
        if self._descriptions is None:
            self._descriptions = ray.get([replicas[0].describe.remote() for replicas in self.handles],
                                         timeout=self.timeout_s)
        return self._descriptions

    def submit(self, batch_index: int, images: torch.Tensor) -> _Ticket:
        """Ask every teacher for batch ``batch_index``; the images go to the object store once."""
        if len(self._in_flight) >= self.max_in_flight:
            raise RuntimeError(f"more than {self.max_in_flight} batches in flight; collect before submitting")
        images_ref = ray.put(images.detach().cpu().numpy())
        refs = []
        for teacher, replicas in enumerate(self.handles):
            replica = replicas[self._next_replica[teacher] % len(replicas)]
            self._next_replica[teacher] += 1
            refs.append(replica.infer.remote(images_ref, self.half_precision))
        self._in_flight.append(batch_index)
        return _Ticket(batch_index, refs)

    def collect(self, ticket: _Ticket) -> list[Outputs]:
        """The teachers' outputs of a submitted batch, as float32 tensors."""
        arrays = ray.get(ticket.refs, timeout=self.timeout_s)
        self._in_flight.remove(ticket.batch_index)
        return [Outputs(*(torch.from_numpy(np.array(a, dtype=np.float32, copy=True)) for a in out)) for out in arrays]

    def close(self) -> None:
        self._in_flight.clear()
