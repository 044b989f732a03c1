"""The agent behind a service boundary: :class:`mtkd.distill.Agent` with tensor-in/tensor-out
verbs (what the Ray actor exposes). The learner's side of the Ray actor is
:class:`services.agent.proxy.AgentProxy`."""
from __future__ import annotations

import time
from typing import Callable

import torch

from mtkd.distill import Agent


class AgentBackend:
    """Owns an :class:`Agent` (policy, optimiser, buffer); verbs take and return tensors.

    Args: as :class:`mtkd.distill.Agent`, and ``on_update``: called with the seconds of each call
    that updated the policy (the agent actor records them as a metric).
    """

    def __init__(self, embedding_dims: list[int], num_classes: int,
                 on_update: Callable[[float], None] | None = None, **agent_kwargs):
        self.agent = Agent(embedding_dims, num_classes, **agent_kwargs)
        self._on_update = on_update

    def describe(self) -> dict:
        a = self.agent
        return {"num_teachers": len(a.embedding_dims), "state_dim": a.policy.state_dim, "version": a.version,
                "rule": a.rule, "mixing": a.mixing, "embedding_dims": list(a.embedding_dims),
                "num_classes": a.num_classes, "concentration": a.concentration, "agent_step": a.agent_step,
                "buffered": len(a.buffer)}

    def act(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``states [B, dim]`` -> ``(wL [B, M], wF [B, M], version)``."""
        weight_logit, weight_feature = self.agent.act(self.agent.state_from_vector(states))
        return weight_logit, weight_feature, self.agent.version

    def observe(self, states, reward, weight_logit=None, weight_feature=None) -> tuple[int, bool, dict]:
        """Store a batch of experience; ``(version, updated, last update's diagnostics)``."""
        start = time.perf_counter()
        updated = self.agent.observe(states, reward, weight_logit, weight_feature)
        return self._reply(updated, start)

    def end_epoch(self) -> tuple[int, bool, dict]:
        """Update the agent on what it holds (the end-of-epoch update); ``(version, updated, metrics)``."""
        start = time.perf_counter()
        return self._reply(self.agent.end_epoch(), start)

    def _reply(self, updated: bool, start: float) -> tuple[int, bool, dict]:
        if updated and self._on_update is not None:
            self._on_update(time.perf_counter() - start)
        return self.agent.version, updated, dict(self.agent.last_update) if updated else {}

    def policy(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(version, policy state_dict)``."""
        return self.agent.version, {k: v.clone() for k, v in self.agent.policy.state_dict().items()}

    def get_state(self) -> dict:
        """The agent's whole state (policy, optimiser, buffer) for a checkpoint."""
        return self.agent.state_dict()

    def set_state(self, state: dict) -> int:
        """Restore :meth:`get_state`'s output; returns the policy version."""
        self.agent.load_state_dict(state)
        return self.agent.version
