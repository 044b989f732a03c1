"""The agent actor: one :class:`~services.agent.backend.AgentBackend` in a Ray actor."""
from __future__ import annotations

import ray

from .backend import AgentBackend, AgentProxy

AgentActor = ray.remote(AgentBackend)


def start_agent_actor(embedding_dims: list[int], num_classes: int, **agent_kwargs):
    """Start the agent actor (no CPU reserved: it is idle between updates)."""
    return AgentActor.options(num_cpus=0).remote(embedding_dims, num_classes, **agent_kwargs)


def proxy_for(actor, timeout_s: float = 600.0) -> AgentProxy:
    """An :class:`AgentProxy` whose calls go to ``actor``."""
    return AgentProxy(lambda verb, *args: ray.get(getattr(actor, verb).remote(*args), timeout=timeout_s))
