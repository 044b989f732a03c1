"""The Redis cache of teacher outputs in whole runs (a real ``redis-server`` on a free port): the same
losses with it, without it, and with Redis killed mid-run; a second run over the same data and seed
takes every teacher output from the cache; the same on Ray, where the teacher actors look up."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch

from mtkd.experiment import RunDirectory
from mtkd.runner import run_inprocess
from services.cache import LocalRedisServer, RedisStore

from conftest import needs_fashion, small_experiment

pytestmark = [needs_fashion, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]
# 15 steps per epoch, 2 epochs, mtkd_rl (every output field is used), fp32 teachers
OVERRIDES = ["data.train_subset=480", "data.batch_size=32", "distill.strategy=mtkd_rl", "agent.agent_step=10",
             "runtime.threads=1"]  # as every Ray worker: the Ray run's losses are then equal to 1e-6


def losses(run_dir) -> list[float]:
    run = RunDirectory(run_dir)
    return [s["loss"] for s in run.read(run.steps_path)]


def metrics(run_dir) -> list[dict]:
    run = RunDirectory(run_dir)
    return run.read(run.metrics_path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dirs):
    """Per-step losses of the run without a cache."""
    out = tmp_path_factory.mktemp("nocache")
    threads = torch.get_num_threads()
    try:
        run_inprocess(small_experiment(out, teacher_dirs, OVERRIDES), progress=False)
    finally:
        torch.set_num_threads(threads)
    return losses(out)


@pytest.fixture
def redis_server():
    with LocalRedisServer(max_memory_mb=256) as server:
        yield server


def test_cold_then_warm_cache_gives_the_same_losses_and_a_full_hit_rate(tmp_path, teacher_dirs, reference,
                                                                        redis_server):
    store = RedisStore(redis_server.url)
    for name in ("cold", "warm"):
        run_inprocess(small_experiment(tmp_path / name, teacher_dirs, [*OVERRIDES, f"cache.url={redis_server.url}"]),
                      progress=False, store=store)
        assert losses(tmp_path / name) == reference, name  # bit for bit: fp32 values stored as fp32
    cold = [m["cache/hit_rate"] for m in metrics(tmp_path / "cold")]
    # epoch 2 meets a sample again with the same crop and flip (1 in 5x5x2) now and then
    assert cold[0] == 0.0 and cold[1] < 0.1
    assert [m["cache/hit_rate"] for m in metrics(tmp_path / "warm")] == [1.0, 1.0]
    assert metrics(tmp_path / "warm")[-1]["cache/bytes_written"] == 0
    assert metrics(tmp_path / "cold")[-1]["cache/bytes"] > 480 * 2 * 4 * (64 * 7 * 7)  # two teachers' maps are in


def test_redis_killed_mid_run_warns_and_the_run_finishes_with_the_same_losses(tmp_path, teacher_dirs, reference,
                                                                            redis_server, caplog):
    steps = RunDirectory(tmp_path).steps_path
    killed = threading.Event()

    def kill_after_a_few_steps() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (steps.is_file() and len(steps.read_text().splitlines()) >= 5):
            time.sleep(0.02)
        os.kill(redis_server.pid, signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_after_a_few_steps, daemon=True)
    killer.start()
    run_inprocess(small_experiment(tmp_path, teacher_dirs, [*OVERRIDES, f"cache.url={redis_server.url}"]), progress=False,
                  store=RedisStore(redis_server.url, timeout_s=0.5))
    killer.join(timeout=5)
    assert killed.is_set(), "the run ended before Redis could be killed"
    assert losses(tmp_path) == reference
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage() or "failed to" in r.getMessage()]
    assert unreachable, "no warning about the lost cache"


def test_bf16_teachers_through_the_cache_give_the_uncached_numbers(tmp_path, teacher_dirs, redis_server):
    bf16 = [*OVERRIDES, "runtime.teacher_precision=bf16", "optim.epochs=1"]
    run_inprocess(small_experiment(tmp_path / "plain", teacher_dirs, bf16), progress=False)
    store = RedisStore(redis_server.url)
    for name in ("cold", "warm"):
        run_inprocess(small_experiment(tmp_path / name, teacher_dirs, [*bf16, f"cache.url={redis_server.url}"]), progress=False,
                      store=store)
        assert losses(tmp_path / name) == losses(tmp_path / "plain"), name  # stored as bf16: lossless
    assert metrics(tmp_path / "warm")[-1]["cache/hit_rate"] == 1.0
    # per sample, 2 bytes a value plus a 4-byte header: resnet8 (10 logits, 64 embedding, 64x7x7 map)
    # and vgg8 (10, 512, 512x3x3)
    per_sample = (10 + 64 + 64 * 7 * 7) * 2 + 4 + (10 + 512 + 512 * 3 * 3) * 2 + 4
    assert metrics(tmp_path / "cold")[-1]["cache/bytes_written"] == 480 * per_sample


@pytest.mark.ray
def test_on_ray_the_teacher_actors_use_the_cache(tmp_path, teacher_dirs, reference, redis_server):
    ray = pytest.importorskip("ray")
    from services.learner.driver import run_ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        for name in ("cold", "warm"):
            config = small_experiment(tmp_path / name, teacher_dirs,
                                      [*OVERRIDES, "runtime.runtime=ray", f"cache.url={redis_server.url}"])
            run_ray(config, progress=False)
    finally:
        ray.shutdown()
    assert [m["cache/hit_rate"] for m in metrics(tmp_path / "warm")] == [1.0, 1.0]
    for name in ("cold", "warm"):
        got = losses(tmp_path / name)
        assert len(got) == len(reference) == 30
        assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, reference)), name
