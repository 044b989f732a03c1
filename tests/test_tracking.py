"""Tracking (``tracking:`` in the config) in the in-process runtime: a real MLflow file store and real
TensorBoard event files, read back through the MLflow client and the event records."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtkd.config import ConfigError, ExperimentConfig, load_config
from mtkd.experiment import RunDirectory
from mtkd.runner import run_inprocess
from mtkd.tracking import (MLFLOW_DIR, RECORD_FILE, TENSORBOARD_DIR, TrackingError, allow_file_store, config_params,
                           read_scalars)

from conftest import needs_fashion, small_experiment

mlflow = pytest.importorskip("mlflow")
ON = ["tracking.mlflow.enabled=true", "tracking.tensorboard.enabled=true"]


def mlflow_runs(uri: str, experiment: str = "mtkd") -> list:
    """Every run of ``experiment`` in the store ``uri``, oldest first."""
    allow_file_store(uri)  # as a reader of a file store must (MLflow 3 keeps it in maintenance mode)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return sorted(client.search_runs([found.experiment_id]), key=lambda r: r.info.start_time)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every value of ``key`` logged to the run, by step."""
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def student_artifact(uri: str, run_id: str, into: Path) -> Path:
    """Download the run's ``student`` artefact; the folder it landed in."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="student", dst_path=str(into),
                                                    tracking_uri=uri))


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert sorted(left) == sorted(right) and left
    assert all(torch.equal(left[k], right[k]) for k in left)


# ------------------------------------------------------------------------------ the config section
def test_tracking_is_off_by_default_and_checked_at_load(tmp_path, monkeypatch):
    config = load_config(ExperimentConfig)
    assert not config.tracking.mlflow.enabled and not config.tracking.tensorboard.enabled
    assert config.tracking.mlflow.uri is None and config.tracking.mlflow.experiment == "mtkd"
    with pytest.raises(ConfigError, match=r"tracking.mlflow.uri: expected a tracking URI or folder, got ''"):
        load_config(ExperimentConfig, None, ["tracking.mlflow.uri=''"])
    with pytest.raises(ConfigError, match=r"unknown key 'tracking.mlflow.enable' \(valid keys: enabled, uri"):
        load_config(ExperimentConfig, None, ["tracking.mlflow.enable=true"])
    # a folder is made absolute once, at load, so that every process of a run (Ray workers) writes the same one
    monkeypatch.chdir(tmp_path)
    assert load_config(ExperimentConfig, None, ["tracking.mlflow.uri=store"]).tracking.mlflow.uri == str(
        tmp_path.resolve() / "store")
    for uri in ("http://127.0.0.1:5000", "file:///tmp/x", "databricks"):
        assert load_config(ExperimentConfig, None, [f"tracking.mlflow.uri={uri}"]).tracking.mlflow.uri == uri


@pytest.mark.parametrize("module, key", [("mlflow", "tracking.mlflow.enabled"),
                                         ("tensorboardX", "tracking.tensorboard.enabled")])
def test_tracking_without_its_library_is_refused_in_one_line_naming_the_extra(monkeypatch, module, key):
    monkeypatch.setitem(sys.modules, module, None)  # what Python sees when it is not installed
    with pytest.raises(ConfigError) as refused:
        load_config(ExperimentConfig, None, [f"{key}=true"])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{key}: ")
    assert "is not installed; pip install 'mtkd-rl[tracking]'" in message
    load_config(ExperimentConfig, None, [f"{key}=false"])  # off: nothing is needed


def test_the_config_becomes_dotted_params_without_secrets():
    config = load_config(ExperimentConfig, None, ["teachers=[{checkpoint: a}, {checkpoint: b, replicas: 2}]",
                                                  "cache.url=redis://user:secret@host:6379/0",
                                                  "tracking.mlflow.uri=http://u:p@server"])
    params = config_params(config)
    assert params["optim.lr"] == "0.05" and params["optim.milestones"] == "[150, 180, 210]"
    assert params["teachers.1.checkpoint"] == "b" and params["teachers.1.replicas"] == "2"
    assert params["cache.url"] == "redis://***@host:6379/0" and params["data.options"] == "{}"
    assert not [k for k in params if k.startswith("tracking")]
    assert "secret" not in "".join(params.values())


# ------------------------------------------------------------------------------ an in-process run
@needs_fashion
def test_an_inprocess_run_leaves_an_mlflow_run_and_event_files_and_resume_continues_them(tmp_path, teacher_dirs,
                                                                                       one_torch_thread):
    out = tmp_path / "run"
    config = small_experiment(out, teacher_dirs, [*ON, "optim.epochs=2", "runtime.threads=1", "data.train_subset=64",
                                                 "data.test_subset=64"])
    run_inprocess(config, stop_after_epoch=1, progress=False)
    uri = (out / MLFLOW_DIR).resolve().as_uri()
    [first] = mlflow_runs(uri)
    assert first.info.status == "FINISHED" and first.info.run_name == "run"
    summary = run_inprocess(config, resume=True, progress=False)  # continues the same MLflow run

    [run] = mlflow_runs(uri)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["mtkd.runtime"] == "inprocess"
    history = RunDirectory(out).read(RunDirectory(out).metrics_path)
    assert [m["epoch"] for m in history] == [1, 2]
    for key in ("test/acc", "loss/total", "train/acc", "lr"):
        assert metric_history(uri, run.info.run_id, key) == [(m["epoch"], pytest.approx(m[key])) for m in history]
    params = run.data.params
    assert params["student"] == "resnet8" and params["optim.epochs"] == "2" and params["data.batch_size"] == "32"
    assert params["teachers.0.checkpoint"] == teacher_dirs[0]
    student = student_artifact(uri, run.info.run_id, tmp_path / "download")
    assert_same_weights(student, Path(summary["student"]))
    assert (student / "meta.json").is_file()

    scalars = read_scalars(out / TENSORBOARD_DIR)
    assert scalars["test/acc"] == [(m["epoch"], pytest.approx(m["test/acc"])) for m in history]
    assert [step for step, _ in scalars["loss/total"]] == [1, 2]


@needs_fashion
def test_a_store_that_cannot_be_written_ends_the_run_in_one_line_before_it_trains(tmp_path, teacher_dirs):
    (tmp_path / "taken").write_text("a file, not a folder")
    config = small_experiment(tmp_path / "run", teacher_dirs, ["tracking.mlflow.enabled=true",
                                                               f"tracking.mlflow.uri={tmp_path / 'taken' / 'store'}"])
    with pytest.raises(TrackingError) as refused:
        run_inprocess(config, progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("tracking.mlflow: cannot open the MLflow store 'file://")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / RECORD_FILE).exists()


def test_a_search_cannot_vary_tracking():
    from services.tune import parse_tune  # the tune file's checks import no Ray

    with pytest.raises(ConfigError, match=r"'tracking.mlflow.enabled' cannot be searched: it is the same for every "
                                          r"trial of a search"):
        parse_tune({"experiment": {"teachers": [{"checkpoint": "t"}]},
                    "search_space": {"tracking.mlflow.enabled": {"choice": [True, False]}}})
