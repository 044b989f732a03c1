"""The agent actor: one :class:`~services.agent.backend.AgentBackend` in a Ray actor."""
from __future__ import annotations

import ray

from .backend import AgentBackend

# Restarted when it dies; its calls are not retried: a restarted agent has lost its state, which
# the learner detects (policy version) and repairs by restarting from its newest checkpoint.
AgentActor = ray.remote(max_restarts=-1, max_task_retries=0)(AgentBackend)


def start_agent_actor(embedding_dims: list[int], num_classes: int, **agent_kwargs):
    """Start the agent actor (no CPU reserved: it is idle between updates)."""
    return AgentActor.options(num_cpus=0).remote(embedding_dims, num_classes, **agent_kwargs)
