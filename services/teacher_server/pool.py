"""The teacher pool on Ray: N replicas per teacher placed by their own resources, requests
round-robin over replicas, a bound on requests in flight. Like
:class:`mtkd.teachers.LocalTeacherPool` it is a :class:`mtkd.teachers.TeacherPool` (``describe``,
``submit``, ``collect``, ``take_stats``, ``close``, ``accepts_device_batches``), so the engine
cannot tell them apart."""
from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray

from mtkd.cache import cache_metrics
from mtkd.config import ConfigError, ExperimentConfig, RuntimeConfig, TeacherSpec
from mtkd.models import Outputs
from mtkd.teachers import probe_options

from .actor import TeacherActor, outputs_from_wire

DEFAULT_TIMEOUT_S = 600.0


def teacher_source(spec: TeacherSpec) -> dict:
    """The actor's constructor argument for a :class:`mtkd.config.TeacherSpec`."""
    if bool(spec.checkpoint) == bool(spec.address):
        raise ConfigError(f"teacher {spec.name!r}: give exactly one of checkpoint and address")
    token = None
    if spec.token_file:
        token = Path(spec.token_file).read_text().strip()
        if not token:
            raise ConfigError(f"teacher {spec.name or spec.address!r}: token file {spec.token_file!r} is empty")
    return {"checkpoint": spec.checkpoint, "address": spec.address, "name": spec.name or None, "token": token,
            "root_cert": spec.root_cert}


def replica_resources(spec: TeacherSpec, runtime: RuntimeConfig) -> dict:
    """Ray actor options of one replica of ``spec``: ``num_cpus``, ``num_gpus``, custom ``resources``."""
    return {"num_cpus": runtime.teacher_num_cpus if spec.num_cpus is None else spec.num_cpus,
            "num_gpus": runtime.teacher_num_gpus if spec.num_gpus is None else spec.num_gpus,
            "resources": dict(spec.resources)}


def start_teacher_actors(config: ExperimentConfig, into: list[list], run_id: str | None = None,
                         cache_url: str | None = None) -> list[list]:
    """Start ``replicas`` actors per teacher of ``config``, each placed by its own resources, appending
    each teacher's handles to ``into`` as they start (so that a caller's ``finally`` can stop a partly
    started pool). With ``cache_url`` they look outputs up in that Redis before computing them.

    Actors are named ``mtkd-teacher-<teacher>-<replica>-<run_id>`` (findable with ``ray.get_actor``).
    """
    rt = config.runtime
    run_id = run_id or uuid.uuid4().hex[:8]
    sources = [teacher_source(spec) for spec in config.teachers]  # every spec checked before any actor starts
    for t, (spec, source) in enumerate(zip(config.teachers, sources)):
        replicas: list = []
        into.append(replicas)
        options = replica_resources(spec, rt)
        for r in range(max(1, spec.replicas)):
            replicas.append(TeacherActor.options(name=f"mtkd-teacher-{t}-{r}-{run_id}", **options).remote(
                source, rt.teacher_precision, rt.compile_teachers, cache_url, config.cache.value_dtype,
                probe_options(config)))
    return into


def stop_actors(handles: list[list]) -> None:
    """Kill every replica in ``handles`` (``[teacher][replica]``); actors already gone are skipped."""
    for replicas in handles:
        for handle in replicas:
            ray.kill(handle, no_restart=True)


@dataclass
class _Ticket:
    batch_index: int
    refs: list  # one ObjectRef per teacher


class RayTeacherPool:
    """The :class:`mtkd.teachers.TeacherPool` backed by actors.

    Args:
        handles: per teacher, its replica handles (from :func:`start_teacher_actors`).
        fields: the outputs the strategy uses (the others are not shipped).
        half_precision: move float32 outputs in float16.
        max_in_flight: most batches submitted and not collected (the engine's prefetch + 1 fits).
        timeout_s: deadline of one ``collect``.
        cache: ``(store, context)``: the actors' Redis (for its size) and the
            :class:`mtkd.cache.CacheContext` the keys sent with each batch are made with.
    """

    accepts_device_batches = False  # images go to the object store from host memory

    def __init__(self, handles: list[list], *, fields: tuple[str, ...] = Outputs._fields,
                 half_precision: bool = False, max_in_flight: int = 4, timeout_s: float = DEFAULT_TIMEOUT_S,
                 cache: tuple | None = None):
        self.handles = handles
        self.cache = cache
        self._cache_stats: list[dict] = []
        self.fields = tuple(fields)
        self.half_precision = half_precision
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._next_replica = [0] * len(handles)
        self._in_flight: deque[int] = deque()
        self._descriptions: list[dict] | None = None

    def use_cache(self, store, context) -> None:
        """Send keys made with ``context`` (a :class:`mtkd.cache.CacheContext`) with each batch; ``store``
        is the actors' Redis. :meth:`mtkd.session.Session.build` calls it once the dataset is known."""
        self.cache = (store, context)

    def describe(self) -> list[dict]:
        if self._descriptions is None:
            self._descriptions = ray.get([replicas[0].describe.remote() for replicas in self.handles],
                                         timeout=self.timeout_s)
        return self._descriptions

    def submit(self, batch) -> _Ticket:
        """Ask every teacher for ``batch`` (a :class:`mtkd.data.Batch` in host memory); the images go
        to the object store once."""
        if len(self._in_flight) >= self.max_in_flight:
            raise RuntimeError(f"more than {self.max_in_flight} batches in flight; collect before submitting")
        images_ref = ray.put(batch.images.detach().cpu().numpy())
        refs = []
        for teacher, (replicas, description) in enumerate(zip(self.handles, self.describe())):
            replica = replicas[self._next_replica[teacher] % len(replicas)]
            self._next_replica[teacher] += 1
            keys = self.cache[1].keys(description, batch) if self.cache is not None else None
            refs.append(replica.infer.remote(images_ref, self.fields, self.half_precision, keys))
        self._in_flight.append(batch.index)
        return _Ticket(batch.index, refs)

    def collect(self, ticket: _Ticket) -> list[Outputs]:
        """The teachers' outputs of a submitted batch, on the CPU in the dtype they travelled in."""
        wires = ray.get(ticket.refs, timeout=self.timeout_s)
        self._in_flight.remove(ticket.batch_index)
        self._cache_stats += [wire.pop("cache") for wire in wires if "cache" in wire]
        return [outputs_from_wire(wire) for wire in wires]

    def take_stats(self) -> dict[str, float]:
        """The cache's metrics since the last call (``cache/hit_rate``, ``cache/bytes``...); {} without one."""
        if self.cache is None:
            return {}
        stats, self._cache_stats = self._cache_stats, []
        return cache_metrics(stats, self.cache[0].used_bytes())

    def close(self) -> None:
        """Forget the batches in flight and close the cache's connections (the actors keep running)."""
        self._in_flight.clear()
        if self.cache is not None:
            self.cache[0].close()
