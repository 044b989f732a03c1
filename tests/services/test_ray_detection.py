"""Detection on a real local Ray equals detection in process: per-object ``mtkd_rl`` with the reference
agent in its own actor, teacher 0 a Ray actor and teacher 1 a detector served over gRPC by
``mtkd serve-teacher``, both looking their outputs up in a real ``redis-server`` (unaugmented batches:
the cache keys name every image exactly), stopped after epoch 1 and resumed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import needs_fashion, step_losses  # noqa: E402
from mtkd.config import ExperimentConfig, TeacherSpec  # noqa: E402
from mtkd.config_loader import load_config  # noqa: E402
from mtkd.experiment import RunDirectory  # noqa: E402
from mtkd.models import create_model  # noqa: E402
from mtkd.runner import run_inprocess  # noqa: E402
from mtkd.teachers import save_teacher  # noqa: E402
from services.cache import LocalRedisServer  # noqa: E402
from services.learner.driver import run_ray  # noqa: E402

pytestmark = [needs_fashion, pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]
REPO = Path(__file__).resolve().parents[2]
SIZE, TRAIN = 32, 32  # 32 x 32 canvases; 32 of them in batches of 8: 4 steps an epoch


@pytest.fixture(scope="module")
def det_teachers(tmp_path_factory) -> list[str]:
    """Two untrained detectors of different backbones (the engine's arithmetic does not need them trained)."""
    root = tmp_path_factory.mktemp("det-teachers")
    folders = []
    for i, name in enumerate(["centernet_resnet8", "centernet_vgg8"]):
        torch.manual_seed(i)
        model = create_model(name, num_classes=10, in_channels=1)
        meta = {"model": name, "num_classes": 10, "in_channels": 1, "input_shape": [1, SIZE, SIZE], "task": "detection",
                "dataset": {"name": "canvases_det", "mean": [0.2], "std": [0.25]}}
        save_teacher(root / name, model, meta)
        folders.append(str(root / name))
    return folders


def det_experiment(output_dir, teachers, overrides=()) -> ExperimentConfig:
    """Per-object ``mtkd_rl``, the reference rule updating every 2 steps (epoch 1 is the warm-up)."""
    config = load_config(ExperimentConfig, None, [
        f"output_dir={output_dir}", "student=centernet_resnet8", "data.name=canvases_det", "data.batch_size=8",
        "data.eval_batch_size=8", "data.augment=false", "optim.epochs=2", "optim.milestones=[1]",
        "distill.strategy=mtkd_rl", "distill.units=object", "distill.warmup_epochs=1", "distill.beta=0.5",
        "agent.rule=reference", "agent.agent_step=2", "runtime.runtime=inprocess", "runtime.device=cpu",
        "runtime.threads=1", "runtime.teacher_precision=fp32", *overrides])
    config.data.options = {"num_canvases": {"train": TRAIN, "test": 8}, "size": SIZE}
    config.teachers = [TeacherSpec(checkpoint=d) for d in teachers]
    return config


def start_server(args: list[str], port_file: Path) -> subprocess.Popen:
    """Start ``mtkd <args>`` (a gRPC server, one torch thread) on a free port, writing ``port_file``."""
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--port", "0", "--port-file",
                             str(port_file)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, text=True)


def served_address(server: subprocess.Popen, port_file: Path) -> str:
    """``127.0.0.1:<port>`` once ``server`` wrote ``port_file`` (the test fails if it does not within 60 s)."""
    deadline = time.time() + 60
    while not port_file.is_file() and time.time() < deadline and server.poll() is None:
        time.sleep(0.1)
    if not port_file.is_file():
        server.kill()
        pytest.fail(f"server did not start: {server.stderr.read()}")
    return f"127.0.0.1:{port_file.read_text()}"


def test_detection_on_ray_equals_inprocess_through_grpc_and_the_cache_and_resumes_exactly(tmp_path, det_teachers):
    threads = torch.get_num_threads()
    port_file = tmp_path / "port"
    server = start_server(["serve-teacher", det_teachers[1]], port_file)  # starts while the reference trains
    try:
        run_inprocess(det_experiment(tmp_path / "inprocess", det_teachers), progress=False)
        reference = step_losses(tmp_path / "inprocess")
        address = served_address(server, port_file)
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
        with LocalRedisServer(max_memory_mb=64) as redis:
            def experiment() -> ExperimentConfig:
                config = det_experiment(tmp_path / "ray_run", det_teachers[:1],
                                        ["runtime.runtime=ray", f"cache.url={redis.url}"])
                config.teachers.append(TeacherSpec(address=address))
                return config

            run_ray(experiment(), stop_after_epoch=1, progress=False)
            summary = run_ray(experiment(), resume=True, progress=False)
    finally:
        ray.shutdown()
        server.terminate()
        server.wait(timeout=30)
        torch.set_num_threads(threads)
    assert summary["epochs"] == 2 and 0.0 <= summary["test_map"] <= 1.0
    got = step_losses(tmp_path / "ray_run")
    assert len(got) == len(reference) == 2 * TRAIN // 8
    for step, (a, b) in enumerate(zip(got, reference), start=1):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: Ray {a} vs in process {b}"
    run = RunDirectory(tmp_path / "ray_run")
    metrics = run.read(run.metrics_path)
    assert metrics[-1]["agent/version"] >= 2  # the agent actor updated its policy (every 2 steps)
    # epoch 1 filled the cache (both teachers: the gRPC one through its actor), the resumed epoch 2 read it all
    assert [m["cache/hit_rate"] for m in metrics] == [0.0, 1.0]
