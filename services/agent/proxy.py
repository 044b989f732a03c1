"""The learner's side of the agent actor: act locally, send experience without waiting, wait only
where an update is due.

The agent updates when its buffer reaches ``agent_step`` batches and at every epoch end. The
learners count what they send, so they know at which step an update happens; only there do they
wait for the agent and fetch its new policy. Everything in between is fire-and-forget (Ray runs
one caller's calls in order), so the numbers equal the in-process engine's.

With several learners, rank 0 speaks for all: each step it sends the experience of every rank
(gathered with one all-gather), in rank order, and broadcasts each new policy to the others. The
agent's schedule is then the same on every run, whatever the timing.
"""
from __future__ import annotations

import ray
import torch

from mtkd.distill import AgentState, PolicyNet, act_with_policy, state_dim
from services.learner.collective import all_gather, broadcast_parameters, world

CHECK_EVERY = 64  # steps between non-blocking checks that sent experience was accepted


class AgentOutOfSync(RuntimeError):
    """The agent actor's state is not what the learner expects (it restarted, or another caller
    used it); the learner restarts from its newest checkpoint, which holds the agent's state."""


class AgentProxy:
    """An :class:`mtkd.distill.strategies.ExperienceAgent` whose agent lives in an actor.

    Args:
        actor: handle of the agent actor (an :class:`~services.agent.backend.AgentBackend`).
        device: where the learner acts (the policy copy lives there).
        timeout_s: deadline of every wait on the actor.

    Collective: with several learners every rank must make the same calls in the same order
    (construction, ``observe``, ``end_epoch``, ``load_state_dict``), as the training loop does.
    """

    def __init__(self, actor, *, device: torch.device | str = "cpu", timeout_s: float = 600.0):
        self._actor = actor
        self._timeout_s = timeout_s
        self._rank, self._world = world()
        info = self._get(actor.describe.remote())
        self.rule, self.concentration = info["rule"], info["concentration"]
        self.embedding_dims, self.num_classes = info["embedding_dims"], info["num_classes"]
        self.agent_step = int(info["agent_step"])
        self._buffered = int(info["buffered"])
        self.policy = PolicyNet(state_dim(self.embedding_dims, self.num_classes), info["num_teachers"],
                                info["mixing"] == "dynamic").to(device)
        self.version = -1
        self.last_update: dict = {}
        self._pending: list = []
        self._expected_version = int(info["version"])
        self._sync_policy()

    # ----------------------------------------------------------------- acting
    def act(self, state: AgentState) -> tuple[torch.Tensor, torch.Tensor]:
        return act_with_policy(self.policy, state, self.rule, self.concentration)

    # -------------------------------------------------------------- observing
    def observe(self, vector, reward, weight_logit=None, weight_feature=None) -> bool:
        """Send this step's experience (every rank's, from rank 0); wait only if an update is due.

        Returns whether the agent updated during this step.
        """
        parts = [vector, reward] + ([weight_logit, weight_feature] if weight_logit is not None else [])
        per_rank = list(zip(*(all_gather(p.detach()) for p in parts)))  # [rank][part]
        updates = 0
        for experience in per_rank:
            if self._rank == 0:
                self._pending.append(self._actor.observe.remote(*(t.cpu() for t in experience)))
            self._buffered += 1
            if self._buffered >= self.agent_step:
                self._buffered, updates = 0, updates + 1
        if updates:
            self._expected_version += updates
            self._wait_for_update()
        elif self._rank == 0 and self._pending and len(self._pending) % CHECK_EVERY == 0:
            self._release_finished()
        return updates > 0

    def end_epoch(self) -> bool:
        """The agent trains on what it holds (if anything); every learner gets the new policy."""
        if self._buffered == 0:
            self._wait_pending()
            return False
        self._buffered = 0
        self._expected_version += 1
        if self._rank == 0:
            self._pending.append(self._actor.end_epoch.remote())
        self._wait_for_update()
        return True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The agent's whole state (policy, optimiser, version, buffer), from the actor."""
        self._wait_pending()
        return self._get(self._actor.get_state.remote())

    def load_state_dict(self, state: dict) -> None:
        """Put ``state`` (from a checkpoint) into the actor; every learner syncs to it."""
        if self._rank == 0:
            self._wait_pending()
            self._get(self._actor.set_state.remote(state))
        self._buffered = len(state["buffer"])
        self._expected_version = int(state["version"])
        self._sync_policy()

    # -------------------------------------------------------------- plumbing
    def _get(self, refs):
        return ray.get(refs, timeout=self._timeout_s)

    def _wait_pending(self) -> list:
        replies, self._pending = (self._get(self._pending) if self._pending else []), []
        return replies

    def _release_finished(self) -> None:
        """Drop replies that have arrived (surfacing an error early) without waiting for the rest."""
        ready, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        self._get(ready)

    def _wait_for_update(self) -> None:
        if self._rank == 0:
            replies = self._wait_pending()
            updated = [r for r in replies if r[1]]
            if updated:
                self.last_update = updated[-1][2] or {}
        self._sync_policy()

    def _sync_policy(self) -> None:
        version = -1
        if self._rank == 0:
            version, state = self._get(self._actor.policy.remote())
            if version != self._expected_version:
                raise AgentOutOfSync(f"the agent actor is at policy version {version}, the learner expected "
                                     f"{self._expected_version} (it restarted or was used by another caller)")
            self.policy.load_state_dict(state)
        self.version = broadcast_parameters(self.policy, version)
