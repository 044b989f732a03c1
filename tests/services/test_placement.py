"""Teacher placement and restarts on a real local Ray: a teacher pool that cannot be placed ends the
run in one line (exit 2) holding nothing, and a teacher that crashes on every call ends the run
with one line naming it and the batch once its bounded restarts are used up."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from ray.util.placement_group import placement_group_table  # noqa: E402

from mtkd.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from mtkd.errors import USER_EXIT, exit_code  # noqa: E402
from services.learner.driver import RayUnavailableError, run_ray  # noqa: E402
from services.teacher_server.pool import TeacherFailedError  # noqa: E402

from conftest import needs_fashion, small_experiment  # noqa: E402


@pytest.mark.parametrize("override, message", [
    ("runtime.teacher_max_restarts=-1", "runtime.teacher_max_restarts: must be >= 0, got -1"),
    ("runtime.teacher_max_task_retries=-1", "runtime.teacher_max_task_retries: must be >= 0, got -1"),
    ("runtime.placement_timeout_s=0", "runtime.placement_timeout_s: must be > 0, got 0"),
    ("runtime.metrics_export_port=70000", "runtime.metrics_export_port: must be in [1, 65536), got 70000"),
])
def test_restart_placement_and_metrics_settings_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ExperimentConfig, None, ["teachers=[{checkpoint: a}]", override])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def teacher_groups() -> dict[str, str]:
    """State (``CREATED``, ``PENDING``, ``REMOVED``...) of every teacher placement group this Ray has seen."""
    return {info["name"]: info["state"] for info in placement_group_table().values()
            if info["name"].startswith("mtkd-teachers-")}


def held_nothing(before: dict[str, str]) -> bool:
    """No teacher actor alive and every teacher placement group made since ``before`` removed."""
    new = {name: state for name, state in teacher_groups().items() if name not in before}
    alive = [n for n in ray.util.list_named_actors() if n.startswith("mtkd-teacher-")]
    return not alive and all(state == "REMOVED" for state in new.values())


@ray.remote
class Holder:
    """Holds the CPUs it was started with (another job's work on the cluster)."""

    def ping(self) -> bool:
        return True


@needs_fashion
@pytest.mark.ray
def test_a_teacher_pool_that_cannot_be_placed_exits_2_in_one_line_holding_nothing(local_ray, tmp_path, teacher_dirs):
    before = teacher_groups()
    # 1. a replica asks for more CPUs than the whole Ray has: refused before anything is asked of Ray
    config = small_experiment(tmp_path / "big", teacher_dirs, ["runtime.runtime=ray"])
    config.teachers[0].num_cpus = 8
    with pytest.raises(RayUnavailableError) as refused:
        run_ray(config, progress=False)
    assert exit_code(refused.value) == USER_EXIT and "\n" not in str(refused.value)
    assert "teacher" in str(refused.value) and "CPU: 8" in str(refused.value)
    assert teacher_groups() == before and held_nothing(before)

    # 2. the cluster is big enough but busy: 3 of its 4 CPUs held elsewhere, the two replicas ask for 1
    # each (all or none), so the group waits out runtime.placement_timeout_s and the run ends naming
    # what the bundles ask for against what is free
    holder = Holder.options(num_cpus=3).remote()
    ray.get(holder.ping.remote(), timeout=60)
    try:
        config = small_experiment(tmp_path / "busy", teacher_dirs, [
            "runtime.runtime=ray", "runtime.teacher_num_cpus=1", "runtime.placement_timeout_s=2"])
        with pytest.raises(RayUnavailableError) as timed_out:
            run_ray(config, progress=False)
    finally:
        ray.kill(holder)
    message = str(timed_out.value)
    assert exit_code(timed_out.value) == USER_EXIT and "\n" not in message, message
    assert message.startswith("the teacher replicas were not placed within 2 s: their placement group (2 bundle(s)) "
                              "asks for CPU 2 and the Ray cluster has CPU 1 of 4 free (missing CPU 1)"), message
    assert len(teacher_groups()) == len(before) + 1  # the group was asked for...
    assert held_nothing(before)  # ...and removed, with no teacher actor started


def teacher_calls_killer(killed: list[int], stop: threading.Event) -> None:
    """Crash the teacher on every call: SIGKILL each process of this session's Ray found serving
    ``TeacherActor.infer`` (Ray titles a worker process with the call it runs), as an out-of-memory
    kill or a segfault on a batch would. Worker processes run below this process; their titles are
    read every few milliseconds (a call on the test's batch takes far longer)."""
    candidates: list[int] = []
    listed = 0.0
    while not stop.is_set():
        if time.monotonic() - listed > 0.2:
            candidates = [p.pid for p in psutil.Process().children(recursive=True)]
            listed = time.monotonic()
        for pid in candidates:
            try:
                title = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::TeacherActor.infer") and pid not in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # ended meanwhile
                    continue
                killed.append(pid)
        time.sleep(0.003)


@needs_fashion
@pytest.mark.ray
@pytest.mark.slow  # 18 s on 2 cores (62 s under heavy load): mostly the Ray Train start before the first call
def test_a_teacher_that_crashes_on_every_call_ends_the_run_within_its_bounded_restarts(local_ray, tmp_path,
                                                                                     teacher_dirs):
    before = teacher_groups()
    # one teacher, restarted at most once, each call sent again at most once; batches of 256 (a call
    # lasts long enough to be seen), 4 of them
    config = small_experiment(tmp_path, teacher_dirs[:1], [
        "runtime.runtime=ray", "runtime.teacher_max_restarts=1", "runtime.teacher_max_task_retries=1",
        "data.train_subset=512", "data.batch_size=256"])
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=teacher_calls_killer, args=(killed, stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(TeacherFailedError) as failed:
            run_ray(config, progress=False)
    finally:
        stop.set()
        killer.join(timeout=5)
    message = str(failed.value)
    assert exit_code(failed.value) == USER_EXIT and "\n" not in message, message
    assert re.match(r"^teacher 'resnet8' \(replica 0\) died on batch \d of the epoch \(samples \d+, \d+, \d+, \d+ "
                    r"and 252 more\) and Ray gave up on it", message), message
    assert "runtime.teacher_max_restarts" in message
    assert len(killed) == 2  # the first incarnation and its one restart: no third
    assert held_nothing(before)
