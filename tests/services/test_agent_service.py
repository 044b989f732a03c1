"""The real agent behind gRPC gives the in-process agent's numbers (the Ray proxy: test_agent_proxy.py)."""
from __future__ import annotations

import torch

from mtkd.distill import Agent, agent_state
from services.agent.backend import AgentBackend
from services.agent.grpc_server import RemoteAgent, serve, stop

DIMS, CLASSES, BATCH = [8, 16], 5, 12


def batches(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
        maps = [rand(BATCH, d, 2, 2) for d in DIMS]
        state = agent_state(maps, [rand(BATCH, d) for d in DIMS], rand(BATCH, CLASSES),
                            [rand(BATCH, CLASSES) for _ in DIMS], torch.randint(0, CLASSES, (BATCH,), generator=generator),
                            4.0)
        yield state, rand(BATCH)


def test_grpc_agent_learns_exactly_like_the_in_process_agent():
    reference = Agent(DIMS, CLASSES, agent_step=3, seed=5)
    server, port = serve(AgentBackend(DIMS, CLASSES, agent_step=3, seed=5))
    try:
        with RemoteAgent(f"127.0.0.1:{port}") as remote:
            assert remote.describe()["state_dim"] == reference.policy.state_dim
            for state, reward in batches(7):
                remote_logit, remote_feature, version = remote.act(state.vector)
                local_logit, local_feature = reference.act(state)
                assert version == reference.version
                torch.testing.assert_close(remote_logit, local_logit, rtol=0, atol=0)
                torch.testing.assert_close(remote_feature, local_feature, rtol=0, atol=0)
                remote_version, updated = remote.observe(state.vector, reward)[:2]
                assert updated == reference.observe(state.vector, reward)
                assert remote_version == reference.version
            remote_end = remote.end_epoch()[:2]
            assert remote_end == (reference.version + 1, reference.end_epoch())  # 1 batch left: an update
            version, policy = remote.policy()
            assert version == reference.version == 3
            for name, tensor in reference.policy.state_dict().items():
                assert torch.equal(policy[name], tensor), name
    finally:
        stop(server, grace=None)
