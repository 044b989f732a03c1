"""The Ray runtime as a cluster service: ``ray job submit`` against a ``ray start --head`` cluster
with no address given to mtkd, and a three-node cluster (``ray.cluster_utils.Cluster``) where the
teachers run on the node that has the teacher resource and the learner on another, with the
in-process engine's losses."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from mtkd.config import to_dict  # noqa: E402
from mtkd.experiment import RunDirectory  # noqa: E402
from services.cache import free_port  # noqa: E402

from conftest import EQUIVALENCE, needs_fashion, small_experiment, step_losses  # noqa: E402

pytestmark = [needs_fashion, pytest.mark.ray, pytest.mark.slow]
VENV_BIN = Path(sys.executable).parent


def kill_processes_under(folder: str) -> None:
    """SIGKILL every process whose command line mentions ``folder`` (what a test's cluster started)."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(folder in part for part in process.info["cmdline"] or ()):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def job_server_up(dashboard: str) -> bool:
    """Whether the job server answers what ``ray job list`` asks (the API version, then the job list),
    asked over plain HTTP: a ``ray job list`` process per probe costs seconds of CPU that the starting
    head node needs."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        for path in ("/api/version", "/api/jobs/"):
            with opener.open(dashboard + path, timeout=10) as reply:
                if reply.status != 200:
                    return False
        return True
    except (OSError, http.client.HTTPException):  # not listening yet, or the job module not loaded
        return False


@pytest.fixture
def head_node():
    """``ray start --head --block`` on loopback with a dashboard (job server), in its own temp folder;
    yields ``(dashboard address, env)`` and stops everything it started."""
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="mtkdray", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = f"http://127.0.0.1:{free_port()}"
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM the head stops at once instead of draining for
    # up to 30 s (a wait for Serve replicas to migrate; there are none here, and the teardown kills all)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=4",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if job_server_up(dashboard):
                break
            assert head.poll() is None, head.stdout.read()
            time.sleep(0.2)
        else:
            pytest.fail("the head node's job server did not come up")
        yield dashboard, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        kill_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_mtkd_distill_on_the_cluster_without_an_address(tmp_path, teacher_dirs, head_node):
    dashboard, env = head_node
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    config = small_experiment(tmp_path / "run", teacher_dirs, ["runtime.runtime=ray", "runtime.address=null"])
    (job_dir / "experiment.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config)))))
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(job_dir), "--",
         "mtkd", "distill", "--config", "experiment.yaml"],
        env=env, capture_output=True, text=True, timeout=900)
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs
    assert "succeeded" in logs.lower(), logs
    assert "Traceback" not in logs and "RuntimeEnvSetupError" not in logs, logs
    summary = json.loads(logs[logs.index("{\n"):logs.rindex("}") + 1])
    assert summary["runtime"] == "ray" and summary["epochs"] == 2
    run = RunDirectory(tmp_path / "run")
    assert [m["epoch"] for m in run.read(run.metrics_path)] == [1, 2]
    assert (tmp_path / "run" / "student" / "weights.safetensors").is_file()
    assert run.latest_checkpoint().name == "epoch_0002"


def test_three_node_cluster_places_teachers_and_learner_by_resources(tmp_path, teacher_dirs, inprocess_reference):
    from ray.cluster_utils import Cluster

    from services.learner.driver import run_ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    teacher_node = cluster.add_node(num_cpus=2, resources={"teacher_node": 2})
    learner_node = cluster.add_node(num_cpus=2, resources={"learner_node": 1})
    placements: dict[str, str] = {}
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        config = small_experiment(tmp_path, teacher_dirs, [*EQUIVALENCE, "runtime.runtime=ray",
                                                            "runtime.learner_resources={learner_node: 1}"])
        for spec in config.teachers:
            spec.resources = {"teacher_node": 1}

        def record_teacher_nodes() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and len(placements) < len(config.teachers):
                for name in ray.util.list_named_actors():
                    if name.startswith("mtkd-teacher-") and name not in placements:
                        try:
                            placements[name] = ray.get(ray.get_actor(name).stats.remote(), timeout=60)["node_id"]
                        except Exception:  # noqa: BLE001 - the actor may still be loading, or gone
                            pass
                time.sleep(0.2)

        watcher = threading.Thread(target=record_teacher_nodes, daemon=True)
        watcher.start()
        summary = run_ray(config, progress=False)
        watcher.join(timeout=10)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(placements) == 2 and set(placements.values()) == {teacher_node.node_id}
    assert {m["learner/node_id"] for m in summary["history"]} == {learner_node.node_id}
    got = step_losses(tmp_path)
    assert len(got) == len(inprocess_reference) == 60
    for step, (a, b) in enumerate(zip(got, inprocess_reference), start=1):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: {a} vs {b}"
