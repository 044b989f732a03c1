"""Every config value is checked at load, and the command line maps errors to exit codes.

A bad value fails in ``load_config`` with one :class:`ConfigError` naming the key, what it got and
what it expects (the registries' names, or the bound); ``mtkd`` exits 2 with that one line before
anything starts (no Ray). User errors exit 2, numeric errors 3, anything else is a traceback.
"""
from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtkd import errors
from mtkd.checkpoint import CheckpointError
from mtkd.cli import load_experiment, run
from mtkd.config import ConfigError, ExperimentConfig, TeacherTrainConfig, check_runnable, load_config
from mtkd.data import DataError, DataNotFoundError, UnsafePickleError
from mtkd.distill import STRATEGIES
from mtkd.distill.agent import MIXINGS, RULES
from mtkd.engine import NonFiniteLossError, PoolMismatchError

REPO = Path(__file__).resolve().parents[1]
POOL_CONFIG = "configs/mtkd_rl-resnet8_from_fashion_mnist_pool.yaml"
ONE_TEACHER = "teachers=[{checkpoint: t}]"


def valid(names) -> str:
    return ", ".join(names)


# (overrides, what the message must contain); each list is applied on top of the defaults.
EXPERIMENT_CASES = [
    # names from the registries, with the valid choices (never hard-coded here)
    (["distill.strategy=mtkd-rl"], "distill.strategy: unknown strategy 'mtkd-rl'; did you mean 'mtkd_rl'"),
    (["distill.strategy=mtkd-rl"], f"(valid: {valid(STRATEGIES.names())})"),
    (["agent.rule=greedy"], f"agent.rule: expected one of {valid(RULES)}, got 'greedy'"),
    (["agent.mixing=dinamic"], f"agent.mixing: expected one of {valid(MIXINGS)}, got 'dinamic'"),
    (["student=resnet_8"], "student: unknown model 'resnet_8'; did you mean 'resnet8'"),
    (["student=resnet_8"], "(valid: mobilenetv2, "),
    (["data.name=cifar"], "data.name: unknown dataset 'cifar'; did you mean 'cifar10', 'cifar100'? (valid: ade20k, "
                          "canvases, canvases_det, cifar10, cifar100, cityscapes, coco, fashion_mnist, image_folder, "
                          "mnist, pascal_voc, pascal_voc_det)"),
    (["data.name=cityscapes", "data.root=/data/cityscapes"], "data.eval_batch_size: data.name=cityscapes is scored on"),
    (["data.options={size: 32}"], "data.options: the 'fashion_mnist' loader does not take these options"),
    (["data.name=canvases"], "student: unknown segmentation model 'resnet8'; did you mean 'fcn_resnet8'"),
    (["distill.region_grid=4"], "distill.region_grid=4: per-region teacher weights need a segmentation dataset"),
    (["data.name=image_folder"], "data.root: data.name=image_folder needs a folder"),
    (["optim.schedule=cosine"], "optim.schedule: unknown value 'cosine' (valid: step, onecycle)"),
    # distillation
    (["distill.temperature=-1"], "distill.temperature: must be > 0, got -1.0"),
    (["distill.temperature=0"], "distill.temperature: must be > 0, got 0.0"),
    (["distill.temperature=.nan"], "distill.temperature: expected a finite number, got nan"),
    (["distill.temperature=.inf"], "distill.temperature: expected a finite number, got inf"),
    (["distill.beta=-0.5"], "distill.beta: must be >= 0, got -0.5"),
    (["distill.warmup_epochs=-1"], "distill.warmup_epochs: must be >= 0, got -1"),
    # agent
    (["agent.agent_step=0"], "agent.agent_step: must be >= 1, got 0"),
    (["agent.lr=0"], "agent.lr: must be > 0, got 0.0"),
    (["agent.concentration=-1"], "agent.concentration: must be > 0, got -1.0"),
    # optimiser
    (["optim.epochs=-1"], "optim.epochs: must be >= 0, got -1"),
    (["optim.lr=0"], "optim.lr: must be > 0, got 0.0"),
    (["optim.lr=-0.1"], "optim.lr: must be > 0, got -0.1"),
    (["optim.momentum=1"], "optim.momentum: must be in [0, 1), got 1.0"),
    (["optim.momentum=-0.1"], "optim.momentum: must be in [0, 1), got -0.1"),
    (["optim.momentum=0"], "optim.nesterov: Nesterov needs momentum; expected optim.momentum > 0 or "
                           "optim.nesterov=false"),
    (["optim.weight_decay=-1e-4"], "optim.weight_decay: must be >= 0, got -0.0001"),
    (["optim.gamma=0"], "optim.gamma: must be > 0, got 0.0"),
    (["optim.milestones=[3, -1]"], "optim.milestones[1]: must be >= 0, got -1"),
    # data
    (["data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
    (["data.eval_batch_size=0"], "data.eval_batch_size: must be >= 1, got 0"),
    (["data.train_subset=0"], "data.train_subset: must be >= 1, got 0"),
    (["data.test_subset=-5"], "data.test_subset: must be >= 1, got -5"),
    (["data.crop_padding=-1"], "data.crop_padding: must be >= 0, got -1"),
    (["data.augment_bank=-1"], "data.augment_bank: must be >= 0, got -1"),
    # runtime
    (["runtime.runtime=local"], "runtime.runtime: unknown value 'local' (valid: ray, inprocess)"),
    (["runtime.student_precision=auto", "runtime.num_learners=2"], "runtime.student_precision: auto probes on each learner"),
    (["runtime.device=gpu"], "runtime.device: unknown device 'gpu' (valid: auto, cpu, cuda, cuda:N)"),
    (["runtime.num_learners=0"], "runtime.num_learners: must be >= 1, got 0"),
    (["runtime.learner_num_cpus=-1"], "runtime.learner_num_cpus: must be >= 0, got -1.0"),
    (["runtime.learner_resources={learner_node: -1}"],
     "runtime.learner_resources.learner_node: must be >= 0, got -1.0"),
    (["runtime.prefetch=-1"], "runtime.prefetch: must be >= 0, got -1"),
    (["runtime.teacher_num_cpus=-0.5"], "runtime.teacher_num_cpus: must be >= 0, got -0.5"),
    (["runtime.teacher_num_gpus=-1"], "runtime.teacher_num_gpus: must be >= 0, got -1.0"),
    (["runtime.max_failures=-2"], "runtime.max_failures: must be >= -1, got -2"),
    (["runtime.agent_buffer_mb=0"], "runtime.agent_buffer_mb: must be > 0, got 0.0"),
    (["runtime.threads=0"], "runtime.threads: must be >= 1, got 0"),
    (["runtime.sync_batchnorm=true", "runtime.device=cpu", "runtime.num_learners=2"],
     "runtime.sync_batchnorm: SyncBatchNorm needs learners on CUDA"),
    # cache
    (["cache.max_memory_mb=0"], "cache.max_memory_mb: must be >= 1, got 0"),
    (["cache.url=http://user:secret@host:6379"], "cache.url: expected local, redis://host:port[/db], rediss://... or "
                                                 "unix:///path/to/redis.sock, got 'http://***@host:6379'"),
    (["cache.value_dtype=int8"], "cache.value_dtype: unknown value 'int8' (valid: auto, float16, bfloat16)"),
    # the experiment
    (["seed=-1"], "seed: must be in [0, 4294967296), got -1"),
    (["output_dir=''"], "output_dir: expected a folder, got ''"),
    # teachers
    (["teachers=[{checkpoint: a, address: 'h:1'}]"], "teachers[0]: expected exactly one of checkpoint and address, "
                                                     "got both"),
    (["teachers=[{checkpoint: a}, {name: b}]"], "teachers[1]: expected exactly one of checkpoint and address, got "
                                                "neither"),
    (["teachers=[{address: teacher-host}]"], "teachers[0].address: must be host:port with a port in 1..65535, got "
                                             "'teacher-host'"),
    (["teachers=[{address: 'h:70000'}]"], "teachers[0].address: must be host:port"),
    (["teachers=[{checkpoint: a, replicas: 0}]"], "teachers[0].replicas: must be >= 1, got 0"),
    (["teachers=[{checkpoint: a, num_cpus: -1}]"], "teachers[0].num_cpus: must be >= 0, got -1.0"),
    (["teachers=[{checkpoint: a, num_gpus: -0.25}]"], "teachers[0].num_gpus: must be >= 0, got -0.25"),
    (["teachers=[{checkpoint: a, resources: {teacher_node: -1}}]"],
     "teachers[0].resources.teacher_node: must be >= 0, got -1.0"),
    (["teachers=[{checkpoint: a, token_file: t}]"],
     "teachers[0].token_file: only a served teacher (address) takes one"),
    (["teachers=[{checkpoint: a, root_cert: c.pem}]"], "teachers[0].root_cert: only a served teacher"),
    (["teachers=[{checkpoint: a, name: x}, {checkpoint: b, name: x}]"], "teachers: names must be unique, got 'x'"),
]


@pytest.mark.parametrize("overrides, message", EXPERIMENT_CASES, ids=[" ".join(c[0]) for c in EXPERIMENT_CASES])
def test_a_bad_experiment_value_fails_at_load_naming_the_key_and_what_is_valid(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(ExperimentConfig, None, [ONE_TEACHER, *overrides])
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


TEACHER_CASES = [
    (["model=resnet_20"], "model: unknown model 'resnet_20'; did you mean 'resnet20'"),
    (["data.name=fashion-mnist"], "data.name: unknown dataset 'fashion-mnist'; did you mean 'fashion_mnist'"),
    (["optim.lr=0"], "optim.lr: must be > 0, got 0.0"),
    (["optim.momentum=1.5"], "optim.momentum: must be in [0, 1), got 1.5"),
    (["threads=0"], "threads: must be >= 1, got 0"),
    (["seed=-3"], "seed: must be in [0, 4294967296), got -3"),
    (["device=tpu"], "device: unknown device 'tpu'"),
    (["precision=fp16"], "precision: unknown value 'fp16' (valid: fp32, bf16)"),
]


@pytest.mark.parametrize("overrides, message", TEACHER_CASES, ids=[" ".join(c[0]) for c in TEACHER_CASES])
def test_a_bad_teacher_training_value_fails_at_load(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(TeacherTrainConfig, None, overrides)
    assert message in str(caught.value)


def test_the_defaults_and_edge_values_are_accepted():
    config = load_config(ExperimentConfig, None, [
        ONE_TEACHER, "optim.epochs=0", "optim.momentum=0", "optim.nesterov=false", "optim.weight_decay=0",
        "distill.beta=0", "distill.warmup_epochs=0", "runtime.max_failures=-1", "runtime.teacher_num_cpus=0",
        "data.augment_bank=0", "data.crop_padding=0", "cache.url=local", "seed=0"])
    assert config.optim.momentum == 0.0 and config.runtime.max_failures == -1
    for url in ("redis://h:6380/0", "rediss://h:6380", "unix:///tmp/redis.sock"):
        assert load_config(ExperimentConfig, None, [f"cache.url={url}"]).cache.url == url
    assert load_config(ExperimentConfig, None, ["teachers=[{address: 'h:50051', token_file: t}]"]).teachers[0].address
    assert load_config(TeacherTrainConfig) == TeacherTrainConfig()


def namespace(*overrides: str, config: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(config=config, overrides=list(overrides), resume=None)


def test_a_run_is_checked_as_a_whole_when_the_command_line_loads_it():
    with pytest.raises(ConfigError, match="teachers: strategy 'aver' distils from teachers; expected at least one"):
        load_experiment(namespace("distill.strategy=aver"))
    assert load_experiment(namespace("distill.strategy=ce")).teachers == []  # ce needs no teachers
    with pytest.raises(ConfigError, match=r"teachers\[1\].address: a served teacher needs runtime.runtime=ray"):
        load_experiment(namespace("runtime.runtime=inprocess", "teachers=[{checkpoint: a}, {address: 'h:1'}]"))
    config = load_config(ExperimentConfig, None, ["distill.strategy=aver"])  # a program may add teachers later
    with pytest.raises(ConfigError, match="distils from teachers"):
        check_runnable(config)


# --------------------------------------------------------------------------- committed configs
def _committed_configs() -> list[Path]:
    return sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "deploy" / "configs").glob("*.yaml")])


@pytest.mark.parametrize("path", _committed_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_committed_config_still_loads(path):
    if path.name.startswith("demo"):
        from mtkd.config import from_dict, read_yaml
        from services.demo import DemoConfig

        from_dict(DemoConfig, read_yaml(path))
    elif path.name.startswith("tune-"):
        from services.tune import load_tune

        load_tune(path)
    elif path.name.startswith("teacher-"):
        load_config(TeacherTrainConfig, path)
    else:
        check_runnable(load_config(ExperimentConfig, path))


# --------------------------------------------------------------------------- the command line
def test_a_bad_value_on_the_command_line_exits_2_in_one_line_before_ray_starts():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "services.cli", "distill", "--config", POOL_CONFIG,
                             "distill.temperature=-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    # one line, the key's: no Ray banner, no traceback
    assert lines == ["mtkd: error: distill.temperature: must be > 0, got -1.0"], result.stderr
    assert result.stdout == ""
    assert elapsed < 30, f"{elapsed:.1f} s: the check should come before anything starts"


def test_the_config_is_refused_before_ray_is_even_imported():
    code = ("import sys\n"
            "from services.cli import main\n"
            f"code = main(['distill', '--config', {POOL_CONFIG!r}, 'distill.temperature=-1'])\n"
            "print(code, 'ray' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr


# --------------------------------------------------------------------------- the error hierarchy
from mtkd.distill.agent import AgentSettingError, AgentUpdateError  # noqa: E402
@pytest.mark.parametrize("cls, kind, builtin", [
    (ConfigError, errors.UserError, ValueError),
    (CheckpointError, errors.UserError, ValueError),
    (PoolMismatchError, errors.UserError, ValueError),
    (DataError, errors.UserError, ValueError),
    (DataNotFoundError, errors.UserError, FileNotFoundError),
    (UnsafePickleError, errors.UserError, pickle.UnpicklingError),
    (NonFiniteLossError, errors.NumericError, RuntimeError),
    (AgentUpdateError, errors.NumericError, RuntimeError),
    (AgentSettingError, errors.UserError, ValueError),
    (errors.RunExistsError, errors.UserError, FileExistsError),
])
def test_library_errors_are_in_the_hierarchy_and_still_their_builtin(cls, kind, builtin):
    error = cls("x")
    assert isinstance(error, kind) and isinstance(error, errors.MtkdError) and isinstance(error, builtin)
    assert errors.exit_code(error) == (3 if kind is errors.NumericError else 2)
    assert errors.error_class(cls.__name__) is cls


def test_exit_codes_and_the_unknown():
    assert errors.exit_code(ValueError("a bug")) is None
    assert errors.error_class("NoSuchError") is None
    assert errors.RUN_ERRORS == (errors.NumericError, errors.UserError)


def _parser(error: BaseException) -> argparse.ArgumentParser:
    def fail(_args):
        raise error

    parser = argparse.ArgumentParser(prog="mtkd")
    parser.set_defaults(func=fail)
    return parser


def test_the_cli_maps_user_errors_to_2_numeric_to_3_and_lets_bugs_through(capsys):
    assert run(_parser(DataNotFoundError("fashion_mnist train files not found\nlooked in /x")), []) == 2
    assert capsys.readouterr().err == "mtkd: error: fashion_mnist train files not found; looked in /x\n"
    assert run(_parser(NonFiniteLossError("loss is nan at epoch 1, step 3")), []) == 3
    assert capsys.readouterr().err.startswith("mtkd: error: loss is nan at epoch 1, step 3")
    with pytest.raises(ValueError, match="a bug"):  # a bare builtin is a bug: the traceback shows
        run(_parser(ValueError("a bug")), [])
    with pytest.raises(FileNotFoundError):
        run(_parser(FileNotFoundError("also a bug")), [])
