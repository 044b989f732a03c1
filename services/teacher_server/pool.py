"""The teacher pool on Ray: N replicas per teacher, placed together in one placement group (each
replica in its own bundle of its resources: all placed or none), requests round-robin over
replicas, a bound on requests in flight. Like :class:`mtkd.teachers.LocalTeacherPool` it is a
:class:`mtkd.teachers.TeacherPool` (``describe``, ``submit``, ``collect``, ``take_stats``,
``close``, ``accepts_device_batches``), so the engine cannot tell them apart. It records the
learner's side of the live metrics (:mod:`services.metrics`)."""
from __future__ import annotations

import re
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mtkd.cache import cache_metrics
from mtkd.config import ConfigError, ExperimentConfig, RuntimeConfig, TeacherSpec
from mtkd.errors import UserError
from mtkd.models import Outputs
from mtkd.teachers import probe_options
from services.metrics import CACHE_HIT_RATE, CACHE_HITS, CACHE_LOOKUPS, IN_FLIGHT, TEACHER_WAIT, observe

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


def replica_bundle(spec: TeacherSpec, runtime: RuntimeConfig) -> dict[str, float]:
    """The placement-group bundle of one replica of ``spec``: its Ray resources, zeros left out."""
    options = replica_resources(spec, runtime)
    bundle = {"CPU": float(options["num_cpus"]), "GPU": float(options["num_gpus"]),
              **{k: float(v) for k, v in options["resources"].items()}}
    return {k: v for k, v in bundle.items() if v > 0}


def teacher_bundles(config: ExperimentConfig) -> list[dict[str, float]]:
    """One bundle per replica that asks for resources, teacher by teacher, replica by replica (the
    order :func:`start_teacher_actors` places them in); a replica that asks for nothing has none."""
    bundles = []
    for spec in config.teachers:
        bundle = replica_bundle(spec, config.runtime)
        bundles += [dict(bundle) for _ in range(max(1, spec.replicas))] if bundle else []
    return bundles


def teacher_placement_group(config: ExperimentConfig) -> PlacementGroup | None:
    """Ask Ray for one placement group holding every teacher replica of ``config`` (:func:`teacher_bundles`,
    strategy ``PACK``: as few nodes as fit). Ray places all of its bundles or none, so replicas never hold
    GPUs while another waits, and an autoscaler sees the whole demand at once. None: no replica asks
    for resources. The caller waits on ``group.ready()`` and removes the group at the end."""
    bundles = teacher_bundles(config)
    return placement_group(bundles, strategy="PACK", name=f"mtkd-teachers-{uuid.uuid4().hex[:8]}") if bundles else None


def start_teacher_actors(config: ExperimentConfig, into: list[list], run_id: str | None = None,
                         cache_url: str | None = None, group: PlacementGroup | None = None) -> list[list]:
    """Start ``replicas`` actors per teacher of ``config``, appending each teacher's handles to ``into``
    as they start (so that a caller's ``finally`` can stop a partly started pool). With ``group`` (from
    :func:`teacher_placement_group`, placed) each replica goes into its own bundle of it; without, each
    is placed by its own resources. With ``cache_url`` they look outputs up in that Redis before
    computing them. Ray restarts a replica that dies ``runtime.teacher_max_restarts`` times and sends a
    call in flight again ``runtime.teacher_max_task_retries`` times.

    Actors are named ``mtkd-teacher-<teacher>-<replica>-<run_id>`` (findable with ``ray.get_actor``).
    """
    rt = config.runtime
    run_id = run_id or uuid.uuid4().hex[:8]
    sources = [teacher_source(spec) for spec in config.teachers]  # every spec checked before any actor starts
    bundle = 0
    for t, (spec, source) in enumerate(zip(config.teachers, sources)):
        replicas: list = []
        into.append(replicas)
        options = {**replica_resources(spec, rt), "max_restarts": rt.teacher_max_restarts,
                   "max_task_retries": rt.teacher_max_task_retries}
        in_group = group is not None and bool(replica_bundle(spec, rt))
        for r in range(max(1, spec.replicas)):
            placement = {}
            if in_group:
                placement = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=bundle)}
                bundle += 1
            replicas.append(TeacherActor.options(name=f"mtkd-teacher-{t}-{r}-{run_id}", **options, **placement).remote(
                source, rt.teacher_precision, rt.compile_teachers, cache_url, config.cache.value_dtype,
                probe_options(config)))
    return into


def stop_actors(handles: list[list]) -> None:
    """Kill every replica in ``handles`` (``[teacher][replica]``); actors already gone are skipped."""
    for replicas in handles:
        for handle in replicas:
            ray.kill(handle, no_restart=True)


class TeacherFailedError(UserError, RuntimeError):
    """A teacher replica died on a batch and Ray gave up on it (its restarts, or the call's retries,
    used up): a batch that crashes a teacher on every try ends the run here, naming both."""


@dataclass
class _Ticket:
    batch_index: int
    refs: list  # one ObjectRef per teacher
    replicas: list[int]  # the replica each teacher's call went to
    samples: list[int]  # the batch's dataset indices (to name the batch if a teacher dies on it)


def _death(error: RayActorError) -> str:
    """Why Ray says the actor died, in a few words (``Worker unexpectedly exits with a connection error
    code 2``), else the error's first line."""
    detail = re.search(r"Worker exit detail: ([^\n]*?)(?:\. |\.$|$)", str(error), re.MULTILINE)
    if detail:
        return detail.group(1).strip()
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _samples(samples: list[int]) -> str:
    shown = ", ".join(map(str, samples[:4]))
    return f"samples {shown}" + (f" and {len(samples) - 4} more" if len(samples) > 4 else "")


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
        refs, chosen = [], []
        for teacher, (replicas, description) in enumerate(zip(self.handles, self.describe())):
            chosen.append(self._next_replica[teacher] % len(replicas))
            self._next_replica[teacher] += 1
            keys = self.cache[1].keys(description, batch) if self.cache is not None else None
            refs.append(replicas[chosen[-1]].infer.remote(images_ref, self.fields, self.half_precision, keys))
        self._in_flight.append(batch.index)
        observe(IN_FLIGHT, len(self._in_flight))
        samples = batch.sample_index.tolist() if getattr(batch, "sample_index", None) is not None else []
        return _Ticket(batch.index, refs, chosen, samples)

    def collect(self, ticket: _Ticket) -> list[Outputs]:
        """The teachers' outputs of a submitted batch, on the CPU in the dtype they travelled in.

        Raises:
            TeacherFailedError: a teacher replica died on this batch and Ray will not retry it (one
                line naming the teacher, the replica and the batch).
        """
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s  # one deadline for the whole batch, as one ray.get
        wires = [self._wait(ticket, teacher, ref, deadline) for teacher, ref in enumerate(ticket.refs)]
        observe(TEACHER_WAIT, time.perf_counter() - start)
        self._in_flight.remove(ticket.batch_index)
        observe(IN_FLIGHT, len(self._in_flight))
        for teacher, wire in enumerate(wires):
            if "cache" in wire:
                stats = wire.pop("cache")
                self._cache_stats.append(stats)
                name = str(self.describe()[teacher].get("name"))
                observe(CACHE_LOOKUPS, stats.get("lookups", 0), teacher=name)
                observe(CACHE_HITS, stats.get("hits", 0), teacher=name)
        return [outputs_from_wire(wire) for wire in wires]

    def _wait(self, ticket: _Ticket, teacher: int, ref, deadline: float) -> dict:
        """One teacher's reply to ``ticket``; its death is named as a :class:`TeacherFailedError`."""
        try:
            return ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
        except RayActorError as error:
            if error.actor_init_failed:
                raise  # a replica that cannot load: the driver names its own error
            name = self.describe()[teacher].get("name")
            raise TeacherFailedError(
                f"teacher {name!r} (replica {ticket.replicas[teacher]}) died on batch {ticket.batch_index} of the "
                f"epoch ({_samples(ticket.samples)}) and Ray gave up on it: its restarts "
                f"(runtime.teacher_max_restarts) or the call's retries (runtime.teacher_max_task_retries) are used "
                f"up; last: {_death(error)}") from error

    def take_stats(self) -> dict[str, float]:
        """The cache's metrics since the last call (``cache/hit_rate``, ``cache/bytes``...); {} without one."""
        if self.cache is None:
            return {}
        stats, self._cache_stats = self._cache_stats, []
        metrics = cache_metrics(stats, self.cache[0].used_bytes())
        observe(CACHE_HIT_RATE, metrics["cache/hit_rate"])
        return metrics

    def close(self) -> None:
        """Forget the batches in flight and close the cache's connections (the actors keep running)."""
        self._in_flight.clear()
        if self.cache is not None:
            self.cache[0].close()
