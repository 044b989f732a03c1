"""Independent checks of the teacher-weighting strategies (docs/method.md §3, and §4 for
``mtkd_rl``). Expected weights come from numpy re-implementations of the formulas of docs/method.md and from
literal hand-computed cases; every registered strategy is exercised through the registry.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkd.distill import STRATEGIES, Agent, StepFeedback, StepInputs, agent_state

B, C = 5, 4
DIMS = [3, 2, 4]
M = len(DIMS)
OFFSETS = np.cumsum([0] + [d + C + 3 for d in DIMS])[:-1]


def np_log_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_softmax(z, axis=-1):
    return np.exp(np_log_softmax(z, axis))


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    teacher_logits = [rng.normal(size=(B, C)) * 3 for _ in DIMS]
    targets = rng.integers(0, C, size=B)
    maps = [np.abs(rng.normal(size=(B, d, 2, 2))) for d in DIMS]
    embeddings = [rng.normal(size=(B, d)) for d in DIMS]
    student_logits = rng.normal(size=(B, C))
    return teacher_logits, targets, maps, embeddings, student_logits


def _inputs(seed: int = 0, warmup: bool = False) -> StepInputs:
    teacher_logits, targets, maps, embeddings, student_logits = _batch(seed)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    state = agent_state([f32(m) for m in maps], [f32(e) for e in embeddings], f32(student_logits),
                        [f32(z) for z in teacher_logits], torch.as_tensor(targets), 4.0)
    return StepInputs([f32(z) for z in teacher_logits], torch.as_tensor(targets), state=state, warmup=warmup)


def _build(name: str, **agent_kwargs):
    if name == "mtkd_rl":
        return STRATEGIES.build(name, agent=Agent(DIMS, C, seed=0, **agent_kwargs))
    return STRATEGIES.build(name)


# ----------------------------------------------------------------------------- registry
def test_the_spec_strategies_are_registered():
    assert {"ce", "aver", "ebkd", "camkd", "mtkd_rl"} <= set(STRATEGIES.names())


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_registered_strategy_builds_and_weighs(name):
    strategy = _build(name)
    weights = strategy.weights(_inputs())
    if not strategy.uses_teachers:
        return
    for w in (weights.logit, weights.feature):
        assert w.shape == (B, M)
        assert torch.isfinite(w).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(B))  # outside warm-up: a distribution per sample


def test_unknown_strategy_raises_with_close_matches():
    with pytest.raises((KeyError, ValueError)) as info:
        STRATEGIES.build("mtkd-rl")
    assert "mtkd_rl" in str(info.value)
    with pytest.raises((KeyError, ValueError)) as info:
        STRATEGIES.get("camkdd")
    assert "camkd" in str(info.value)


# ----------------------------------------------------------------------------- fixed strategies
def test_ce_uses_no_teachers():
    strategy = _build("ce")
    assert strategy.uses_teachers is False
    weights = strategy.weights(_inputs())
    assert weights.logit.numel() == 0 and weights.feature.numel() == 0  # nothing to weigh


def test_aver_is_one_over_m():
    weights = _build("aver").weights(_inputs())
    torch.testing.assert_close(weights.logit, torch.full((B, M), 1 / 3))
    torch.testing.assert_close(weights.feature, torch.full((B, M), 1 / 3))
    two = _build("aver").weights(StepInputs([torch.zeros(2, C)] * 2, torch.zeros(2, dtype=torch.long)))
    torch.testing.assert_close(two.logit, torch.full((2, 2), 0.5))


def test_ebkd_against_numpy():
    teacher_logits, targets, *_ = _batch(1)
    entropy = np.stack([-(np_softmax(z, 1) * np_log_softmax(z, 1)).sum(1) for z in teacher_logits], axis=1)
    expected = (1.0 - np_softmax(entropy, axis=1)) / (M - 1)
    weights = _build("ebkd").weights(_inputs(1))
    np.testing.assert_allclose(weights.logit.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights.feature.numpy(), expected, rtol=1e-5, atol=1e-6)
    # the most confident (lowest-entropy) teacher weighs most
    assert np.all(weights.logit.argmax(1).numpy() == entropy.argmin(1))


def test_ebkd_literal_two_teachers():
    # C = 2. teacher 0 uniform: H0 = ln2; teacher 1 [ln3, 0] -> [3/4, 1/4]: H1 = -(3/4 ln 3/4 + 1/4 ln 1/4)
    h0 = math.log(2)
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    w1 = 1 - math.exp(h1) / (math.exp(h0) + math.exp(h1))  # M - 1 = 1
    inputs = StepInputs([torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])], torch.tensor([0]))
    weights = _build("ebkd").weights(inputs)
    torch.testing.assert_close(weights.logit, torch.tensor([[1 - w1, w1]]))


def test_camkd_against_numpy():
    teacher_logits, targets, *_ = _batch(2)
    ce = np.stack([-np_log_softmax(z, 1)[np.arange(B), targets] for z in teacher_logits], axis=1)
    expected = (1.0 - np_softmax(ce, axis=1)) / (M - 1)
    weights = _build("camkd").weights(_inputs(2))
    np.testing.assert_allclose(weights.logit.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights.feature.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.all(weights.logit.argmax(1).numpy() == ce.argmin(1))


def test_camkd_literal_two_teachers():
    # target 0. teacher 0 [ln3, 0]: CE = ln(4/3); teacher 1 [0, 0]: CE = ln 2.
    # softmax_m([ln 4/3, ln 2]) = [4/3, 2] / (10/3) = [0.4, 0.6] -> w = 1 - that = [0.6, 0.4]
    inputs = StepInputs([torch.tensor([[math.log(3), 0.0]]), torch.tensor([[0.0, 0.0]])], torch.tensor([0]))
    weights = _build("camkd").weights(inputs)
    torch.testing.assert_close(weights.logit, torch.tensor([[0.6, 0.4]]))
    torch.testing.assert_close(weights.feature, torch.tensor([[0.6, 0.4]]))


# ----------------------------------------------------------------------------- mtkd_rl
def _hand_policy(agent: Agent, vector: torch.Tensor):
    """docs/method.md §4 static mixing written out in float64 from the agent's parameters."""
    p = {k: v.double() for k, v in agent.policy.state_dict().items()}
    s = vector.double()
    cos, kl, ce = (s[:, torch.as_tensor(OFFSETS + k)] for k in range(3))
    hidden = torch.clamp(s @ p["stem.weight"].T, min=0)
    a_logit = torch.softmax(hidden @ p["logit_head.weight"].T + p["logit_head.bias"], 1)
    a_feature = torch.softmax(hidden @ p["feature_head.weight"].T + p["feature_head.bias"], 1)
    confidence = (1 - torch.softmax(ce, 1)) / (M - 1)
    return (a_logit + confidence + torch.softmax(kl, 1)) / 3, (a_feature + confidence + torch.softmax(cos, 1)) / 3


def test_mtkd_rl_warmup_returns_unnormalised_ones():
    strategy = _build("mtkd_rl")
    assert strategy.needs_state
    weights = strategy.weights(_inputs(warmup=True))
    torch.testing.assert_close(weights.logit, torch.ones(B, M), rtol=0, atol=0)
    torch.testing.assert_close(weights.feature, torch.ones(B, M), rtol=0, atol=0)


def test_mtkd_rl_outside_warmup_returns_the_agents_weights():
    strategy = _build("mtkd_rl")
    inputs = _inputs(3)
    weights = strategy.weights(inputs)
    expected_logit, expected_feature = _hand_policy(strategy.agent, inputs.state.vector)
    torch.testing.assert_close(weights.logit.double(), expected_logit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.feature.double(), expected_feature, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.logit.sum(1), torch.ones(B))
    assert not torch.allclose(weights.logit, torch.full((B, M), 1 / M))  # not a constant
    assert weights.logit.grad_fn is None  # the student's loss never trains the agent


class _RecordingAgent:
    """Stands in for the agent: records what the strategy hands it."""

    def __init__(self, rule: str):
        self.rule, self.version, self.last_update, self.calls = rule, 0, {"agent/loss": 1.5}, []

    def act(self, state):
        return torch.full((B, M), 1 / M), torch.full((B, M), 1 / M)

    def observe(self, vector, reward, weight_logit=None, weight_feature=None):
        self.calls.append((vector, reward, weight_logit, weight_feature))
        return True

    def end_epoch(self):
        return False

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_mtkd_rl_refuses_an_object_that_is_no_agent():
    with pytest.raises(TypeError, match="neither an ExperienceAgent nor a StepAgent"):
        STRATEGIES.get("mtkd_rl")(object())


@pytest.mark.parametrize("rule", ["reference", "reinforce"])
def test_mtkd_rl_forwards_the_raw_reward_and_state(rule):
    agent = _RecordingAgent(rule)
    strategy = STRATEGIES.build("mtkd_rl", agent=agent)
    inputs = _inputs(4)
    raw = torch.tensor([-2.0, -1.0, -3.5, -0.2, -4.0])
    w_logit, w_feature = torch.rand(B, M), torch.rand(B, M)
    diagnostics = strategy.observe(StepFeedback(inputs.state, raw, w_logit, w_feature, warmup=False))
    assert diagnostics == {"agent/loss": 1.5}
    vector, reward, acted_logit, acted_feature = agent.calls[-1]
    assert reward is raw or torch.equal(reward, raw)  # not normalised on the way
    torch.testing.assert_close(vector, inputs.state.vector, rtol=0, atol=0)
    if rule == "reinforce":
        assert acted_logit is w_logit and acted_feature is w_feature
        # warm-up weights were not drawn from the policy: nothing to learn from
        strategy.observe(StepFeedback(inputs.state, raw, torch.ones(B, M), torch.ones(B, M), warmup=True))
        assert len(agent.calls) == 1
    else:
        assert acted_logit is None and acted_feature is None
    assert strategy.end_epoch() == {}
