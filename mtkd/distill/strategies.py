"""Teacher-weighting strategies behind one interface (docs/method.md §3).

A strategy sees the step's inputs and returns per-sample teacher weights ``(wL, wF)``; the
engine owns the losses. Adding a strategy is one class registered here (or anywhere, with
``@STRATEGIES.register``) plus a config value: the training loop never changes.

YAML::

    distill:
      strategy: mtkd_rl     # ce | aver | ebkd | camkd | mtkd_rl
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from mtkd.registry import Registry

from .losses import inverted_softmax_over_teachers, per_sample_ce, prediction_entropy
from .state import AgentState

STRATEGIES: Registry = Registry("strategy")


@dataclass
class StepInputs:
    """What a strategy may look at for one batch: U decision units, M teachers, C classes, scored in
    R *rows* (a row is a prediction: an image in classification, where rows are the units, or a
    pixel of a segmentation unit). Strategies return ``[U, M]`` weights and never know the task.

    Attributes:
        teacher_logits: per teacher ``[R, C]``.
        targets: ``[R]`` the label of each row.
        state: the agent state per unit, present when the strategy ``needs_state``.
        warmup: True during the warm-up epochs.
        student_logits: ``[R, C]`` the student's logits of this step, detached.
        student_embedding: ``[R, D]`` the student's embedding (the classifier's input), detached.
        temperature: the KD temperature T.
        unit_of_row: ``[R]`` int64 the unit of each row, or None: the rows are the units.
        num_units: U when ``unit_of_row`` is given.
        unit_targets: ``[U]`` a label per unit (a segmentation unit's most frequent label), or None:
            ``targets``.
    """

    teacher_logits: list[torch.Tensor]
    targets: torch.Tensor
    state: AgentState | None = None
    warmup: bool = False
    student_logits: torch.Tensor | None = None
    student_embedding: torch.Tensor | None = None
    temperature: float = 4.0
    unit_of_row: torch.Tensor | None = None
    num_units: int | None = None
    unit_targets: torch.Tensor | None = None

    @property
    def units(self) -> int:
        """U, the number of decision units."""
        return self.targets.shape[0] if self.unit_of_row is None else int(self.num_units)

    @property
    def unit_labels(self) -> torch.Tensor:
        """``[U]`` one label per unit."""
        return self.targets if self.unit_targets is None else self.unit_targets

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """``[R, ...]`` per row -> ``[U, ...]`` mean over each unit's rows (0 for a unit without rows);
        ``values`` itself when the rows are the units."""
        return per_unit_mean(values, self.unit_of_row, self.num_units)


def per_unit_mean(values: torch.Tensor, unit_of_row: torch.Tensor | None, num_units: int | None) -> torch.Tensor:
    """``[R, ...]`` -> ``[U, ...]`` mean over the rows of each unit (``unit_of_row [R]``); ``values``
    itself when ``unit_of_row`` is None."""
    if unit_of_row is None:
        return values
    totals = values.new_zeros((int(num_units), *values.shape[1:])).index_add_(0, unit_of_row, values)
    counts = torch.bincount(unit_of_row, minlength=int(num_units)).clamp(min=1).to(values.dtype)
    return totals / counts.view(-1, *([1] * (values.dim() - 1)))


@dataclass
class StepFeedback:
    """What the engine tells a strategy after the step: the state, the raw reward ``[B]`` and the
    weights that were used ``[B, M]``."""

    state: AgentState | None
    reward: torch.Tensor
    weight_logit: torch.Tensor
    weight_feature: torch.Tensor
    warmup: bool


@dataclass
class Weights:
    """Teacher weights of a batch: ``logit`` and ``feature`` ``[B, M]``, plus diagnostics."""

    logit: torch.Tensor
    feature: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


class Strategy:
    """Base class. Subclasses implement :meth:`weights`; learning strategies also ``observe``."""

    uses_teachers = True  # False: the engine skips teachers, projectors and distillation terms
    needs_state = False  # True: the engine builds the agent state for ``weights``
    needs_agent = False  # True: built as ``Strategy(agent)`` with an agent (in process or a proxy)

    def weights(self, inputs: StepInputs) -> Weights:
        raise NotImplementedError

    def observe(self, feedback: StepFeedback) -> dict[str, float]:
        """Learn from a finished step. Returns diagnostics (empty for fixed strategies)."""
        return {}

    def end_epoch(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _uniform(inputs: StepInputs, value: float) -> torch.Tensor:
    return torch.full((inputs.units, len(inputs.teacher_logits)), value, device=inputs.targets.device)


@STRATEGIES.register(name="ce")
class CrossEntropyOnly(Strategy):
    """No distillation: the student learns from labels only (the lower bound)."""

    uses_teachers = False

    def weights(self, inputs: StepInputs) -> Weights:
        zeros = torch.zeros(inputs.units, 0, device=inputs.targets.device)
        return Weights(zeros, zeros)


@STRATEGIES.register(name="aver")
class EqualWeights(Strategy):
    """``wL = wF = 1/M``: classic equal-weight multi-teacher KD."""

    def weights(self, inputs: StepInputs) -> Weights:
        w = _uniform(inputs, 1.0 / len(inputs.teacher_logits))
        return Weights(w, w)


@STRATEGIES.register(name="ebkd")
class EntropyBased(Strategy):
    """``w = (1 - softmax_m(H)) / (M - 1)``, H the entropy of each teacher's prediction (a unit's mean)."""

    def weights(self, inputs: StepInputs) -> Weights:
        entropy = torch.stack([prediction_entropy(z) for z in inputs.teacher_logits], dim=1)  # [R, M]
        w = inverted_softmax_over_teachers(inputs.per_unit(entropy))
        return Weights(w, w)


@STRATEGIES.register(name="camkd")
class ConfidenceAware(Strategy):
    """``w = (1 - softmax_m(CE(z_t, y))) / (M - 1)`` for both logit and feature terms (CE: a unit's mean)."""

    def weights(self, inputs: StepInputs) -> Weights:
        ce = torch.stack([per_sample_ce(z, inputs.targets) for z in inputs.teacher_logits], dim=1)  # [R, M]
        w = inverted_softmax_over_teachers(inputs.per_unit(ce))
        return Weights(w, w)


@runtime_checkable
class ExperienceAgent(Protocol):
    """An agent that learns from stored experience (rules ``reference`` and ``reinforce``):
    :class:`mtkd.distill.agent.Agent` in process, ``services.agent.proxy.AgentProxy`` on Ray."""

    rule: str
    version: int
    last_update: dict

    def act(self, state: AgentState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wL, wF)`` ``[B, M]`` for a batch's state, without gradient."""

    def observe(self, vector: torch.Tensor, reward: torch.Tensor, weight_logit=None, weight_feature=None) -> bool:
        """Store ``[B, dim]`` states and ``[B]`` raw rewards; True when the policy was updated."""

    def end_epoch(self) -> bool:
        """Update on what is stored; True when the policy was updated."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class StepAgent(Protocol):
    """An agent that learns inside the student's step from the student's own outputs (rule ``meta``:
    :class:`mtkd.distill.meta.MetaAgent`)."""

    rule: str
    version: int
    last_update: dict

    def step(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Learn from the previous step, then ``(wL, wF)`` ``[B, M]`` for this one, without gradient."""

    def end_epoch(self) -> bool:
        """True when the epoch's end updated the policy."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@STRATEGIES.register(name="mtkd_rl")
class ReinforcedWeights(Strategy):
    """MTKD-RL: an agent chooses the weights; ones during warm-up.

    Args:
        agent: an :class:`ExperienceAgent` (rules ``reference``, ``reinforce``) or a :class:`StepAgent`
            (rule ``meta``).
    """

    needs_state = True
    needs_agent = True

    def __init__(self, agent: ExperienceAgent | StepAgent):
        if not isinstance(agent, (ExperienceAgent, StepAgent)):
            raise TypeError(f"{type(agent).__name__} is neither an ExperienceAgent nor a StepAgent")
        self.agent = agent

    def weights(self, inputs: StepInputs) -> Weights:
        if inputs.warmup:
            ones = _uniform(inputs, 1.0)
            return Weights(ones, ones)
        if isinstance(self.agent, StepAgent):  # learns inside the step, from the student's own outputs
            weight_logit, weight_feature = self.agent.step(inputs)
            return Weights(weight_logit, weight_feature, {"agent/version": float(self.agent.version),
                                                          **self.agent.last_update})
        weight_logit, weight_feature = self.agent.act(inputs.state)
        return Weights(weight_logit, weight_feature, {"agent/version": float(self.agent.version)})

    def observe(self, feedback: StepFeedback) -> dict[str, float]:
        if isinstance(self.agent, StepAgent):
            return {}
        if feedback.warmup and self.agent.rule == "reinforce":
            return {}  # no action was drawn from the policy: nothing to learn from
        acted = (feedback.weight_logit, feedback.weight_feature) if self.agent.rule == "reinforce" else (None, None)
        updated = self.agent.observe(feedback.state.vector, feedback.reward, *acted)
        return dict(self.agent.last_update) if updated else {}

    def end_epoch(self) -> dict[str, float]:
        return dict(self.agent.last_update) if self.agent.end_epoch() else {}

    def state_dict(self) -> dict:
        return {"agent": self.agent.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
