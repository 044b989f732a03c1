"""The MTKD-RL agent: a policy over teacher weights, a buffer of experience, and its update
rules (docs/method.md §4).

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

The agent cannot be poisoned. :meth:`Agent.observe` validates a batch before storing it, so that
no later update can fail because of it, and raises :class:`InvalidExperience` (a ``ValueError``)
with the buffer left exactly as it was:

* states ``[B, dim]`` in the policy's dtype and device, finite, ``|x| <= MAX_ABS_STATE`` (1e6).
  A real state holds cosines (``|x| <= 1``), ``KL * T^2`` and cross-entropies (nats: tens),
  embeddings and logits (tens to hundreds); 1e6 leaves four orders of magnitude of headroom, and
  with weights of ordinary size keeps each hidden unit of the policy (a sum of ``dim`` products
  of a state value and a weight) tens of orders of magnitude below float32's largest value, 3.4e38.
* reward ``[B]``, float32 or float64, finite, ``|r| <= MAX_ABS_REWARD`` (1e9): a raw reward is minus
  a sum of losses, and this keeps the batch mean and std that both rules take finite.
* acted weights ``[B, M]`` (required by ``reinforce``), float32 or float64: finite, on the simplex
  (entries >= 0, rows summing to 1 within 1e-6, the tolerance of the Dirichlet's own support check),
  and > 0 under ``reinforce`` (the log-probability of a 0 is infinite).

What is stored is a copy: changing the tensors afterwards does not change the buffer.

Should an update still produce a non-finite loss or parameter (or raise), :meth:`Agent.update`
restores the policy and optimiser to their state before the update, drops the stored batches,
keeps the version, and raises :class:`AgentUpdateError`; the agent stays usable.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mtkd.errors import NumericError, UserError

from .policy import PolicyNet
from .reward import normalized_reward, reference_agent_loss
from .state import AgentState, state_dim

RULES = ("reference", "reinforce", "meta")
STEP_RULES = ("meta",)  # rules that learn inside the student's step (mtkd.distill.meta.MetaAgent)
ACTOR_RULES = tuple(rule for rule in RULES if rule not in STEP_RULES)  # may live in their own actor (stored experience)
MIXINGS = ("static", "dynamic")
_MIN_CONCENTRATION = 1e-3
MAX_ABS_STATE = 1e6
"""Largest magnitude :meth:`Agent.observe` accepts in a state vector (see the module docstring)."""
MAX_ABS_REWARD = 1e9
"""Largest magnitude :meth:`Agent.observe` accepts in a raw reward."""
SIMPLEX_TOLERANCE = 1e-6
"""Largest ``|sum - 1|`` of a row of acted weights: that of ``torch.distributions.constraints.simplex``."""


class InvalidExperience(ValueError):
    """A batch given to :meth:`Agent.observe` is malformed or out of range; nothing was stored."""


class AgentUpdateError(NumericError, RuntimeError):
    """An update produced non-finite values (or raised); the policy was restored, the stored
    batches dropped, and the version kept (CLI exit 3)."""


class AgentSettingError(UserError, ValueError):
    """An :class:`Agent` asked for an unknown rule or mixing, or ``agent_step < 1`` (CLI exit 2). (The
    config refuses these at load as a ``ConfigError``; :mod:`mtkd.config` imports this module for
    the valid names, so this one does not import it.)"""


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
            raise AgentSettingError(f"unknown agent rule {rule!r} (valid: {', '.join(RULES)})")
        if mixing not in MIXINGS:
            raise AgentSettingError(f"unknown agent mixing {mixing!r} (valid: {', '.join(MIXINGS)})")
        if agent_step < 1:
            raise AgentSettingError(f"agent_step must be >= 1, got {agent_step}")
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

        Raises:
            InvalidExperience: the batch is malformed or out of range (see the module docstring);
                nothing was stored.
            AgentUpdateError: the update this batch triggered failed; see :meth:`update`.
        """
        self.check_experience(vector, reward, weight_logit, weight_feature)
        weight_logit, weight_feature = (None if w is None else w.detach().clone() for w in (weight_logit, weight_feature))
        self.buffer.append(Experience(vector.detach().clone(), reward.detach().clone(), weight_logit, weight_feature))
        if len(self.buffer) >= self.agent_step:
            self.update()
            return True
        return False

    def check_experience(self, vector: torch.Tensor, reward: torch.Tensor, weight_logit=None,
                         weight_feature=None) -> None:
        """Raise :class:`InvalidExperience` unless ``observe`` may store this batch.

        Args:
            vector: ``[B, dim]`` state, the policy's dtype and device, finite, ``|x| <= MAX_ABS_STATE``.
            reward: ``[B]`` raw reward, float32 or float64, finite, ``|r| <= MAX_ABS_REWARD``.
            weight_logit, weight_feature: ``[B, M]`` float32 or float64 acted weights on the
                simplex, or None (both required by the reinforce rule).
        """
        parameter = next(self.policy.parameters())
        dim, num_teachers = self.policy.state_dim, self.policy.num_teachers
        _check_tensor("states", vector, ndim=2)
        if vector.shape[0] < 1 or vector.shape[1] != dim:
            raise InvalidExperience(f"states has shape {list(vector.shape)}; expected [B >= 1, {dim}]")
        if vector.dtype != parameter.dtype or vector.device != parameter.device:
            raise InvalidExperience(f"states is {vector.dtype} on {vector.device}; expected {parameter.dtype} on "
                                    f"{parameter.device} (the policy's)")
        batch = vector.shape[0]
        _check_values("states", vector, MAX_ABS_STATE)
        _check_tensor("reward", reward, ndim=1, dtypes=_WIDE_FLOATS)
        if reward.shape[0] != batch:
            raise InvalidExperience(f"reward has shape {list(reward.shape)}; expected [{batch}] (one per state)")
        _check_values("reward", reward, MAX_ABS_REWARD)
        if self.rule == "reinforce" and (weight_logit is None or weight_feature is None):
            missing = [n for n, w in (("weight_logit", weight_logit), ("weight_feature", weight_feature)) if w is None]
            raise InvalidExperience(f"the reinforce rule needs the weights that were acted; {' and '.join(missing)} "
                                    f"missing (expected [{batch}, {num_teachers}] each)")
        for name, weights in (("weight_logit", weight_logit), ("weight_feature", weight_feature)):
            if weights is not None:
                _check_weights(name, weights, batch, num_teachers, positive=self.rule == "reinforce")

    def end_epoch(self) -> bool:
        """Update on whatever is stored (the reference updates at every epoch end).

        Raises:
            AgentUpdateError: see :meth:`update`.
        """
        if not self.buffer:
            return False
        self.update()
        return True

    # ----------------------------------------------------------------- update
    def update(self) -> dict[str, float]:
        """One optimiser step per stored batch, in order; clears the buffer; bumps the version.

        Raises:
            AgentUpdateError: a step gave a non-finite loss or parameter, or the update raised.
                The policy and optimiser are back to their state before this update, the
                stored batches are dropped and the version is unchanged.
        """
        update_fn = reference_update if self.rule == "reference" else reinforce_update
        before = (copy.deepcopy(self.policy.state_dict()), copy.deepcopy(self.optimizer.state_dict()))
        try:
            self.last_update = update_fn(self, self.buffer)
        except Exception as err:  # noqa: BLE001 - whatever failed, the agent must stay usable
            self.policy.load_state_dict(before[0])
            self.optimizer.load_state_dict(before[1])
            dropped, self.buffer = len(self.buffer), []
            raise AgentUpdateError(
                f"agent update failed ({err}); the policy was restored to version {self.version} and the "
                f"{dropped} stored batches were dropped"
            ) from err
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


_WIDE_FLOATS = (torch.float32, torch.float64)  # float16/bfloat16 rewards overflow in the std; weights miss 1e-6


def _check_tensor(name: str, value, *, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """A ``ndim``-d floating-point tensor (of one of ``dtypes`` if given)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidExperience(f"{name} is a {type(value).__name__}; expected a torch.Tensor")
    allowed = value.dtype in dtypes if dtypes else value.is_floating_point()
    if value.ndim != ndim or not allowed:
        kind = " or ".join(str(d).removeprefix("torch.") for d in dtypes) if dtypes else "floating-point"
        raise InvalidExperience(f"{name} is a {value.ndim}-d {value.dtype} tensor of shape {list(value.shape)}; "
                                f"expected a {ndim}-d {kind} tensor")


def _check_finite(name: str, value: torch.Tensor) -> None:
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise InvalidExperience(f"{name} has {bad} non-finite values (NaN or infinity); expected finite values")


def _check_values(name: str, value: torch.Tensor, limit: float) -> None:
    """Finite and ``|x| <= limit`` everywhere."""
    _check_finite(name, value)
    largest = float(value.abs().max()) if value.numel() else 0.0
    if largest > limit:
        raise InvalidExperience(f"{name} has values up to {largest:.4g} in magnitude; expected |x| <= {limit:g}")


def _check_weights(name: str, weights, batch: int, num_teachers: int, *, positive: bool) -> None:
    """``[batch, num_teachers]`` rows on the simplex (entries > 0 when ``positive``)."""
    _check_tensor(name, weights, ndim=2, dtypes=_WIDE_FLOATS)
    if tuple(weights.shape) != (batch, num_teachers):
        raise InvalidExperience(f"{name} has shape {list(weights.shape)}; expected [{batch}, {num_teachers}]")
    _check_finite(name, weights)
    low = float(weights.min())
    if low < 0 or (positive and low <= 0):
        raise InvalidExperience(f"{name} has a smallest entry of {low:.4g}; expected every entry "
                                f"{'> 0 (the reinforce rule takes its log)' if positive else '>= 0'}")
    error = float((weights.sum(dim=1) - 1).abs().max())
    if not error < SIMPLEX_TOLERANCE:
        raise InvalidExperience(f"{name} has a row whose sum differs from 1 by {error:.3g}; expected rows on the "
                                f"simplex (|sum - 1| < {SIMPLEX_TOLERANCE:g})")


def _sgd_step(agent: Agent, loss: torch.Tensor, index: int) -> None:
    """One optimiser step on ``loss``; refuses a non-finite loss or a step to non-finite parameters."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"stored batch {index} gave a non-finite loss ({loss.item()})")
    agent.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    agent.optimizer.step()
    for name, parameter in agent.policy.named_parameters():
        if not torch.isfinite(parameter).all():
            raise FloatingPointError(f"stored batch {index} made policy parameter {name!r} non-finite")


def reference_update(agent: Agent, buffer: list[Experience]) -> dict[str, float]:
    """The reference rule: per stored batch, recompute (wL, wF) with gradients and step on the
    reward-weighted cross-entropy towards 1."""
    losses, rewards_hat = [], []
    for index, experience in enumerate(buffer):
        b_state = agent.state_from_vector(experience.vector)  # [B, dim]
        b_reward_hat = normalized_reward(experience.reward)  # [B]
        b_weight_logit, b_weight_feature = agent.policy(b_state)  # [B, M] each, with grad
        loss = reference_agent_loss(b_weight_logit, b_weight_feature, b_reward_hat)
        _sgd_step(agent, loss, index)
        losses.append(loss.item())
        rewards_hat.append(b_reward_hat.mean().item())
    return {"agent/loss": sum(losses) / len(losses), "agent/reward_hat": sum(rewards_hat) / len(rewards_hat),
            "agent/batches": float(len(buffer))}


def reinforce_update(agent: Agent, buffer: list[Experience]) -> dict[str, float]:
    """The paper's rule: policy gradient with the batch-mean reward as baseline."""
    losses, entropies = [], []
    for index, experience in enumerate(buffer):
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
        _sgd_step(agent, loss, index)
        losses.append(loss.item())
        entropies.append((pi_logit.entropy().mean() + pi_feature.entropy().mean()).item() / 2)
    return {"agent/loss": sum(losses) / len(losses), "agent/policy_entropy": sum(entropies) / len(entropies),
            "agent/batches": float(len(buffer))}
