"""The MTKD-RL agent: a policy over teacher weights, a buffer of experience, and its update
rules (SPEC.md section 4).

Two rules:

* ``reference`` (default, the authors' code): deterministic weights; the learner stores
  ``(state, r_hat)`` per batch and, every ``agent_step`` batches and at the end of every epoch,
  the agent makes one SGD step per stored batch on the reward-weighted cross-entropy
  :func:`~mtkd.distill.reward.reference_agent_loss`.
* ``reinforce`` (the paper's explicit policy gradient, an option): the policy is stochastic.
  Each row of weights is drawn from a Dirichlet whose mean is the mixed weight of
  :class:`PolicyNet` and whose total concentration is ``concentration * M``:
  ``w ~ Dir(concentration * M * w_mean)``. The update ascends
  ``E[(r - b) * grad log pi(w | s)]`` with the batch-mean reward as baseline ``b``, the
  advantage scaled by the batch's reward std: ``loss = -mean_i(A_i (log pi(wL_i) + log pi(wF_i)))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import PolicyNet
from .reward import normalized_reward, reference_agent_loss
from .state import AgentState, state_dim

RULES = ("reference", "reinforce")
MIXINGS = ("static", "dynamic")
_MIN_CONCENTRATION = 1e-3


def dirichlet(mean_weights: torch.Tensor, concentration: float) -> torch.distributions.Dirichlet:
    """The reinforce rule's policy: ``Dir(concentration * M * mean_weights)``; ``[B, M]`` rows."""
    num_teachers = mean_weights.shape[1]
    alpha = (concentration * num_teachers * mean_weights).clamp(min=_MIN_CONCENTRATION)
    return torch.distributions.Dirichlet(alpha)


def _interior(sample: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    # A draw can underflow to an exact 0, whose log-probability is -inf: keep it inside the simplex.
    sample = sample.clamp(min=floor)
    return sample / sample.sum(dim=1, keepdim=True)


@torch.no_grad()
def act_with_policy(
    policy: PolicyNet, state: AgentState, rule: str, concentration: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher weights ``(wL, wF)`` ``[B, M]`` for the student step; no gradient.

    ``reference``: the policy's mixed weights. ``reinforce``: one Dirichlet draw per row
    (from the global torch RNG).
    """
    weight_logit, weight_feature = policy(state)
    if rule == "reinforce":
        weight_logit = _interior(dirichlet(weight_logit, concentration).sample())
        weight_feature = _interior(dirichlet(weight_feature, concentration).sample())
    return weight_logit, weight_feature


@dataclass
class Experience:
    """One stored batch: the state vector ``[B, dim]``, raw reward ``[B]`` and, for the reinforce
    rule, the weights that were acted ``[B, M]``."""

    vector: torch.Tensor
    reward: torch.Tensor
    weight_logit: torch.Tensor | None = None
    weight_feature: torch.Tensor | None = None


class Agent:
    """Owns the policy, its optimiser (plain SGD) and the experience buffer.

    Args:
        embedding_dims: ``D_m`` per teacher (fixes the state layout).
        num_classes: C.
        rule: ``reference`` or ``reinforce``.
        mixing: ``static`` or ``dynamic``.
        agent_step: update after this many stored batches (and at every epoch end).
        lr: SGD learning rate (no momentum, no weight decay).
        concentration: per-teacher Dirichlet concentration of the reinforce rule.
        seed: seeds the policy's initialisation only (independent of the global RNG).
    """

    def __init__(
        self,
        embedding_dims: list[int],
        num_classes: int,
        *,
        rule: str = "reference",
        mixing: str = "static",
        agent_step: int = 1000,
        lr: float = 0.1,
        concentration: float = 10.0,
        seed: int = 0,
    ):
        if rule not in RULES:
            raise ValueError(f"unknown agent rule {rule!r} (valid: {', '.join(RULES)})")
        if mixing not in MIXINGS:
            raise ValueError(f"unknown agent mixing {mixing!r} (valid: {', '.join(MIXINGS)})")
        if agent_step < 1:
            raise ValueError(f"agent_step must be >= 1, got {agent_step}")
        self.embedding_dims = list(embedding_dims)
        self.num_classes = num_classes
        self.rule, self.mixing = rule, mixing
        self.agent_step, self.concentration = agent_step, concentration
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = PolicyNet(state_dim(self.embedding_dims, num_classes), len(self.embedding_dims), mixing == "dynamic")
        self.optimizer = torch.optim.SGD(self.policy.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
        self.buffer: list[Experience] = []
        self.version = 0
        self.last_update: dict[str, float] = {}

    # ------------------------------------------------------------------ acting
    def state_from_vector(self, vector: torch.Tensor) -> AgentState:
        """Rebuild an :class:`AgentState` from a ``[B, dim]`` vector."""
        return AgentState.from_vector(vector, self.embedding_dims, self.num_classes)

    def act(self, state: AgentState) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher weights ``(wL, wF)`` ``[B, M]`` for a batch (no gradient)."""
        return act_with_policy(self.policy, state, self.rule, self.concentration)

    # --------------------------------------------------------------- observing
    def observe(self, vector: torch.Tensor, reward: torch.Tensor, weight_logit=None, weight_feature=None) -> bool:
        """Store one batch of experience; update when ``agent_step`` batches are stored.

        Args:
            vector: ``[B, dim]`` state. reward: ``[B]`` RAW reward (each rule normalises it).
            weight_logit, weight_feature: ``[B, M]`` the weights acted (reinforce rule only).

        Returns:
            Whether the policy was updated (and its version bumped).
        """
        if self.rule == "reinforce" and (weight_logit is None or weight_feature is None):
            raise ValueError("the reinforce rule needs the weights that were acted")
        self.buffer.append(Experience(vector.detach().clone(), reward.detach().clone(), weight_logit, weight_feature))
        if len(self.buffer) >= self.agent_step:
            self.update()
            return True
        return False

    def end_epoch(self) -> bool:
        """Update on whatever is stored (the reference updates at every epoch end)."""
        if not self.buffer:
            return False
        self.update()
        return True

    # ----------------------------------------------------------------- update
    def update(self) -> dict[str, float]:
        """One optimiser step per stored batch, in order; clears the buffer; bumps the version."""
        update_fn = reference_update if self.rule == "reference" else reinforce_update
        self.last_update = update_fn(self, self.buffer)
        self.buffer = []
        self.version += 1
        return self.last_update

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Policy, optimiser, version and buffer (tensors and plain values only)."""
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "buffer": [vars(e) for e in self.buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self.buffer = [Experience(**e) for e in state["buffer"]]


def reference_update(agent: Agent, buffer: list[Experience]) -> dict[str, float]:
    """The reference rule: per stored batch, recompute (wL, wF) with gradients and step on the
    reward-weighted cross-entropy towards 1."""
    losses, rewards_hat = [], []
    for experience in buffer:
        b_state = agent.state_from_vector(experience.vector)  # [B, dim]
        b_reward_hat = normalized_reward(experience.reward)  # [B]
        b_weight_logit, b_weight_feature = agent.policy(b_state)  # [B, M] each, with grad
        loss = reference_agent_loss(b_weight_logit, b_weight_feature, b_reward_hat)
        agent.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        agent.optimizer.step()
        losses.append(loss.item())
        rewards_hat.append(b_reward_hat.mean().item())
    return {"agent/loss": sum(losses) / len(losses), "agent/reward_hat": sum(rewards_hat) / len(rewards_hat),
            "agent/batches": float(len(buffer))}


def reinforce_update(agent: Agent, buffer: list[Experience]) -> dict[str, float]:
    """The paper's rule: policy gradient with the batch-mean reward as baseline."""
    losses, entropies = [], []
    for experience in buffer:
        b_state = agent.state_from_vector(experience.vector)
        b_reward = experience.reward  # [B]
        b_advantage = b_reward - b_reward.mean()
        if b_reward.numel() > 1 and b_reward.std() > 0:
            b_advantage = b_advantage / b_reward.std()
        mean_logit, mean_feature = agent.policy(b_state)  # [B, M] each, with grad
        pi_logit = dirichlet(mean_logit, agent.concentration)
        pi_feature = dirichlet(mean_feature, agent.concentration)
        b_log_prob = pi_logit.log_prob(experience.weight_logit) + pi_feature.log_prob(experience.weight_feature)  # [B]
        loss = -(b_advantage * b_log_prob).mean()
        agent.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        agent.optimizer.step()
        losses.append(loss.item())
        entropies.append((pi_logit.entropy().mean() + pi_feature.entropy().mean()).item() / 2)
    return {"agent/loss": sum(losses) / len(losses), "agent/policy_entropy": sum(entropies) / len(entropies),
            "agent/batches": float(len(buffer))}
