"""The Ray runtime's live metrics (``ray.util.metrics``), defined once here.

Ray sends what a process records to its node's metrics agent, which serves every metric in
Prometheus text at ``http://<node>:<metrics export port>/metrics``, each name prefixed ``ray_``
(a counter also gets ``_total``; a histogram its ``_bucket``, ``_count`` and ``_sum``). Where each
one is recorded: :data:`METRICS` (the table in docs/distributed.md lists the same).

Metric objects are made on first use in each process (a Ray worker, or a driver that joined Ray),
never at import, so importing this module starts nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

# seconds: from a cache hit on a small batch (ms) to a large teacher on a CPU (tens of s)
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass(frozen=True)
class Metric:
    """One metric: its Ray name, kind (``histogram``, ``gauge``, ``counter``), tag keys, unit, where
    it is recorded, and what it measures."""

    name: str
    kind: str
    tags: tuple[str, ...]
    unit: str
    where: str
    description: str


TEACHER_LATENCY = Metric(
    "mtkd_teacher_latency_seconds", "histogram", ("teacher",), "s", "teacher actor (`TeacherActor.infer`)",
    "time a teacher replica takes to answer one batch (cache lookup and forward pass)")
TEACHER_WAIT = Metric(
    "mtkd_learner_teacher_wait_seconds", "histogram", (), "s", "learner (`RayTeacherPool.collect`)",
    "time a learner waits for the teachers' outputs of one batch (0 when prefetch hid them)")
IN_FLIGHT = Metric(
    "mtkd_in_flight_batches", "gauge", (), "batches", "learner (`RayTeacherPool.submit` / `collect`)",
    "batches submitted to the teachers and not yet collected by a learner")
CACHE_HIT_RATE = Metric(
    "mtkd_cache_hit_rate", "gauge", (), "ratio", "learner (`RayTeacherPool.take_stats`, each epoch end)",
    "the epoch's share of samples the teachers found in the cache")
CACHE_LOOKUPS = Metric(
    "mtkd_cache_lookups", "counter", ("teacher",), "samples", "learner (`RayTeacherPool.collect`)",
    "samples a teacher looked up in the cache")
CACHE_HITS = Metric(
    "mtkd_cache_hits", "counter", ("teacher",), "samples", "learner (`RayTeacherPool.collect`)",
    "samples a teacher found in the cache")
AGENT_UPDATE = Metric(
    "mtkd_agent_update_seconds", "histogram", ("rule",), "s", "agent actor (`AgentBackend.observe` / `end_epoch`)",
    "time of an agent call that updated the policy")
METRICS = (TEACHER_LATENCY, TEACHER_WAIT, IN_FLIGHT, CACHE_HIT_RATE, CACHE_LOOKUPS, CACHE_HITS, AGENT_UPDATE)


def exported_names(metric: Metric) -> tuple[str, ...]:
    """The names ``metric`` has in the metrics agent's Prometheus text."""
    name = f"ray_{metric.name}"
    if metric.kind == "histogram":
        return f"{name}_bucket", f"{name}_count", f"{name}_sum"
    return (f"{name}_total",) if metric.kind == "counter" else (name,)


@cache
def _made(metric: Metric):
    """The ``ray.util.metrics`` object of ``metric`` in this process (made once)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    if metric.kind == "histogram":
        return Histogram(metric.name, metric.description, boundaries=SECONDS_BOUNDARIES, tag_keys=metric.tags)
    kind = Gauge if metric.kind == "gauge" else Counter
    return kind(metric.name, metric.description, tag_keys=metric.tags)


def observe(metric: Metric, value: float, **tags: str) -> None:
    """Record ``value`` (a histogram's observation, a gauge's value, a counter's increment > 0)."""
    made = _made(metric)
    if metric.kind == "histogram":
        made.observe(float(value), tags=tags or None)
    elif metric.kind == "gauge":
        made.set(float(value), tags=tags or None)
    elif value > 0:
        made.inc(float(value), tags=tags or None)


__all__ = ["AGENT_UPDATE", "CACHE_HITS", "CACHE_HIT_RATE", "CACHE_LOOKUPS", "IN_FLIGHT", "METRICS", "Metric",
           "TEACHER_LATENCY", "TEACHER_WAIT", "exported_names", "observe"]
