"""AgentService over real gRPC on loopback, against a small but real softmax-policy backend."""
from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from services._generated.mtkd.v1 import agent_pb2, agent_pb2_grpc, tensor_pb2
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
    "act: missing states": (lambda: agent_pb2.ActRequest(), "states has unknown dtype UNSPECIFIED"),
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
