"""The learner's proxy of the agent actor, on a real local Ray: it sends experience without
waiting, yet acts with exactly the in-process agent's policy at every step; it carries the agent's
state through a checkpoint; and it notices an agent that restarted without its state."""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from mtkd.distill import Agent, agent_state  # noqa: E402
from services.agent.actor import start_agent_actor  # noqa: E402
from services.agent.proxy import AgentOutOfSync, AgentProxy  # noqa: E402

pytestmark = pytest.mark.ray
DIMS, CLASSES, BATCH = [8, 16], 5, 12


def batches(count: int, seed: int = 0):
    """``count`` random (agent state, raw reward) pairs of a two-teacher pool."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
        maps = [rand(BATCH, d, 2, 2) for d in DIMS]
        state = agent_state(maps, [rand(BATCH, d) for d in DIMS], rand(BATCH, CLASSES),
                            [rand(BATCH, CLASSES) for _ in DIMS], torch.randint(0, CLASSES, (BATCH,), generator=generator),
                            4.0)
        yield state, rand(BATCH)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize("rule", ["reference", "reinforce"])
def test_proxy_acts_with_the_in_process_agents_policy_at_every_step(rule):
    kwargs = dict(agent_step=3, seed=1, mixing="dynamic", rule=rule)
    actor = start_agent_actor(DIMS, CLASSES, **kwargs)
    proxy = AgentProxy(actor)
    reference = Agent(DIMS, CLASSES, **kwargs)
    torch.manual_seed(0)
    for step, (state, reward) in enumerate(batches(8, seed=3), start=1):
        with torch.random.fork_rng():
            acted = proxy.act(state)
        for a, b in zip(acted, reference.act(state)):
            assert torch.equal(a, b), f"step {step}"
        weights = acted if rule == "reinforce" else (None, None)
        assert proxy.observe(state.vector, reward, *weights) == reference.observe(state.vector, reward, *weights)
        assert proxy.version == reference.version == step // 3
    assert proxy.end_epoch() == reference.end_epoch() is True  # 2 batches left after the update at step 6
    assert proxy.version == reference.version == 3
    assert proxy.last_update == pytest.approx(reference.last_update)
    for name, tensor in reference.policy.state_dict().items():
        assert torch.equal(proxy.policy.state_dict()[name], tensor), name
    assert proxy.end_epoch() is False  # nothing stored: no update, no wait
    ray.kill(actor)


def test_proxy_state_round_trip_and_a_restarted_agent_is_detected():
    actor = start_agent_actor(DIMS, CLASSES, agent_step=2, seed=4)
    proxy = AgentProxy(actor)
    for state, reward in batches(3, seed=5):  # one update, one batch left in the buffer
        proxy.observe(state.vector, reward)
    saved = proxy.state_dict()
    assert saved["version"] == 1 and len(saved["buffer"]) == 1

    other = AgentProxy(start_agent_actor(DIMS, CLASSES, agent_step=2, seed=9))
    other.load_state_dict(saved)
    state, reward = next(batches(1, seed=8))
    assert all(torch.equal(a, b) for a, b in zip(other.act(state), proxy.act(state)))
    assert other.observe(state.vector, reward) is True  # the restored buffer held one batch: the update is due

    ray.kill(actor, no_restart=False)  # Ray restarts it, without its state
    with pytest.raises((AgentOutOfSync, ray.exceptions.RayActorError)):
        for state, reward in batches(4, seed=6):
            proxy.observe(state.vector, reward)
