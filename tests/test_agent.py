"""Independent checks of the MTKD-RL agent (docs/method.md §4): when it updates, what one update
is, and the paper's reinforce option.

Expected parameters are obtained by replaying the updates by hand in float64: the policy forward,
the heuristics, the mixing and the loss are written out here from docs/method.md, gradients come from
float64 autograd of those formulas, and the step is ``w <- w - 0.1 * grad`` (no torch.optim).
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from mtkd.distill import Agent, AgentState
from mtkd.distill.agent import MAX_ABS_STATE, AgentUpdateError, InvalidExperience

DIMS, C, B = [3, 5], 4, 6
STATE_DIM = sum(d + C + 3 for d in DIMS)
M = len(DIMS)
OFFSETS = np.cumsum([0] + [d + C + 3 for d in DIMS])[:-1]


# ----------------------------------------------------------------------------- hand-written reference
def _vector(seed: int, batch: int = B) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    blocks = []
    for d in DIMS:
        blocks += [rng.uniform(-1, 1, (batch, 1)), rng.uniform(0, 3, (batch, 1)), rng.uniform(0, 4, (batch, 1)),
                   rng.normal(size=(batch, d)), rng.normal(size=(batch, C)) * 2]
    return torch.tensor(np.concatenate(blocks, axis=1), dtype=torch.float32)


def _raw_reward(seed: int, batch: int = B) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(-rng.uniform(0.5, 5.0, batch), dtype=torch.float32)


def _mixed_weights(params: dict[str, torch.Tensor], vector: torch.Tensor, dynamic: bool):
    """docs/method.md §4 in float64: h = ReLU(W1 s); aL, aF = softmax(heads); c, gL, gF; static or dynamic mix."""
    s = vector.double()
    cos, kl, ce = (s[:, torch.as_tensor(OFFSETS + k)] for k in range(3))
    hidden = torch.clamp(s @ params["stem.weight"].T, min=0.0)
    a_logit = torch.softmax(hidden @ params["logit_head.weight"].T + params["logit_head.bias"], dim=1)
    a_feature = torch.softmax(hidden @ params["feature_head.weight"].T + params["feature_head.bias"], dim=1)
    confidence = (1.0 - torch.softmax(ce, dim=1)) / (M - 1)
    g_logit, g_feature = torch.softmax(kl, dim=1), torch.softmax(cos, dim=1)
    if dynamic:
        lam, mu = torch.softmax(params["theta_logit"], 0), torch.softmax(params["theta_feature"], 0)
    else:
        lam = mu = torch.full((3,), 1.0 / 3.0, dtype=torch.float64)
    return (lam[0] * a_logit + lam[1] * confidence + lam[2] * g_logit,
            mu[0] * a_feature + mu[1] * confidence + mu[2] * g_feature)


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    r = raw.double()
    std = math.sqrt(((r - r.mean()) ** 2).sum().item() / (len(r) - 1))
    return torch.clamp((r - r.mean()) / std, 0.0, 1.0)


def _reference_loss(w_logit, w_feature, reward_hat):
    log_l = torch.clamp(torch.log(w_logit), min=-100.0)
    log_f = torch.clamp(torch.log(w_feature), min=-100.0)
    return (reward_hat[:, None] * (-log_l - log_f)).mean()


def _params64(agent: Agent) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in agent.policy.state_dict().items()}


def _replay_reference(params: dict, batches: list[tuple[torch.Tensor, torch.Tensor]], dynamic: bool, lr=0.1) -> dict:
    """One plain SGD step per stored (state, RAW reward) batch, in order."""
    params = {k: v.clone() for k, v in params.items()}
    for vector, raw in batches:
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = _reference_loss(*_mixed_weights(leaves, vector, dynamic), _normalise(raw))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        params = {k: (leaves[k] - lr * g).detach() for k, g in zip(leaves, grads)}
    return params


def _assert_params_close(agent: Agent, expected: dict, atol=2e-6):
    actual = agent.policy.state_dict()
    assert set(actual) == set(expected)
    for k in expected:
        torch.testing.assert_close(actual[k].double(), expected[k], rtol=1e-5, atol=atol, msg=f"parameter {k}")


def _state(vector: torch.Tensor) -> AgentState:
    return AgentState.from_vector(vector, DIMS, C)


# ----------------------------------------------------------------------------- reference rule
@pytest.mark.parametrize("mixing", ["static", "dynamic"])
def test_reference_updates_every_agent_step_and_at_epoch_end(mixing):
    agent = Agent(DIMS, C, mixing=mixing, agent_step=3, seed=5)
    dynamic = mixing == "dynamic"
    initial = _params64(agent)
    batches = [(_vector(s), _raw_reward(100 + s)) for s in range(4)]

    assert agent.observe(*batches[0]) is False
    assert agent.observe(*batches[1]) is False
    _assert_params_close(agent, initial, atol=0)  # nothing learned before agent_step batches
    assert agent.version == 0 and len(agent.buffer) == 2

    assert agent.observe(*batches[2]) is True
    assert agent.version == 1 and len(agent.buffer) == 0
    after_first = _replay_reference(initial, batches[:3], dynamic)
    _assert_params_close(agent, after_first)
    # the three steps really happened one by one, in order: one averaged step or reversed order differ
    reversed_order = _replay_reference(initial, batches[:3][::-1], dynamic)
    assert max((reversed_order[k] - after_first[k]).abs().max().item() for k in after_first) > 1e-5

    assert agent.observe(*batches[3]) is False
    assert agent.end_epoch() is True  # epoch end flushes what is stored
    assert agent.version == 2 and len(agent.buffer) == 0
    _assert_params_close(agent, _replay_reference(after_first, batches[3:], dynamic))

    assert agent.end_epoch() is False  # nothing stored: no update, no version bump
    assert agent.version == 2
    if dynamic:  # the mixing thetas belong to the agent and are trained with it
        assert (agent.policy.theta_logit.detach().double() - 1.0).abs().max() > 1e-6
        assert (agent.policy.theta_feature.detach().double() - 1.0).abs().max() > 1e-6


def test_reference_optimiser_is_plain_sgd_lr_0_1():
    agent = Agent(DIMS, C, seed=0)
    assert isinstance(agent.optimizer, torch.optim.SGD)
    group = agent.optimizer.param_groups[0]
    assert group["lr"] == 0.1 and group["momentum"] == 0 and group["weight_decay"] == 0
    assert not group["nesterov"] and group["dampening"] == 0
    # two successive updates on the same batch: with momentum the second step would be larger
    batch = (_vector(1), _raw_reward(2))
    initial = _params64(agent)
    agent.observe(*batch)
    agent.end_epoch()
    agent.observe(*batch)
    agent.end_epoch()
    _assert_params_close(agent, _replay_reference(initial, [batch, batch], dynamic=False))


def test_observe_takes_the_raw_reward_and_the_agent_normalises_it():
    raw = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -2.2])  # r_hat = [1, .5971, 0, 0, 0, .4593]
    vector = _vector(8)
    agents = [Agent(DIMS, C, agent_step=1, seed=3) for _ in range(3)]
    initial = _params64(agents[0])
    agents[0].observe(vector, raw)
    agents[1].observe(vector, 25.0 * raw - 40.0)  # a positive affine change of the raw reward
    expected = _replay_reference(initial, [(vector, raw)], dynamic=False)
    _assert_params_close(agents[0], expected)
    _assert_params_close(agents[1], expected)  # normalisation happens inside: same update
    # feeding an already-normalised reward is normalised a second time: a different update
    already = torch.clamp((raw - raw.mean()) / raw.std(), 0, 1)
    torch.testing.assert_close(already.double(), _normalise(raw))
    torch.testing.assert_close(already, torch.tensor([1.0, 0.5971, 0.0, 0.0, 0.0, 0.4593]), atol=1e-4, rtol=0)
    agents[2].observe(vector, already)
    diff = max((agents[2].policy.state_dict()[k].double() - expected[k]).abs().max().item() for k in expected)
    assert diff > 1e-6


def test_buffer_stores_raw_reward_and_state():
    agent = Agent(DIMS, C, agent_step=10, seed=0)
    vector, raw = _vector(3), _raw_reward(4)
    agent.observe(vector, raw)
    torch.testing.assert_close(agent.buffer[0].reward, raw, rtol=0, atol=0)
    torch.testing.assert_close(agent.buffer[0].vector, vector, rtol=0, atol=0)
    raw.add_(100.0)  # the buffer holds a copy
    assert agent.buffer[0].reward.max() < 0


def test_seed_fixes_the_initial_policy_regardless_of_global_rng():
    torch.manual_seed(1)
    first = Agent(DIMS, C, seed=7)
    torch.manual_seed(12345)
    torch.rand(1000)
    before = torch.get_rng_state()
    second = Agent(DIMS, C, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is not consumed either
    for k, v in first.policy.state_dict().items():
        torch.testing.assert_close(second.policy.state_dict()[k], v, rtol=0, atol=0)
    other = Agent(DIMS, C, seed=8)
    assert not torch.equal(other.policy.stem.weight, first.policy.stem.weight)


def test_act_matches_hand_written_policy_and_needs_no_grad():
    agent = Agent(DIMS, C, seed=2)
    vector = _vector(9)
    w_logit, w_feature = agent.act(_state(vector))
    e_logit, e_feature = _mixed_weights(_params64(agent), vector, dynamic=False)
    torch.testing.assert_close(w_logit.double(), e_logit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_feature.double(), e_feature, rtol=1e-5, atol=1e-6)
    assert w_logit.grad_fn is None and w_feature.grad_fn is None


def test_state_dict_round_trip_reproduces_act_and_learning():
    source = Agent(DIMS, C, mixing="dynamic", agent_step=2, seed=11)
    source.observe(_vector(1), _raw_reward(2))
    source.observe(_vector(3), _raw_reward(4))  # one update
    source.observe(_vector(5), _raw_reward(6))  # one stored batch
    target = Agent(DIMS, C, mixing="dynamic", agent_step=2, seed=99)
    target.load_state_dict(source.state_dict())
    assert target.version == source.version == 1
    assert len(target.buffer) == 1
    state = _state(_vector(20))
    for a, b in zip(source.act(state), target.act(state)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # both continue identically from the restored buffer
    source.observe(_vector(7), _raw_reward(8))
    target.observe(_vector(7), _raw_reward(8))
    for k, v in source.policy.state_dict().items():
        torch.testing.assert_close(target.policy.state_dict()[k], v, rtol=0, atol=0)


def test_invalid_configuration_raises():
    with pytest.raises(ValueError):
        Agent(DIMS, C, rule="ppo")
    with pytest.raises(ValueError):
        Agent(DIMS, C, mixing="learned")
    with pytest.raises(ValueError):
        Agent(DIMS, C, agent_step=0)


def test_update_stays_finite_when_a_weight_underflows_to_zero():
    """A teacher that the network, the confidence and the logit gap all rule out gets wL == 0 in
    float32; the floored log of docs/method.md §4 makes its loss 100 * r, and the update must stay finite."""
    agent = Agent([1, 1], 1, agent_step=1, seed=0)
    with torch.no_grad():
        agent.policy.logit_head.bias.copy_(torch.tensor([-200.0, 0.0]))  # aL[:, 0] == 0
    # per teacher [cos, KL, CE, e, z]: teacher 0 has CE 50 (c = 0) and KL 0 vs 200 (gL = 0)
    vector = torch.tensor([[0.1, 0.0, 50.0, 1.0, 1.0, 0.2, 200.0, 0.0, 1.0, 1.0],
                           [0.1, 0.0, 50.0, 1.0, 1.0, 0.2, 200.0, 0.0, 1.0, 1.0]])
    w_logit, _ = agent.act(AgentState.from_vector(vector, [1, 1], 1))
    assert w_logit[0, 0].item() == 0.0  # the premise: an exact zero weight
    agent.observe(vector, torch.tensor([-1.0, -2.0]))
    for k, v in agent.policy.state_dict().items():
        assert torch.isfinite(v).all(), f"{k} became non-finite after the agent update"


# ----------------------------------------------------------------------------- reinforce rule
def _dirichlet_log_prob(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(alpha.sum(1)) - torch.lgamma(alpha).sum(1) + ((alpha - 1) * torch.log(x)).sum(1)


def _replay_reinforce(params: dict, vector, raw, acted_logit, acted_feature, concentration, lr=0.1) -> dict:
    """The documented family: w ~ Dir(concentration * M * w_mean), advantage (r - mean r) / std r,
    loss = -mean_i(A_i (log pi(wL_i) + log pi(wF_i)))."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    mean_logit, mean_feature = _mixed_weights(leaves, vector, dynamic=False)
    r = raw.double()
    advantage = (r - r.mean()) / r.std()
    log_prob = (_dirichlet_log_prob(acted_logit.double(), concentration * M * mean_logit)
                + _dirichlet_log_prob(acted_feature.double(), concentration * M * mean_feature))
    loss = -(advantage * log_prob).mean()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {k: (leaves[k] - lr * g).detach() for k, g in zip(leaves, grads)}


def test_reinforce_acts_on_the_simplex_and_is_stochastic():
    agent = Agent(DIMS, C, rule="reinforce", seed=0)
    state = _state(_vector(1, batch=16))
    torch.manual_seed(0)
    w_logit, w_feature = agent.act(state)
    for w in (w_logit, w_feature):
        assert w.shape == (16, M)
        torch.testing.assert_close(w.sum(1), torch.ones(16))
        assert (w > 0).all() and (w < 1).all()
    mean_logit, _ = _mixed_weights(_params64(agent), state.vector, dynamic=False)
    assert (w_logit.double() - mean_logit).abs().max() > 1e-3  # a draw, not the mean
    torch.manual_seed(0)
    again, _ = agent.act(state)
    torch.testing.assert_close(again, w_logit, rtol=0, atol=0)


def test_reinforce_requires_the_acted_weights():
    agent = Agent(DIMS, C, rule="reinforce", seed=0)
    with pytest.raises(ValueError):
        agent.observe(_vector(1), _raw_reward(2))


def test_reinforce_update_matches_hand_written_policy_gradient():
    agent = Agent(DIMS, C, rule="reinforce", agent_step=1, concentration=10.0, seed=4)
    vector, raw = _vector(11), _raw_reward(12)
    torch.manual_seed(3)
    acted_logit, acted_feature = agent.act(_state(vector))
    expected = _replay_reinforce(_params64(agent), vector, raw, acted_logit, acted_feature, 10.0)
    assert agent.observe(vector, raw, acted_logit, acted_feature) is True
    assert agent.version == 1 and not agent.buffer
    _assert_params_close(agent, expected, atol=1e-5)


def test_reinforce_raises_the_log_probability_of_a_high_advantage_action():
    """Same state on every row, different actions; the row with the best reward is the one whose
    log-probability (relative to and, for a small step, absolutely) must grow."""
    agent = Agent(DIMS, C, rule="reinforce", agent_step=1, lr=1e-3, concentration=10.0, seed=6)
    vector = _vector(13, batch=1).repeat(4, 1)
    torch.manual_seed(5)
    acted_logit, acted_feature = agent.act(_state(vector))
    raw = torch.tensor([-0.5, -3.0, -3.2, -2.9])  # row 0 is the better-than-average action

    def log_probs() -> torch.Tensor:
        mean_logit, mean_feature = _mixed_weights(_params64(agent), vector, dynamic=False)
        return (_dirichlet_log_prob(acted_logit.double(), 10.0 * M * mean_logit)
                + _dirichlet_log_prob(acted_feature.double(), 10.0 * M * mean_feature))

    before = log_probs()
    for _ in range(3):
        agent.observe(vector, raw, acted_logit, acted_feature)
    after = log_probs()
    assert after[0] > before[0]
    advantage = raw - raw.mean()
    # the advantage-weighted log-likelihood (the objective being ascended) went up
    assert (advantage.double() * after).sum() > (advantage.double() * before).sum()


# ----------------------------------------------------------------------------- validation and recovery


def _acted(agent: Agent, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return agent.act(_state(vector))


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _bad_batches(agent: Agent) -> dict:
    """(vector, reward, weight_logit, weight_feature) and the expected message, per way of being wrong."""
    vector, raw = _vector(1), _raw_reward(2)
    w_logit, w_feature = _acted(agent, vector)
    off_simplex = w_logit * 2
    return {
        "state of 3e38": ((_with(vector, (0, 0), 3e38), raw, w_logit, w_feature),
                          "states has values up to 3e+38 in magnitude; expected |x| <= 1e+06"),
        "state just over the bound": ((_with(vector, (2, 5), -1.01 * MAX_ABS_STATE), raw, w_logit, w_feature),
                                      "expected |x| <= 1e+06"),
        "NaN state": ((_with(vector, (1, 1), float("nan")), raw, w_logit, w_feature), "states has 1 non-finite"),
        "wrong state width": ((vector[:, :-1], raw, w_logit, w_feature), f"expected [B >= 1, {STATE_DIM}]"),
        "float64 states": ((vector.double(), raw, w_logit, w_feature), "expected torch.float32 on cpu"),
        "integer reward": ((vector, raw.long(), w_logit, w_feature), "expected a 1-d float32 or float64 tensor"),
        "float16 reward": ((vector, raw.half(), w_logit, w_feature), "reward is a 1-d torch.float16 tensor"),
        "reward length": ((vector, raw[:-1], w_logit, w_feature), f"expected [{B}] (one per state)"),
        "infinite reward": ((vector, _with(raw, 0, float("inf")), w_logit, w_feature), "reward has 1 non-finite"),
        "huge reward": ((vector, _with(raw, 0, 1e20), w_logit, w_feature), "expected |x| <= 1e+09"),
        "weights off the simplex": ((vector, raw, off_simplex, w_feature), "weight_logit has a row whose sum differs"),
        "negative weight": ((vector, raw, w_logit, _with(w_feature, (0, 0), -0.5)), "smallest entry of -0.5"),
        "weights of the wrong shape": ((vector, raw, w_logit[:, :1], w_feature), f"expected [{B}, {M}]"),
        "NaN weight": ((vector, raw, _with(w_logit, (0, 1), float("nan")), w_feature), "weight_logit has 1 non-finite"),
    }


@pytest.mark.parametrize("rule", ["reference", "reinforce"])
def test_observe_rejects_a_bad_batch_and_leaves_the_buffer_as_it_was(rule):
    agent = Agent(DIMS, C, rule=rule, agent_step=100, seed=0)
    vector = _vector(5)
    w_logit, w_feature = _acted(agent, vector)
    agent.observe(vector, _raw_reward(6), w_logit, w_feature)  # one good stored batch
    stored = list(agent.buffer)
    for case, (args, message) in _bad_batches(agent).items():
        with pytest.raises(InvalidExperience, match=re.escape(message)):
            agent.observe(*args)
        assert agent.buffer == stored and all(a is b for a, b in zip(agent.buffer, stored)), case
    assert agent.end_epoch() is True and agent.version == 1  # what was stored still trains


def test_the_buffer_holds_copies_of_the_acted_weights():
    agent = Agent(DIMS, C, rule="reinforce", agent_step=100, seed=0)
    vector = _vector(1)
    w_logit, w_feature = _acted(agent, vector)
    agent.observe(vector, _raw_reward(2), w_logit, w_feature)
    stored = agent.buffer[0].weight_logit.clone()
    w_logit.mul_(5)  # off the simplex now, but only the caller's tensor
    assert torch.equal(agent.buffer[0].weight_logit, stored)
    assert agent.end_epoch() is True


def test_the_reinforce_rule_refuses_missing_or_zero_weights():
    agent = Agent(DIMS, C, rule="reinforce", agent_step=100, seed=0)
    vector, raw = _vector(1), _raw_reward(2)
    w_logit, w_feature = _acted(agent, vector)
    with pytest.raises(InvalidExperience, match="the reinforce rule needs the weights that were acted; "
                                                "weight_feature missing"):
        agent.observe(vector, raw, w_logit, None)
    zero = torch.zeros_like(w_logit)
    zero[:, 0] = 1.0  # on the simplex, but log(0) is -inf under the Dirichlet
    with pytest.raises(InvalidExperience, match=r"expected every entry > 0"):
        agent.observe(vector, raw, zero, w_feature)
    assert agent.buffer == []
    Agent(DIMS, C, rule="reference", agent_step=100).observe(vector, raw, zero, zero)  # fine when unused


def test_values_at_the_bounds_are_accepted_and_train_finite():
    """The largest accepted states and rewards keep both rules' updates finite."""
    for rule in ("reference", "reinforce"):
        agent = Agent(DIMS, C, rule=rule, agent_step=100, seed=1)
        for seed in range(3):
            vector = MAX_ABS_STATE * torch.sign(_vector(seed))
            raw = torch.tensor([-1e9, 1e9, -5e8, 0.0, 1e9, -1e9])
            w_logit, w_feature = _acted(agent, vector)
            agent.observe(vector, raw, w_logit, w_feature)
            assert agent.end_epoch() is True
        assert all(torch.isfinite(p).all() for p in agent.policy.parameters()), rule


def test_an_update_that_goes_non_finite_is_rolled_back_and_the_agent_stays_usable():
    agent = Agent(DIMS, C, agent_step=2, seed=3)
    initial = _params64(agent)
    batches = [(_vector(s), _raw_reward(50 + s)) for s in range(3)]
    agent.optimizer.param_groups[0]["lr"] = math.inf  # any step now makes the parameters non-finite
    agent.observe(*batches[0])
    with pytest.raises(AgentUpdateError, match=r"stored batch 0 made policy parameter 'stem.weight' non-finite\); "
                                               r"the policy was restored to version 0 and the 2 stored batches"):
        agent.observe(*batches[1])
    _assert_params_close(agent, initial, atol=0)  # restored exactly
    assert agent.version == 0 and agent.buffer == [] and agent.end_epoch() is False
    agent.optimizer.param_groups[0]["lr"] = 0.1
    agent.observe(*batches[2])
    assert agent.end_epoch() is True and agent.version == 1
    _assert_params_close(agent, _replay_reference(initial, batches[2:], dynamic=False))
