"""AgentService over real gRPC on loopback, against a small but real softmax-policy backend and
against the library agent (which cannot be poisoned)."""
from __future__ import annotations

import logging
import math

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from mtkd.distill import Agent
from services._generated.mtkd.v1 import agent_pb2, agent_pb2_grpc, tensor_pb2
from services.agent.backend import AgentBackend
from services.agent.grpc_server import SERVICE_NAME, RemoteAgent, serve, stop
from services.convert import tensor_to_proto

STATE_DIM, M, MAX_BATCH = 12, 3, 32


class SoftmaxAgent:
    """A linear policy with two softmax heads over M teachers.

    Stores (states, reward) and makes one SGD step per stored batch on the
    reward-weighted -log w loss every ``update_every`` observations and at epoch end.
    """

    def __init__(self, state_dim: int = STATE_DIM, num_teachers: int = M, update_every: int = 2):
        torch.manual_seed(0)
        self.net = nn.Linear(state_dim, 2 * num_teachers)
        self.state_dim, self.num_teachers, self.update_every = state_dim, num_teachers, update_every
        self.version, self.stored, self.actions = 0, [], []
        self.fail = False

    def describe(self) -> dict:
        return dict(num_teachers=self.num_teachers, state_dim=self.state_dim, version=self.version,
                    rule="reference", mixing="static")

    def _weights(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit_head, feature_head = self.net(states).split(self.num_teachers, dim=1)
        return logit_head.softmax(dim=1), feature_head.softmax(dim=1)

    def act(self, states):
        if self.fail:
            raise RuntimeError("simulated agent failure")
        with torch.no_grad():
            weight_logit, weight_feature = self._weights(states)
        return weight_logit, weight_feature, self.version

    def observe(self, states, reward, weight_logit=None, weight_feature=None):
        self.actions.append((weight_logit, weight_feature))
        self.stored.append((states, reward))
        return self._update() if len(self.stored) >= self.update_every else (self.version, False)

    def end_epoch(self):
        return self._update() if self.stored else (self.version, False)

    def _update(self):
        for states, reward in self.stored:
            weight_logit, weight_feature = self._weights(states)
            loss = (reward[:, None] * -(weight_logit.log() + weight_feature.log())).mean()
            self.net.zero_grad()
            loss.backward()
            with torch.no_grad():  # plain SGD, lr 0.1 (torch.optim's first use costs seconds)
                for param in self.net.parameters():
                    param -= 0.1 * param.grad
        self.stored.clear()
        self.version += 1
        return self.version, True

    def policy(self):
        return self.version, self.net.state_dict()


def states(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, STATE_DIM, generator=torch.Generator().manual_seed(seed))


def reward(batch: int) -> torch.Tensor:
    return torch.rand(batch, generator=torch.Generator().manual_seed(batch))


@pytest.fixture()
def backend() -> SoftmaxAgent:
    return SoftmaxAgent()


@pytest.fixture()
def address(backend):
    server, port = serve(backend, max_batch=MAX_BATCH)
    yield f"127.0.0.1:{port}"
    stop(server, grace=None)


@pytest.fixture()
def agent(address):
    with RemoteAgent(address) as remote:
        yield remote


def test_describe_round_trip(agent, backend):
    info = agent.describe()
    assert {k: info[k] for k in backend.describe()} == backend.describe()
    assert info["max_batch"] == MAX_BATCH
    assert (info["max_abs_state"], info["max_abs_reward"]) == (1e6, 1e9)


def test_act_matches_the_backend(agent, backend):
    x = states(5)
    weight_logit, weight_feature, version = agent.act(x)
    want_logit, want_feature, want_version = backend.act(x)
    assert torch.equal(weight_logit, want_logit) and torch.equal(weight_feature, want_feature)
    assert version == want_version == 0 and weight_logit.shape == (5, M)


def test_observe_updates_and_publishes_a_new_policy(agent, backend):
    before = {k: v.clone() for k, v in backend.net.state_dict().items()}
    assert agent.observe(states(4), reward(4)) == (0, False)
    assert agent.observe(states(6, seed=1), reward(6)) == (1, True)
    assert agent.end_epoch() == (1, False)
    assert agent.observe(states(3, seed=2), reward(3)) == (1, False)
    assert agent.end_epoch() == (2, True)
    version, state_dict = agent.policy()
    assert version == 2 and agent.describe()["version"] == 2
    assert state_dict.keys() == before.keys()
    for key, value in backend.net.state_dict().items():
        assert torch.equal(state_dict[key], value) and not torch.equal(value, before[key])
    assert agent.act(states(2))[2] == 2


def test_observe_passes_the_actions_taken(agent, backend):
    x = states(4)
    weight_logit, weight_feature, _ = agent.act(x)
    agent.observe(x, reward(4), weight_logit=weight_logit, weight_feature=weight_feature)
    agent.observe(x, reward(4), weight_feature=weight_feature)
    (got_logit, got_feature), (none_logit, only_feature) = backend.actions
    assert torch.equal(got_logit, weight_logit) and torch.equal(got_feature, weight_feature)
    assert none_logit is None and torch.equal(only_feature, weight_feature)


def _observe_raw(**messages) -> agent_pb2.ObserveRequest:
    fields = {"states": tensor_to_proto(states(4)), "reward": tensor_to_proto(reward(4)), **messages}
    return agent_pb2.ObserveRequest(**fields)


def _observe(**tensors) -> agent_pb2.ObserveRequest:
    return _observe_raw(**{k: tensor_to_proto(v) for k, v in tensors.items()})


def _nan(t: torch.Tensor) -> torch.Tensor:
    t[0] = float("nan")
    return t


MALFORMED = {
    "act: wrong state_dim": (lambda: agent_pb2.ActRequest(states=tensor_to_proto(torch.zeros(4, STATE_DIM + 1))),
                             "states must have 12 features, got 13"),
    "act: float16 states": (lambda: agent_pb2.ActRequest(states=tensor_to_proto(states(4).half())),
                            "states has dtype FLOAT16, not allowed here; expected one of FLOAT32"),
    "act: batch over max": (lambda: agent_pb2.ActRequest(states=tensor_to_proto(states(MAX_BATCH + 1))),
                            "states must have batch between 1 and 32, got 33"),
    "act: missing states": (lambda: agent_pb2.ActRequest(), "states missing; expected a [1..32, 12] DTYPE_FLOAT32"),
    "act: states of 3e38": (lambda: agent_pb2.ActRequest(states=tensor_to_proto(torch.full((2, STATE_DIM), 3e38))),
                            "states has values up to 3e+38 in magnitude; expected |x| <= 1e+06 (AgentInfo.max_abs_state)"),
    "observe: states over the bound": (lambda: _observe(states=states(4) * 1e7),
                                       "expected |x| <= 1e+06 (AgentInfo.max_abs_state)"),
    "observe: missing reward": (lambda: agent_pb2.ObserveRequest(states=tensor_to_proto(states(4))),
                                "reward missing; expected a [4] DTYPE_FLOAT32 Tensor"),
    "observe: huge reward": (lambda: _observe(reward=torch.full((4,), -1e12)),
                             "reward has values up to 1e+12 in magnitude; expected |x| <= 1e+09"),
    "observe: reward length": (lambda: _observe(reward=reward(5)), "reward must have 4 batch, got 5"),
    "observe: NaN reward": (lambda: _observe(reward=_nan(reward(4))), "reward has 1 non-finite values"),
    "observe: weights for wrong M": (lambda: _observe(weight_logit=torch.full((4, M + 1), 0.25)),
                                     "weight_logit must have 3 teachers, got 4"),
    "observe: truncated weights": (lambda: _observe_raw(weight_feature=tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4, M], data=bytes(4 * M * 4 - 1))),
        "weight_feature has 47 bytes of data, expected 48"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_invalid_argument(address, backend, case):
    make, message = MALFORMED[case]
    with grpc.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        msg = make()
        call = stub.Act if isinstance(msg, agent_pb2.ActRequest) else stub.Observe
        with pytest.raises(grpc.RpcError) as err:
            call(msg, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        assert stub.Act(agent_pb2.ActRequest(states=tensor_to_proto(states(2))), timeout=5).policy_version == 0
    assert backend.stored == []  # nothing malformed reached the agent


def test_backend_error_is_internal(agent, backend):
    backend.fail = True
    with pytest.raises(grpc.RpcError) as err:
        agent.act(states(2))
    backend.fail = False
    assert err.value.code() == grpc.StatusCode.INTERNAL and "simulated agent failure" in err.value.details()
    assert agent.act(states(2))[0].shape == (2, M)


def test_token_and_health(backend):
    server, port = serve(backend, token="s3cret")
    address = f"127.0.0.1:{port}"
    try:
        with RemoteAgent(address) as anonymous, pytest.raises(grpc.RpcError) as err:
            anonymous.end_epoch()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RemoteAgent(address, token="s3cret") as agent:
            assert agent.end_epoch() == (0, False)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopped = stop(server, grace=2.0)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            assert stopped.wait(5)
    finally:
        stop(server, grace=None)


def test_a_taken_port_is_refused_not_shared(address, backend):
    port = int(address.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="Failed to bind"):
        serve(backend, port=port)


# ---------------------------------------------------------------------------
# The library agent behind the server: it cannot be poisoned
# ---------------------------------------------------------------------------

DIMS, C = [5, 3], 4  # two teachers: state_dim (5 + 4 + 3) + (3 + 4 + 3) = 22
REAL_DIM = sum(d + C + 3 for d in DIMS)


def real_states(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, REAL_DIM, generator=torch.Generator().manual_seed(seed))


def raw_reward(batch: int, seed: int) -> torch.Tensor:
    return -torch.rand(batch, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture()
def real_agent(request):
    """``(stub, backend)``: a served AgentBackend; ``request.param`` gives its Agent keyword arguments."""
    backend = AgentBackend(DIMS, C, seed=0, agent_step=100, **getattr(request, "param", {}))
    server, port = serve(backend)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield agent_pb2_grpc.AgentServiceStub(channel), backend
    stop(server, grace=None)


def _rejected(call, message: str, code=grpc.StatusCode.INVALID_ARGUMENT) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()


def _no_traceback_logged(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def _observe_msg(states_: torch.Tensor, reward_: torch.Tensor, weights=None) -> agent_pb2.ObserveRequest:
    msg = agent_pb2.ObserveRequest(states=tensor_to_proto(states_), reward=tensor_to_proto(reward_))
    if weights is not None:
        msg.weight_logit.CopyFrom(tensor_to_proto(weights[0]))
        msg.weight_feature.CopyFrom(tensor_to_proto(weights[1]))
    return msg


def _act(stub, states_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    reply = stub.Act(agent_pb2.ActRequest(states=tensor_to_proto(states_)), timeout=10)
    return tuple(torch.frombuffer(bytearray(getattr(reply, f).data), dtype=torch.float32).reshape(len(states_), -1)
                 for f in ("weight_logit", "weight_feature"))


def _same_policy(backend: AgentBackend, reference: Agent) -> bool:
    got, want = backend.agent.policy.state_dict(), reference.policy.state_dict()
    return all(torch.equal(got[k], want[k]) for k in want)


def test_extreme_states_are_refused_and_the_reference_agent_keeps_learning(real_agent, caplog):
    stub, backend = real_agent
    reference = Agent(DIMS, C, seed=0, agent_step=100)  # the same agent, fed only the good batch
    poison = real_states(4, 1)
    poison[0, 3] = 3e38  # finite, but beyond what the policy handles
    with caplog.at_level(logging.DEBUG):
        _rejected(lambda: stub.Observe(_observe_msg(poison, raw_reward(4, 2)), timeout=10),
                  "states has values up to 3e+38 in magnitude; expected |x| <= 1e+06")
        assert backend.agent.buffer == []  # nothing stored
        reply = stub.EndEpoch(agent_pb2.EndEpochRequest(), timeout=10)  # not broken: nothing to learn
        assert (reply.policy_version, reply.updated) == (0, False)
    _no_traceback_logged(caplog)
    good = (real_states(6, 3), raw_reward(6, 4))
    assert not stub.Observe(_observe_msg(*good), timeout=10).updated
    reply = stub.EndEpoch(agent_pb2.EndEpochRequest(), timeout=10)
    assert (reply.policy_version, reply.updated) == (1, True)
    reference.observe(*good)
    reference.end_epoch()
    assert _same_policy(backend, reference)


@pytest.mark.parametrize("real_agent", [{"rule": "reinforce"}], indirect=True)
def test_weights_off_the_simplex_are_refused_and_the_reinforce_agent_keeps_learning(real_agent, caplog):
    stub, backend = real_agent
    x, reward_ = real_states(4, 5), raw_reward(4, 6)
    torch.manual_seed(0)
    acted = _act(stub, x)
    assert torch.allclose(acted[0].sum(1), torch.ones(4))
    off = (acted[0] * 3, acted[1])
    with caplog.at_level(logging.DEBUG):
        _rejected(lambda: stub.Observe(_observe_msg(x, reward_, off), timeout=10),
                  "weight_logit has a row whose sum differs from 1 by 2")
        _rejected(lambda: stub.Observe(_observe_msg(x, reward_), timeout=10),  # reinforce needs the weights
                  "the reinforce rule needs the weights that were acted; weight_logit and weight_feature missing")
    _no_traceback_logged(caplog)
    assert backend.agent.buffer == []
    reference = Agent(DIMS, C, seed=0, agent_step=100, rule="reinforce")
    stub.Observe(_observe_msg(x, reward_, acted), timeout=10)
    reply = stub.EndEpoch(agent_pb2.EndEpochRequest(), timeout=10)
    assert (reply.policy_version, reply.updated) == (1, True)
    reference.observe(x, reward_, *acted)
    reference.end_epoch()
    assert _same_policy(backend, reference)


def test_act_never_answers_nan(real_agent, caplog):
    stub, backend = real_agent
    extreme = real_states(3, 7)
    extreme[:, ::2] = 3e38
    extreme[:, 1::2] = -3e38
    with caplog.at_level(logging.DEBUG):
        _rejected(lambda: _act(stub, extreme), "states has values up to 3e+38 in magnitude")
    _no_traceback_logged(caplog)
    x = real_states(3, 8)
    got = _act(stub, x)
    want = backend.agent.act(backend.agent.state_from_vector(x))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("real_agent", [{"lr": math.inf}], indirect=True)
def test_a_failed_update_is_failed_precondition_and_the_agent_recovers(real_agent, caplog):
    stub, backend = real_agent
    x = real_states(5, 9)
    before = _act(stub, x)
    stub.Observe(_observe_msg(x, raw_reward(5, 10)), timeout=10)
    with caplog.at_level(logging.DEBUG):
        _rejected(lambda: stub.EndEpoch(agent_pb2.EndEpochRequest(), timeout=10),
                  "the policy was restored to version 0 and the 1 stored batches were dropped",
                  grpc.StatusCode.FAILED_PRECONDITION)
    _no_traceback_logged(caplog)
    reply = stub.EndEpoch(agent_pb2.EndEpochRequest(), timeout=10)
    assert (reply.policy_version, reply.updated) == (0, False)
    after = _act(stub, x)  # the policy is the one before the failed update
    assert all(torch.equal(a, b) for a, b in zip(after, before))
