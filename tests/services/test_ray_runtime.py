"""The distributed runtime on a real local Ray: equivalence with the in-process engine, a teacher
actor killed mid-run, a teacher served over gRPC by another process, two learner workers.

Starting a Ray Train run costs far more than its few dozen steps, so tests share runs: one run
folder is taken through a fresh run, an overwrite, refused resumes and a resume (``one_folder``),
and one run, with a teacher served over gRPC, meets both a killed teacher actor and a killed
learner (``faulted_run``); each test asserts on its part."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from mtkd.checkpoint import CheckpointError  # noqa: E402
from mtkd.config import TeacherSpec  # noqa: E402
from mtkd.engine import NonFiniteLossError  # noqa: E402
from mtkd.experiment import RunDirectory  # noqa: E402
from services.learner.driver import run_ray  # noqa: E402

from conftest import EQUIVALENCE, needs_fashion, seg_experiment, small_experiment, step_losses  # noqa: E402

pytestmark = [needs_fashion, pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# tracking where the library is installed (the `tracking` extra, which `make test` installs)
TRACKING = (["tracking.mlflow.enabled=true", "tracking.tensorboard.enabled=true"]
            if importlib.util.find_spec("mlflow") else [])


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def start_server(args: list[str], port_file: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``mtkd <args>`` (a gRPC server) on a free port; return once it wrote ``port_file``."""
    server = subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--port", "0", "--port-file",
                               str(port_file)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not port_file.is_file() and time.time() < deadline and server.poll() is None:
        time.sleep(0.1)
    if not port_file.is_file():
        server.kill()
        pytest.fail(f"server did not start: {server.stderr.read()}")
    return server


def assert_same_losses(a: list[float], b: list[float], at_least: int = 50) -> None:
    assert len(a) == len(b) >= at_least
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= 1e-6 * abs(x), f"step {step}: {x} vs {y}"


def raised(call) -> BaseException | None:
    """The exception ``call()`` raised, or None."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the tests assert on its type and message
        return error
    return None


@pytest.fixture(scope="module")
def one_folder(tmp_path_factory, teacher_dirs) -> dict:
    """One run folder taken, in turn, through the paths of the three tests below (each Ray Train start
    costs seconds, the training itself far less); what each step did is recorded for them:

    1. ``fresh``: a full run into a new folder;
    2. ``overwritten``: the finished run discarded (``overwrite``) and trained again, stopped after epoch 1;
    3. ``swapped``: a resume with the teacher pool reversed (refused), then ``unflagged``: a run into the
       folder without ``--resume`` or ``--overwrite`` (refused);
    4. ``resumed``: the stopped run resumed to the end.

    With tracking on (MLflow and TensorBoard from rank 0), its own test reads them back.
    """
    folder = tmp_path_factory.mktemp("one_folder")
    run = RunDirectory(folder)
    overrides = [*EQUIVALENCE, "runtime.runtime=ray", *TRACKING]

    def experiment(teachers=teacher_dirs):
        return small_experiment(folder, teachers, overrides)

    flow = {"fresh": run_ray(experiment(), progress=False)}
    flow["fresh_losses"] = step_losses(folder)
    flow["fresh_checkpoint"] = (folder / "checkpoints" / "epoch_0002" / "meta.json").is_file()
    flow["fresh_ray_copy"] = any((folder / "ray").rglob("weights.safetensors"))  # the Ray Train checkpoint copy

    flow["overwritten"] = run_ray(experiment(), overwrite=True, stop_after_epoch=1, progress=False)
    flow["overwritten_steps"] = run.read(run.steps_path)
    flow["overwritten_kept_epoch_2"] = (folder / "checkpoints" / "epoch_0002").exists()

    flow["swapped"] = raised(lambda: run_ray(experiment(list(reversed(teacher_dirs))), resume=True, progress=False))
    flow["unflagged"] = raised(lambda: run_ray(experiment(), progress=False))

    flow["resumed"] = run_ray(experiment(), resume=True, progress=False)
    flow["resumed_steps"] = run.read(run.steps_path)
    flow["folder"] = folder
    return flow


def test_ray_runtime_equals_inprocess_engine(one_folder, inprocess_reference):
    assert one_folder["fresh"]["epochs"] == 2
    assert_same_losses(one_folder["fresh_losses"], inprocess_reference)
    assert one_folder["fresh_checkpoint"]
    assert one_folder["fresh_ray_copy"]  # the Ray Train checkpoint copy


def test_ray_run_resumed_from_its_checkpoint_continues_exactly(one_folder, inprocess_reference):
    assert len(one_folder["overwritten_steps"]) == 30  # stopped after epoch 1
    assert one_folder["resumed"]["epochs"] == 2
    assert_same_losses([s["loss"] for s in one_folder["resumed_steps"]], inprocess_reference)


def test_ray_resume_refuses_another_pool_and_overwrite_starts_afresh(one_folder, inprocess_reference):
    assert isinstance(one_folder["swapped"], CheckpointError), repr(one_folder["swapped"])
    assert "teacher pool differs at teacher 0" in str(one_folder["swapped"])
    assert isinstance(one_folder["unflagged"], FileExistsError), repr(one_folder["unflagged"])
    assert "--resume" in str(one_folder["unflagged"])
    # overwrite: the finished run's checkpoints discarded, trained again from step 1, nothing reloaded
    overwritten = one_folder["overwritten"]
    assert [m["epoch"] for m in overwritten["history"]] == [1]
    assert [s["step"] for s in one_folder["overwritten_steps"]] == list(range(1, 31))
    assert_same_losses([s["loss"] for s in one_folder["overwritten_steps"]], inprocess_reference[:30], at_least=30)
    assert not one_folder["overwritten_kept_epoch_2"]  # the discarded run's last checkpoint is gone


def test_a_ray_run_leaves_an_mlflow_run_from_rank_0_with_every_epoch_and_the_student(one_folder, tmp_path):
    """Ray's own integration (``setup_mlflow`` on rank 0) into a file store in the run folder: the
    stopped and resumed run is one MLflow run (the same Ray Train run)."""
    mlflow = pytest.importorskip("mlflow")  # noqa: F841 - the tracking extra
    from mtkd.tracking import MLFLOW_DIR, RUN_TAG, TENSORBOARD_DIR, read_scalars
    from test_tracking import assert_same_weights, metric_history, mlflow_runs, student_artifact

    out, summary = one_folder["folder"], one_folder["resumed"]
    uri = (out / MLFLOW_DIR).resolve().as_uri()
    runs = mlflow_runs(uri)  # the fresh run's (history, kept by --overwrite) and the overwritten one's
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    [run] = [r for r in runs if r.data.tags[RUN_TAG] == Path(summary["ray_run"]).name]  # stopped, then resumed
    assert run.data.tags["mtkd.runtime"] == "ray"
    history = RunDirectory(out).read(RunDirectory(out).metrics_path)
    assert [m["epoch"] for m in history] == [1, 2]
    for key in ("test/acc", "loss/total", "learner/world_size"):
        assert metric_history(uri, run.info.run_id, key) == [(m["epoch"], pytest.approx(m[key])) for m in history]
    assert run.data.params["runtime.runtime"] == "ray" and run.data.params["optim.epochs"] == "2"
    # the student rank 0 exported from its final state is the one the driver wrote into the run folder
    assert_same_weights(student_artifact(uri, run.info.run_id, tmp_path / "download"), Path(summary["student"]))
    assert read_scalars(out / TENSORBOARD_DIR)["test/acc"] == [(m["epoch"], pytest.approx(m["test/acc"]))
                                                              for m in history]


def train_workers() -> list:
    """The Ray Train worker processes of this session's Ray (its raylet and workers run below this
    process), never those of another Ray on the machine."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in process.cmdline()):
                found.append(process)
        except psutil.Error:  # exited meanwhile
            pass
    return found


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory, teacher_dirs) -> dict:
    """One run of the :data:`EQUIVALENCE` experiment (``max_failures=1``) for the three tests below:
    teacher 0 is a Ray actor, teacher 1 is served over gRPC (with a token) by an ``mtkd serve-teacher``
    process. Two faults: teacher 0's actor is killed once 10 steps are written (Ray restarts it), and
    the learner worker process is SIGKILLed once 40 steps are written (mid epoch 2; Ray Train restarts
    it from the epoch-1 checkpoint). One learner restart is allowed, and the learner kill takes it:
    had the teacher kill also failed the learner, the run would fail."""
    folder = tmp_path_factory.mktemp("faulted")
    port_file, token_file = folder / "port", folder / "token"
    token_file.write_text("s3cret-token\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = start_server(["serve-teacher", teacher_dirs[1], "--token-file", str(token_file)], port_file, env)
    config = small_experiment(folder / "run", teacher_dirs[:1],
                              [*EQUIVALENCE, "runtime.runtime=ray", "runtime.max_failures=1"])
    config.teachers.append(TeacherSpec(address=f"127.0.0.1:{port_file.read_text()}", token_file=str(token_file)))
    steps_path = RunDirectory(folder / "run").steps_path
    killed_teachers, killed_learners = [], []

    def written() -> int:
        return len(steps_path.read_text().splitlines()) if steps_path.is_file() else 0

    def kill_teacher_when_running() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if written() >= 10:
                name = next(n for n in ray.util.list_named_actors() if n.startswith("mtkd-teacher-0-"))
                actor = ray.get_actor(name)
                before = ray.get(actor.stats.remote(), timeout=60)
                ray.kill(actor, no_restart=False)
                deadline_restart = time.time() + 120
                while time.time() < deadline_restart:  # calls queued before the kill may still be answered
                    after = ray.get(actor.stats.remote(), timeout=120)
                    if after["pid"] != before["pid"]:
                        break
                    time.sleep(0.05)
                killed_teachers.append((before, after))
                return
            time.sleep(0.05)

    def kill_the_learner_in_epoch_two() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if written() >= 40:
                workers = train_workers()
                for worker in workers:
                    worker.kill()
                killed_learners.extend(w.pid for w in workers)
                return
            time.sleep(0.05)

    killers = [threading.Thread(target=kill_teacher_when_running, daemon=True),
               threading.Thread(target=kill_the_learner_in_epoch_two, daemon=True)]
    for killer in killers:
        killer.start()
    try:
        summary = run_ray(config, progress=False)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for killer in killers:
        killer.join(timeout=5)
    return {"summary": summary, "steps": RunDirectory(folder / "run").read(steps_path),
            "killed_teachers": killed_teachers, "killed_learners": killed_learners}


def test_killed_teacher_actor_restarts_and_no_batch_is_lost_or_repeated(faulted_run):
    assert faulted_run["killed_teachers"], "the run ended before a teacher could be killed"
    assert faulted_run["summary"]["epochs"] == 2
    steps = faulted_run["steps"]
    for epoch in (1, 2):
        assert sorted(s["batch"] for s in steps if s["epoch"] == epoch) == list(range(30))
    assert [s["step"] for s in steps] == list(range(1, 61))
    before, after = faulted_run["killed_teachers"][0]
    assert before["calls"] >= 10 and after["pid"] != before["pid"]  # a new process serves the teacher


def test_teacher_served_over_grpc_gives_the_same_numbers(faulted_run, inprocess_reference):
    # teacher 1 (vgg8) came from the gRPC server, with its token: the engine's numbers, step for step
    assert faulted_run["summary"]["epochs"] == 2
    assert_same_losses([s["loss"] for s in faulted_run["steps"]], inprocess_reference)


def test_two_ddp_learners_keep_identical_parameters_after_every_epoch(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path, teacher_dirs, ["data.train_subset=256", "optim.epochs=2", "runtime.runtime=ray",
                                                       "runtime.num_learners=2", "agent.agent_step=2"])
    summary = run_ray(config, progress=False)
    assert summary["epochs"] == 2 and summary["test_acc"] > 0
    for metrics in summary["history"]:  # every epoch: both ranks' parameter digests, all-gathered
        digests = metrics["learner/param_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], metrics["epoch"]
    assert summary["history"][0]["learner/param_digests"] != summary["history"][1]["learner/param_digests"]
    steps = RunDirectory(tmp_path).read(RunDirectory(tmp_path).steps_path)
    assert [s["batch"] for s in steps] == [0, 2, 4, 6] * 2  # rank 0's shard of 8 global batches, per epoch
    # each step sends both ranks' batches: with agent_step=2 the agent updates after every one of the 8
    # steps, so the last step acts with the policy of version 7 on both ranks
    assert summary["history"][-1]["agent/version"] == 7
    last = summary["history"][-1]
    assert last["weights/logit/resnet8"] + last["weights/logit/vgg8"] == pytest.approx(1.0, abs=1e-5)


def test_a_learner_worker_killed_mid_epoch_restarts_from_its_checkpoint_and_finishes(faulted_run,
                                                                                  inprocess_reference):
    assert len(faulted_run["killed_learners"]) == 1, "no learner worker was found to kill"
    assert [m["epoch"] for m in faulted_run["summary"]["history"]] == [1, 2]  # each epoch once
    steps = faulted_run["steps"]
    assert [s["step"] for s in steps] == list(range(1, 61))  # the lost part of epoch 2 was redone, once
    # restarted from the epoch-1 checkpoint (student, optimiser, agent, RNG): the same numbers
    assert_same_losses([s["loss"] for s in steps], inprocess_reference)


def test_a_nan_loss_on_ray_surfaces_as_the_library_error(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path, teacher_dirs, ["runtime.runtime=ray", "optim.lr=1e30", "optim.momentum=0",
                                                  "optim.nesterov=false"])
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step \d+: loss part"):
        run_ray(config, progress=False)
    assert not list(ray.util.list_named_actors())  # the teacher actors were stopped


def test_a_run_whose_actors_cannot_be_placed_is_refused(tmp_path, teacher_dirs):
    config = small_experiment(tmp_path, teacher_dirs, ["runtime.runtime=ray", "runtime.teacher_num_cpus=2"])
    with pytest.raises(ValueError, match=r"ask for 5 CPU in all but the Ray cluster has 4"):
        run_ray(config, progress=False)


def test_a_teacher_that_fails_to_load_in_its_actor_ends_the_run_with_its_error(tmp_path, teacher_dirs):
    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    for item in Path(teacher_dirs[0]).iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, another digest
    config = small_experiment(tmp_path / "run", [str(broken), *teacher_dirs[1:]], ["runtime.runtime=ray"])
    with pytest.raises(ValueError, match=r"^a teacher actor failed to start: CheckpointError: .*digest") as info:
        run_ray(config, progress=False)
    assert "\n" not in str(info.value)  # one line, the actor's traceback left out
    assert not list(ray.util.list_named_actors())  # the other teachers' actors were stopped


def test_meta_rule_on_ray_equals_inprocess_and_resumes_exactly(tmp_path, teacher_dirs, single_thread):
    """The meta rule lives in the learner (no agent actor): Ray and the engine give the same per-step
    losses over its updates, also across a resume (the pending step is in the checkpoint)."""
    from mtkd.runner import run_inprocess

    overrides = [*EQUIVALENCE, "agent.rule=meta", "distill.warmup_epochs=0", "agent.meta_lr=10"]
    run_inprocess(small_experiment(tmp_path / "inprocess", teacher_dirs, overrides), progress=False)
    reference = step_losses(tmp_path / "inprocess")
    ray_run = tmp_path / "ray_run"
    run_ray(small_experiment(ray_run, teacher_dirs, [*overrides, "runtime.runtime=ray"]), stop_after_epoch=1,
            progress=False)
    run_ray(small_experiment(ray_run, teacher_dirs, [*overrides, "runtime.runtime=ray"]), resume=True, progress=False)
    assert_same_losses(step_losses(ray_run), reference)
    last = RunDirectory(ray_run).read(RunDirectory(ray_run).metrics_path)[-1]
    weights = [v for k, v in last.items() if k.startswith("weights/logit/")]
    assert max(abs(w - 1 / len(weights)) for w in weights) > 1e-3  # the agent moved the weights off aver


def test_segmentation_on_ray_equals_inprocess_and_resumes_exactly(tmp_path, seg_teachers, single_thread):
    """Per-region ``mtkd_rl`` with the reference agent (in its own actor, acting on the dense state
    per cell), teacher 0 a Ray actor and teacher 1 served over gRPC by ``mtkd serve-teacher``: the
    per-step losses equal the in-process engine's over the agent's updates, also across a resume."""
    from mtkd.runner import run_inprocess

    overrides = ["distill.strategy=mtkd_rl", "agent.rule=reference", "distill.region_grid=2", "agent.agent_step=3",
                 "runtime.teacher_precision=fp32"]
    run_inprocess(seg_experiment(tmp_path / "inprocess", seg_teachers, overrides, num_train=64), progress=False)
    reference = step_losses(tmp_path / "inprocess")
    port_file = tmp_path / "port"
    server = start_server(["serve-teacher", seg_teachers[1]], port_file, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        def experiment():
            config = seg_experiment(tmp_path / "ray_run", seg_teachers[:1], [*overrides, "runtime.runtime=ray"],
                                    num_train=64)
            config.teachers.append(TeacherSpec(address=f"127.0.0.1:{port_file.read_text()}"))
            return config

        run_ray(experiment(), stop_after_epoch=1, progress=False)
        summary = run_ray(experiment(), resume=True, progress=False)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert summary["epochs"] == 2 and 0.0 <= summary["test_miou"] <= 1.0
    assert_same_losses(step_losses(tmp_path / "ray_run"), reference, at_least=16)
    last = RunDirectory(tmp_path / "ray_run").read(RunDirectory(tmp_path / "ray_run").metrics_path)[-1]
    assert last["agent/version"] >= 2  # the agent actor updated its policy (every 3 steps from epoch 2 on)
