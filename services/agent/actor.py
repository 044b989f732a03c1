"""The agent actor: one :class:`~services.agent.backend.AgentBackend` in a Ray actor, on the driver's node."""
from __future__ import annotations

from functools import partial

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from services.metrics import AGENT_UPDATE, observe

from .backend import AgentBackend

# Restarted when it dies; its calls are not retried: a restarted agent has lost its state, which
# the learner detects (policy version) and repairs by restarting from its newest checkpoint.
AgentActor = ray.remote(max_restarts=-1, max_task_retries=0)(AgentBackend)


def record_update(seconds: float, rule: str) -> None:
    """The agent actor's ``on_update``: an update's seconds into ``mtkd_agent_update_seconds``."""
    observe(AGENT_UPDATE, seconds, rule=rule)


def start_agent_actor(embedding_dims: list[int], num_classes: int, **agent_kwargs):
    """Start the agent actor on the driver's node (no CPU reserved: it is idle between updates).

    Pinned there (not a soft preference): a zero-CPU actor could otherwise land on any node, a
    preemptible one included, and the agent's state lives only in it until the next checkpoint.
    """
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    on_update = partial(record_update, rule=str(agent_kwargs.get("rule", "reference")))
    return AgentActor.options(num_cpus=0, scheduling_strategy=here).remote(embedding_dims, num_classes,
                                                                           on_update=on_update, **agent_kwargs)
