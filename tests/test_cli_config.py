"""Config loading, the command line, and the library's independence from Ray and gRPC."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtkd.config import ConfigError, ExperimentConfig, TeacherTrainConfig, load_config, save_config

from conftest import needs_fashion

REPO = Path(__file__).resolve().parents[1]


def mtkd_cli(*args: str, module: str = "mtkd.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_overrides_types_and_unknown_keys(tmp_path):
    config = load_config(ExperimentConfig, None, ["optim.epochs=3", "optim.lr=1", "data.train_subset=100",
                                                  "teachers=[{checkpoint: a, replicas: 2}]"])
    assert config.optim.epochs == 3 and config.optim.lr == 1.0 and config.teachers[0].replicas == 2
    with pytest.raises(ConfigError, match=r"unknown key 'optim.epoch' \(valid keys: epochs, lr"):
        load_config(ExperimentConfig, None, ["optim.epoch=3"])
    with pytest.raises(ConfigError, match="optim.epochs: expected int, got 'abc'"):
        load_config(ExperimentConfig, None, ["optim.epochs=abc"])
    assert load_config(ExperimentConfig, None, ["optim.weight_decay=5e-4"]).optim.weight_decay == 5e-4
    with pytest.raises(ConfigError, match="distill.temperature: expected a number, got 'hot'"):
        load_config(ExperimentConfig, None, ["distill.temperature=hot"])
    with pytest.raises(ConfigError, match="runtime.teacher_num_cpus: expected a number, got True"):
        load_config(ExperimentConfig, None, ["runtime.teacher_num_cpus=true"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(ExperimentConfig, None, ["optim.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ExperimentConfig, tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    config = load_config(ExperimentConfig, None, ["seed=7", "teachers=[{checkpoint: t}]", "agent.mixing=dynamic"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(ExperimentConfig, tmp_path / "c.yaml") == config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(path):
    if path.name.startswith("demo"):
        from services.demo import DemoConfig  # the demo's own schema
        import yaml
        from mtkd.config import from_dict

        from_dict(DemoConfig, yaml.safe_load(path.read_text()))
    elif path.name.startswith("tune-"):
        from services.tune import load_tune  # the tune file's own schema

        load_tune(path)
    elif path.name.startswith("teacher-"):
        load_config(TeacherTrainConfig, path)
    else:
        load_config(ExperimentConfig, path)


def test_library_imports_without_ray_and_grpc():
    code = ("import sys\n"
            "for name in ('ray', 'grpc', 'grpc_tools', 'grpc_health', 'google.protobuf', 'redis'):\n"
            "    sys.modules[name] = None\n"
            "import mtkd, mtkd.cli, mtkd.engine, mtkd.runner, mtkd.teacher_training, mtkd.distill, mtkd.models, "
            "mtkd.data, mtkd.experiment, mtkd.plot\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_errors_are_one_clear_line(tmp_path):
    result = mtkd_cli("train-teacher", "modell=resnet8")
    assert result.returncode == 2
    assert "unknown key 'modell'" in result.stderr and "valid keys: seed, model" in result.stderr
    result = mtkd_cli("eval", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = mtkd_cli("distill", "runtime.runtime=inprocess", "student=resnet_8", f"output_dir={tmp_path}/r",
                      "distill.strategy=ce", "data.train_subset=64")
    assert result.returncode == 2 and "unknown model 'resnet_8'; did you mean 'resnet8'" in result.stderr


@needs_fashion
def test_cli_eval_reports_the_checkpoint_accuracy(teacher_dirs):
    result = mtkd_cli("eval", teacher_dirs[0])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 10000 and report["model"] == "resnet8"
    assert 0.2 < report["test_accuracy"] <= 1.0  # well above chance (0.1) after 48 steps


@needs_fashion
def test_cli_distill_inprocess(tmp_path, teacher_dirs):
    result = mtkd_cli("distill", "--runtime", "inprocess", "--quiet", f"output_dir={tmp_path}/run",
                      f"teachers=[{{checkpoint: {teacher_dirs[0]}}}, {{checkpoint: {teacher_dirs[1]}}}]",
                      "data.train_subset=64", "data.test_subset=64", "data.batch_size=32", "optim.epochs=1",
                      module="services.cli")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 1 and Path(summary["plot"]).is_file()
