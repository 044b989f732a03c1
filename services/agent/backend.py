"""The agent behind a service boundary: :class:`mtkd.distill.Agent` with tensor-in/tensor-out
verbs (what the Ray actor and the gRPC server expose), and :class:`AgentProxy`, the learner's
side, which acts with a local copy of the newest policy and sends experience to the agent."""
from __future__ import annotations

import torch

from mtkd.distill import Agent, AgentState, PolicyNet, act_with_policy, state_dim


class AgentBackend:
    """Owns an :class:`Agent` (policy, optimiser, buffer); verbs take and return tensors.

    Args: as :class:`mtkd.distill.Agent`.
    """

    def __init__(self, embedding_dims: list[int], num_classes: int, **agent_kwargs):
        self.agent = Agent(embedding_dims, num_classes, **agent_kwargs)

    def describe(self) -> dict:
        a = self.agent
        return {"num_teachers": len(a.embedding_dims), "state_dim": a.policy.state_dim, "version": a.version,
                "rule": a.rule, "mixing": a.mixing, "embedding_dims": list(a.embedding_dims),
                "num_classes": a.num_classes, "concentration": a.concentration}

    def act(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``states [B, dim]`` -> ``(wL [B, M], wF [B, M], version)``."""
        weight_logit, weight_feature = self.agent.act(self.agent.state_from_vector(states))
        return weight_logit, weight_feature, self.agent.version

    def observe(self, states, reward, weight_logit=None, weight_feature=None) -> tuple[int, bool, dict]:
        """Store a batch of experience; ``(version, updated, last update's diagnostics)``."""
        updated = self.agent.observe(states, reward, weight_logit, weight_feature)
        return self.agent.version, updated, dict(self.agent.last_update) if updated else {}

    def end_epoch(self) -> tuple[int, bool, dict]:
        updated = self.agent.end_epoch()
        return self.agent.version, updated, dict(self.agent.last_update) if updated else {}

    def policy(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(version, policy state_dict)``."""
        return self.agent.version, {k: v.clone() for k, v in self.agent.policy.state_dict().items()}

    def get_state(self) -> dict:
        return self.agent.state_dict()

    def set_state(self, state: dict) -> int:
        self.agent.load_state_dict(state)
        return self.agent.version


class AgentProxy:
    """The learner's view of a remote agent, with the duck type of :class:`mtkd.distill.Agent`
    that :class:`mtkd.distill.strategies.ReinforcedWeights` uses.

    Acting is local: the proxy keeps a copy of the policy and replaces it whenever the agent
    reports a new version. ``observe`` is a synchronous call, so the learner always acts with
    the newest policy: the same weights, in the same order, as the in-process engine.

    Args:
        call: ``call(verb, *args)`` runs a verb of the agent backend and returns its result
            (``ray.get(actor.verb.remote(*args))`` on Ray).
    """

    def __init__(self, call):
        self._call = call
        info = call("describe")
        self.rule, self.concentration = info["rule"], info["concentration"]
        self.embedding_dims, self.num_classes = info["embedding_dims"], info["num_classes"]
        self.policy = PolicyNet(state_dim(self.embedding_dims, self.num_classes), info["num_teachers"],
                                info["mixing"] == "dynamic")
        self.version = -1
        self.last_update: dict = {}
        self._sync()

    def _sync(self) -> None:
        version, state = self._call("policy")
        self.policy.load_state_dict(state)
        self.version = version

    def act(self, state: AgentState) -> tuple[torch.Tensor, torch.Tensor]:
        return act_with_policy(self.policy, state, self.rule, self.concentration)

    def observe(self, vector, reward, weight_logit=None, weight_feature=None) -> bool:
        return self._after(*self._call("observe", vector, reward, weight_logit, weight_feature))

    def end_epoch(self) -> bool:
        return self._after(*self._call("end_epoch"))

    def _after(self, version: int, updated: bool, diagnostics: dict | None = None) -> bool:
        if updated:
            self.last_update = diagnostics or {}
        if version != self.version:
            self._sync()
        return updated

    def state_dict(self) -> dict:
        return self._call("get_state")

    def load_state_dict(self, state: dict) -> None:
        self._call("set_state", state)
        self._sync()
