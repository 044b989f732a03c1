"""Shared fixtures: a small pool of real teachers trained on real Fashion-MNIST (once per session)."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

from mtkd.config import DataConfig, ExperimentConfig, OptimConfig, TeacherSpec, TeacherTrainConfig, load_config
from mtkd.data import DATASETS  # noqa: F401  (registers datasets)

# Ray Train polls its workers every 2 s by default, and a test run of a few seconds would spend much
# of its time waiting. Set before any Ray starts; TorchTrainer passes it on to its controller, and the
# `mtkd` subprocesses of the tests inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# teacher_precision auto caches its probe decisions on disk: the tests keep theirs out of ~/.cache
# (a folder of this test session, inherited by the `mtkd` subprocesses and Ray workers)
os.environ.setdefault("MTKD_PROBE_CACHE", tempfile.mkdtemp(prefix="mtkd-probe-cache-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: one OpenMP thread each (two each crawl, measured in the fixtures
    # below). Runs set their own count from the config; this is the tests' own torch calls.
    import torch

    torch.set_num_threads(1)

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist (make test does)")

TEACHER_MODELS = ("resnet8", "vgg8")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (small batches gain nothing from threads, and one thread
    does not oversubscribe a busy CI machine); the count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory) -> list[str]:
    """Two different small teachers (7x7 and 3x3 feature maps), one epoch on 1536 samples each.

    Trained with one torch thread (the count is restored afterwards): batches of 32 gain little from
    a second thread, and on a busy 2-core machine OpenMP threads crawl (measured: 13 s with one
    thread, 59 s with two)."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed")
    import torch

    from mtkd.teacher_training import train_teacher

    root = tmp_path_factory.mktemp("teachers")
    folders = []
    threads = torch.get_num_threads()
    try:
        for model in TEACHER_MODELS:
            cfg = TeacherTrainConfig(model=model, output_dir=str(root / model), seed=1, threads=1,
                                     data=DataConfig(train_subset=1536, test_subset=256, batch_size=32, crop_padding=2),
                                     optim=OptimConfig(epochs=1, lr=0.05, nesterov=False, weight_decay=5e-4,
                                                       milestones=[]))
            train_teacher(cfg, progress=False)
            folders.append(cfg.output_dir)
    finally:
        torch.set_num_threads(threads)
    return folders


def small_experiment(output_dir, teacher_dirs, overrides: list[str] = ()) -> ExperimentConfig:
    """A few-steps-per-epoch experiment on Fashion-MNIST with the session's teachers."""
    config = load_config(ExperimentConfig, None, [
        f"output_dir={output_dir}", "student=resnet8", "data.train_subset=128", "data.test_subset=128",
        "data.batch_size=32", "data.crop_padding=2", "optim.epochs=2", "optim.milestones=[1]",
        "agent.rule=reference", "agent.agent_step=3", "runtime.runtime=inprocess", "runtime.device=cpu", "runtime.teacher_precision=fp32",
        *overrides,
    ])
    config.teachers = [TeacherSpec(checkpoint=d) for d in teacher_dirs]
    return config


# 30 steps per epoch, 2 epochs: the agent updates at steps 20, 30 (epoch end), 50 and 60 and acts
# from step 31 on (epoch 1 is the warm-up). One torch thread, like every Ray worker.
EQUIVALENCE = ["data.train_subset=960", "data.batch_size=32", "agent.agent_step=20", "runtime.threads=1"]


def step_losses(run_dir) -> list[float]:
    """The per-step losses a run wrote (``steps.jsonl``)."""
    from mtkd.experiment import RunDirectory

    run = RunDirectory(run_dir)
    return [s["loss"] for s in run.read(run.steps_path)]


@pytest.fixture(scope="session")
def inprocess_reference(tmp_path_factory, teacher_dirs) -> list[float]:
    """The in-process engine's per-step losses on the :data:`EQUIVALENCE` experiment (the reference
    the Ray runtime must reproduce to a relative 1e-6). Computed once per session: it depends only on
    the session's teachers and a fixed config."""
    import torch

    from mtkd.runner import run_inprocess

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("inprocess")
    try:
        run_inprocess(small_experiment(out, teacher_dirs, EQUIVALENCE), progress=False)
    finally:
        torch.set_num_threads(threads)
    return step_losses(out)


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (children of children...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (exists and is not a zombie)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def seg_teachers(tmp_path_factory):
    """Two untrained segmentation teachers of different architectures and strides (the engine's
    arithmetic does not need them trained)."""
    import torch

    from mtkd.models import create_model
    from mtkd.teachers import save_teacher

    if not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed")
    root = tmp_path_factory.mktemp("seg-teachers")
    folders = []
    for i, name in enumerate(["fcn_resnet8", "lraspp_mobilenetv2"]):
        torch.manual_seed(i)
        model = create_model(name, num_classes=11, in_channels=1)
        meta = {"model": name, "num_classes": 11, "in_channels": 1, "input_shape": [1, 32, 32], "task": "segmentation",
                "dataset": {"name": "canvases", "mean": [0.2], "std": [0.25]}}
        save_teacher(root / name, model, meta)
        folders.append(str(root / name))
    return folders


def seg_experiment(output_dir, teachers, overrides=(), num_train: int = 24) -> ExperimentConfig:
    """A few-steps-per-epoch segmentation experiment on ``num_train`` 32x32 canvases (16 test) with
    the given teacher checkpoints."""
    config = load_config(ExperimentConfig, None, [
        f"output_dir={output_dir}", "student=fcn_resnet8", "data.name=canvases", "data.batch_size=8",
        "data.crop_padding=4", "optim.epochs=2", "optim.milestones=[1]", "distill.warmup_epochs=1",
        "distill.beta=0.5", "runtime.runtime=inprocess", "runtime.device=cpu", "runtime.threads=1",
        "agent.agent_step=2", *overrides])
    config.data.options = {"num_canvases": {"train": num_train, "test": 16}, "size": 32}
    config.teachers = [TeacherSpec(checkpoint=d) for d in teachers]
    return config


@functools.lru_cache(maxsize=None)
def uses_ray(test_file: str) -> bool:
    """Whether a test module has a Ray test (a ``pytest.mark.ray`` in its text)."""
    path = Path(__file__).parent.parent / test_file
    return path.suffix == ".py" and "mark.ray" in path.read_text()


class OneRayAtATime:
    """`make test` runs the suite on two pytest-xdist workers, whole modules to one worker (a module's
    fixtures are built once) and one private Ray at a time: every module with a Ray test is one unit
    of work, so those modules run one after the other on one worker while the other worker takes the
    rest."""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadScopeScheduling

        class Scheduler(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                test_file = nodeid.split("::", 1)[0]
                return "ray" if uses_ray(test_file) else test_file

        return Scheduler(config, log)


@pytest.fixture(autouse=True)
def ray_tests_first(request):
    """Under `make test` (two workers), a test of a module without Ray runs at a lower CPU priority (nice
    10, inherited by what it starts) and a Ray test at the normal one: the Ray modules, one after the
    other on one worker, are the suite's longest path, and the other worker has time to spare. Only
    where the priority can be raised again (root, as in CI); elsewhere nothing changes."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or os.geteuid() != 0:
        yield
        return
    test_file = str(Path(request.node.path).relative_to(Path(__file__).parent.parent))
    os.setpriority(os.PRIO_PROCESS, 0, 0 if uses_ray(test_file) else 10)
    yield


def pytest_configure(config):
    if config.pluginmanager.has_plugin("xdist"):  # its hooks exist only with the plugin
        config.pluginmanager.register(OneRayAtATime(), "mtkd-one-ray-at-a-time")
