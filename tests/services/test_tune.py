"""``mtkd tune``: checks of the tune file (no Ray), then real searches on a real local Ray with the
session's real teachers: four trials with ASHA over one teacher pool and one Redis cache, and a
search killed with SIGKILL and resumed."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mtkd.checkpoint import CheckpointError
from mtkd.config import ConfigError, ExperimentConfig, load_config
from mtkd.errors import USER_EXIT, RunExistsError, exit_code
from mtkd.experiment import load_checkpoint
from services.cli import main
from services.tune import load_saved_search, load_tune, parse_tune
from services.tune.driver import run_tune

from conftest import needs_fashion, process_alive, process_tree

REPO = Path(__file__).resolve().parents[2]
# ~4 steps per epoch (128 samples, batches of 32), fp32 teachers on the CPU
TINY = {"student": "resnet8", "data": {"train_subset": 128, "test_subset": 128, "batch_size": 32, "crop_padding": 2},
        "optim": {"epochs": 2, "milestones": [1]}, "agent": {"rule": "reference", "agent_step": 3},
        "runtime": {"device": "cpu", "teacher_precision": "fp32"}}


def tune_file(tmp_path: Path, teacher_dirs, search_space: dict, tune: dict, experiment: dict | None = None) -> Path:
    experiment = json.loads(json.dumps(experiment or TINY))
    experiment["teachers"] = [{"checkpoint": d} for d in teacher_dirs]
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"experiment": experiment, "search_space": search_space,
                                    "tune": {"output_dir": str(tmp_path / "search"), **tune}}))
    return path


# ------------------------------------------------------------------------- the tune file (no Ray)
def spec_of(space: dict, tune: dict | None = None, **experiment):
    return parse_tune({"experiment": {**TINY, "teachers": [{"checkpoint": "t"}], **experiment},
                       "search_space": space, "tune": tune or {}})


def test_a_tune_file_loads_with_dotted_or_nested_keys_and_an_experiment_file(tmp_path):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({**TINY, "teachers": [{"checkpoint": "teachers/a"}]}))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({
        "experiment": "exp.yaml",
        "search_space": {"distill.temperature": {"uniform": [2, 6]}, "agent": {"mixing": {"grid": ["static", "dynamic"]},
                                                                             "agent_step": {"randint": [2, 5]}}}}))
    spec = load_tune(tmp_path / "tune.yaml", ["tune.num_samples=3", "experiment.optim.epochs=4",
                                              "search_space.distill.beta={loguniform: [0.5, 20]}"])
    assert sorted(spec.search) == ["agent.agent_step", "agent.mixing", "distill.beta", "distill.temperature"]
    assert spec.search["agent.agent_step"].candidates() == [2, 5]
    assert spec.settings.num_samples == 3 and spec.base.optim.epochs == 4 and spec.max_epochs == 4
    # teacher paths are made absolute (against the current folder, as mtkd distill reads them)
    assert spec.base.teachers[0].checkpoint == str(Path("teachers/a").resolve())


@pytest.mark.parametrize("space, tune, message", [
    ({"teachers.0.replicas": {"choice": [1, 2]}}, {}, "'teachers.0.replicas' cannot be searched: trials share one "
                                                      "teacher pool"),
    ({"runtime.teacher_precision": {"choice": ["fp32", "bf16"]}}, {}, "trials share one teacher pool"),
    ({"cache.value_dtype": {"choice": ["auto", "float16"]}}, {}, "trials share one cache"),
    ({"data.train_subset": {"choice": [64, 128]}}, {}, "changes the images the shared teachers see"),
    ({"distill.temprature": {"uniform": [1, 2]}}, {}, r"unknown key 'distill.temprature' \(valid keys of distill: "
                                                      "strategy, temperature"),
    ({"distill": {"choice": [1]}}, {}, "'distill' is a section"),
    ({"distill.temperature": 4.0}, {}, "expected one sampler"),
    ({"distill.temperature": {"uniform": [6, 2]}}, {}, "expected finite lo < hi"),
    ({"distill.beta": {"loguniform": [0, 2]}}, {}, "expected 0 < lo < hi"),
    ({"agent.agent_step": {"uniform": [1, 5]}}, {}, "samples real numbers but agent.agent_step is a int field"),
    ({"distill.strategy": {"choice": ["aver", "mtkd-rl"]}}, {}, r"search_space.distill.strategy='mtkd-rl': "
                                                                "distill.strategy: unknown strategy 'mtkd-rl'; did "
                                                                "you mean 'mtkd_rl'"),
    ({"optim.epochs": {"choice": [0, 2]}}, {}, r"search_space.optim.epochs=0: optim.epochs: a trial trains at least "
                                               "one epoch"),
    ({"agent.mixing": {"grid": ["static", "dinamic"]}}, {}, "agent.mixing: expected one of static, dynamic"),
    ({"optim.epochs": {"choice": [2, "three"]}}, {}, "optim.epochs: expected int, got 'three'"),
    ({"distill.beta": {"uniform": [1, 2]}}, {"grace_period": 3}, "tune.grace_period=3 exceeds the most epochs"),
    ({"distill.beta": {"uniform": [1, 2]}}, {"metric": "test/accuracy"}, "tune.metric: unknown metric"),
    ({"distill.beta": {"uniform": [1, 2]}}, {"num_trials": 2}, r"unknown key 'tune.num_trials'"),
])
def test_a_search_that_cannot_run_is_refused_with_one_clear_line(space, tune, message):
    with pytest.raises(ConfigError, match=message):
        spec_of(space, tune)


def test_a_search_needs_one_learner_and_a_pool():
    with pytest.raises(ConfigError, match="runtime.num_learners: a trial trains in one process; expected 1, got 2"):
        spec_of({"distill.beta": {"uniform": [1, 2]}}, runtime={"num_learners": 2})
    with pytest.raises(ConfigError, match="experiment.teachers is empty"):
        spec_of({"distill.beta": {"uniform": [1, 2]}}, teachers=[])


def test_the_command_line_reports_errors_in_one_line_and_refuses_a_resume_without_a_search(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": {"teachers": [{"checkpoint": "t"}]},
                                   "search_space": {"cache.url": {"choice": [None, "local"]}}}))
    assert main(["tune", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mtkd: error: search_space: 'cache.url' cannot be searched")
    assert main(["tune", "--resume", str(tmp_path)]) == 2
    assert "holds no search to resume" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="holds no search to resume"):
        load_saved_search(tmp_path)


def test_a_fresh_search_refuses_a_folder_that_holds_one(tmp_path):
    spec = spec_of({"distill.beta": {"uniform": [1, 2]}}, {"output_dir": str(tmp_path)})
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "tuner.pkl").write_bytes(b"")
    with pytest.raises(RunExistsError, match="already holds a search; pass --resume") as refused:
        run_tune(spec, progress=False)  # refused before Ray or any actor starts
    assert isinstance(refused.value, FileExistsError) and exit_code(refused.value) == USER_EXIT


def test_a_trial_takes_a_checkpoint_on_disk_only_when_it_is_newer_than_tunes(tmp_path):
    import torch

    from mtkd.experiment import save_checkpoint
    from services.tune.trial import newer_checkpoint

    trial = tmp_path / "trial_x"
    for index, epoch in enumerate((1, 2)):
        save_checkpoint(trial / f"checkpoint_00000{index}", {"module": {"w": torch.full((1,), float(epoch))},
                                                             "strategy": {}}, {"epoch": epoch})
    cut_short = trial / "checkpoint_000002"  # killed while Tune copied it: its metadata, no weights
    cut_short.mkdir()
    (cut_short / "meta.json").write_text(json.dumps({"epoch": 3}))
    state, meta, folder = newer_checkpoint(trial, known_epoch=1)  # Tune's state knows epoch 1 only
    assert meta["epoch"] == 2 and folder.name == "checkpoint_000001" and state["module"]["w"].item() == 2.0
    assert newer_checkpoint(trial, known_epoch=2) is None  # Tune's checkpoint is the newest: use it
    assert newer_checkpoint(tmp_path / "elsewhere", known_epoch=0) is None  # storage the trial cannot list


# ---------------------------------------------------------------------------- real searches on Ray
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from services.cache import LocalRedisServer

    with LocalRedisServer(max_memory_mb=256) as server:
        yield server.url


class ActorWatch:
    """Polls the cluster's named teacher actors (and each one's process id) while a search runs."""

    def __init__(self, ray):
        self.ray, self.pids, self.stop = ray, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.is_set():
            for entry in self.ray.util.list_named_actors(all_namespaces=True):
                if not entry["name"].startswith("mtkd-teacher-"):
                    continue
                try:
                    actor = self.ray.get_actor(entry["name"], namespace=entry["namespace"])
                    pid = self.ray.get(actor.stats.remote(), timeout=30)["pid"]
                except Exception:  # noqa: BLE001 - stopped at the end of the search
                    continue
                self.pids.setdefault(entry["name"], set()).add(pid)
            self.stop.wait(0.3)

    def __enter__(self) -> "ActorWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def results(search_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (search_dir / "results.jsonl").read_text().splitlines()]


def epoch_results(trial_path: str) -> list[dict]:
    """What Tune recorded for a trial, one dict per reported epoch."""
    return [json.loads(line) for line in (Path(trial_path) / "result.json").read_text().splitlines() if line.strip()]


@needs_fashion
@pytest.mark.ray
@pytest.mark.slow
def test_a_search_of_four_trials_shares_one_teacher_pool_and_one_cache(tmp_path, teacher_dirs, redis_url, local_ray,
                                                                       capsys):
    path = tune_file(tmp_path, teacher_dirs,
                     {"distill.strategy": {"choice": ["aver", "mtkd_rl"]}, "distill.temperature": {"uniform": [2, 6]},
                      "agent.mixing": {"grid": ["static", "dynamic"]}},
                     {"num_samples": 2, "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 2})
    tracking = importlib.util.find_spec("mlflow") is not None  # the `tracking` extra, which `make test` installs
    spec = load_tune(path, [f"experiment.cache.url={redis_url}", *([
        "experiment.tracking.mlflow.enabled=true", "experiment.tracking.tensorboard.enabled=true"] if tracking else [])])
    with ActorWatch(local_ray) as watch:
        summary = run_tune(spec, progress=False)
    out = capsys.readouterr().out
    search_dir = tmp_path / "search"
    rows = results(search_dir)

    if tracking:  # Tune's MLflow and TensorBoard callbacks: one MLflow run per trial, every reported epoch
        from mtkd.tracking import MLFLOW_DIR, read_scalars
        from test_tracking import metric_history, mlflow_runs

        uri = (search_dir / MLFLOW_DIR).resolve().as_uri()
        runs = mlflow_runs(uri)  # the default experiment, "mtkd"
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
        assert sorted(float(r.data.params["distill.temperature"]) for r in runs) == sorted(
            row["params"]["distill.temperature"] for row in rows)
        assert sorted(len(metric_history(uri, r.info.run_id, "test/acc")) for r in runs) == sorted(
            row["epochs_run"] for row in rows)
        for row in rows:
            assert len(read_scalars(row["path"])["ray/tune/test/acc"]) == row["epochs_run"]

    # four trials, each trained (all its epochs, or until ASHA stopped it)
    assert summary["trials"] == len(rows) == 4 and summary["error"] == summary["pending"] == 0
    assert summary["done"] + summary["stopped"] == 4
    assert all(1 <= row["epochs_run"] <= 2 and row["step"] == 4 * row["epochs_run"] for row in rows)
    assert sorted(row["params"]["agent.mixing"] for row in rows) == ["dynamic", "dynamic", "static", "static"]

    # the table: a header naming the sampled keys, one line per trial, the best one marked
    lines = out.splitlines()
    assert lines[0].split() == ["trial", *spec.search, "epochs", "test/acc", "final", "test/acc", "best", "status"]
    assert sorted(spec.search) == ["agent.mixing", "distill.strategy", "distill.temperature"]
    table = {line.split()[0].lstrip("*"): line for line in lines[2:6]}
    assert sorted(table) == sorted(row["trial"] for row in rows)
    assert table[summary["best_trial"]].startswith("*")
    for row in rows:
        assert f"{row['epochs_run']}/2" in table[row["trial"]] and row["status"] in table[row["trial"]]

    # best_config.yaml is the best trial's whole experiment, loadable by mtkd distill --config
    best = load_config(ExperimentConfig, summary["best_config"])
    assert best.distill.strategy == summary["best_params"]["distill.strategy"]
    assert best.distill.temperature == pytest.approx(summary["best_params"]["distill.temperature"])
    assert best.agent.mixing == summary["best_params"]["agent.mixing"]
    assert [t.checkpoint for t in best.teachers] == teacher_dirs and best.optim.epochs == 2
    best_row = next(row for row in rows if row["trial"] == summary["best_trial"])
    assert best_row["final"] == max(row["final"] for row in rows) == summary["best_value"]

    # each teacher actor was started once for the whole search and served every trial's steps
    teachers = summary["teachers"]
    assert [t["teacher"] for t in teachers] == ["resnet8", "vgg8"]
    assert set(watch.pids) == {t["actor"] for t in teachers}  # no other teacher actor ever existed
    for t in teachers:
        assert watch.pids[t["actor"]] == {t["pid"]} and t["pid_at_start"] == t["pid"]
        assert t["calls"] == sum(row["step"] for row in rows)
    deadline = time.time() + 30  # stopped at the end (ray.kill is asynchronous)
    while [a for a in local_ray.util.list_named_actors() if a.startswith("mtkd-teacher-")] and time.time() < deadline:
        time.sleep(0.2)
    assert not [a for a in local_ray.util.list_named_actors() if a.startswith("mtkd-teacher-")]

    # ... and one cache: the two trials started after the first two ended find all of epoch 1 in it
    later = sorted(rows, key=lambda row: row["trial"])[2:]
    assert [epoch_results(row["path"])[0]["cache/hit_rate"] for row in later] == [1.0, 1.0]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a command and everything it started (its private Ray: GCS, raylet, workers), and wait
    until they are gone, so that nothing writes into the search after the kill."""
    tree = process_tree(process.pid)
    for pid in tree:  # the command first: the interruption; then what it left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)
    deadline = time.time() + 60
    while any(process_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in tree), "processes of the killed search are still running"


def checkpointed_trials(tune_dir: Path) -> dict[str, dict]:
    """Per trial folder, the meta of its newest checkpoint that loads."""
    found = {}
    for folder in sorted(tune_dir.glob("trial_*")):
        for checkpoint in sorted(folder.glob("checkpoint_*"), reverse=True):
            try:
                found[folder.name.removeprefix("trial_")] = load_checkpoint(checkpoint)[1]
                break
            except (CheckpointError, OSError, ValueError, KeyError, RuntimeError):
                continue  # being written
    return found


def tune_known_epochs(tune_dir: Path) -> dict[str, int]:
    """Per trial, the epoch of the checkpoint that Tune's saved state holds, i.e. what
    ``tune.get_checkpoint()`` hands the trial on resume (0: none)."""
    from ray import tune

    known = {}
    for trial in tune.ExperimentAnalysis(str(tune_dir)).trials:
        checkpoint = trial.checkpoint
        meta = json.loads((Path(checkpoint.path) / "meta.json").read_text()) if checkpoint else {"epoch": 0}
        known[trial.trial_id] = meta["epoch"]
    return known


@needs_fashion
@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_search_resumes_and_completes_without_redoing_finished_trials(tmp_path, teacher_dirs, local_ray,
                                                                               capsys):
    path = tune_file(tmp_path, teacher_dirs, {"distill.temperature": {"uniform": [2, 6]},
                                              "distill.beta": {"loguniform": [1, 10]}},
                     {"num_samples": 4, "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1})
    search_dir, log = tmp_path / "search", tmp_path / "tune.log"
    # Tune saves its state (which trial holds which checkpoint) now and then, after the checkpoint
    # folders are written. An hour between saves (Tune still saves once a trial wrote num_to_keep=2
    # checkpoints since the last save) makes the kill below land in that gap every time: the second
    # trial's checkpoint is on disk, Tune's state does not know it.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    with open(log, "w") as stream:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "tune", "--config", str(path), "--quiet",
                                    "--address", "local"], cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    try:
        # one trial at a time: kill once the second trial has reported (the first one has then finished)
        deadline = time.time() + 240
        while len(checkpointed_trials(search_dir / "search")) < 2:
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"the search {'ended' if process.poll() is not None else 'took too long'} before its "
                            f"second trial reported: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    finally:
        kill_tree(process)
    before = checkpointed_trials(search_dir / "search")
    assert len(before) >= 2 and not (search_dir / "results.jsonl").exists()
    finished = [trial for trial, meta in before.items() if meta["epoch"] == 2]
    assert finished, f"no trial had finished at the kill: {before}"
    # the gap: tune.get_checkpoint() alone would hand a trial an older checkpoint (or none) than its folder holds
    known = tune_known_epochs(search_dir / "search")
    behind = {trial: (known.get(trial, 0), meta["epoch"]) for trial, meta in before.items()
              if meta["epoch"] > known.get(trial, 0)}
    assert behind, f"Tune's saved state knew every checkpoint at the kill: {known}"

    assert main(["tune", "--resume", str(search_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("\n{") + 1:])
    rows = {row["trial"]: row for row in results(search_dir)}
    assert summary["trials"] == len(rows) == 4 and summary["error"] == summary["pending"] == 0
    assert summary["done"] + summary["stopped"] == 4
    assert sum(line.split()[:1] != [] and line.split()[0].lstrip("*") in rows
               for line in out.splitlines()) == 4  # the table's rows
    for trial, meta in before.items():  # nothing was lost: every trial went on from where it was
        assert rows[trial]["step"] >= meta["global_step"]
    for trial in finished:
        assert rows[trial]["step"] == before[trial]["global_step"] and rows[trial]["epochs_run"] == 2
    # The resumed search's (fresh) teacher actors served exactly the steps trained after the kill:
    # nothing a trial had checkpointed was trained again, and a finished trial not at all.
    after_kill = sum(row["step"] - before.get(trial, {}).get("global_step", 0) for trial, row in rows.items())
    assert after_kill > 0
    for teacher in summary["teachers"]:
        assert teacher["calls"] == after_kill and teacher["pid_at_start"] == teacher["pid"]
    load_config(ExperimentConfig, summary["best_config"])
