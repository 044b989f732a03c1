"""The GPU segmentation recipe (configs/cirkd-cityscapes-deeplabv3.yaml and its teacher config): it loads,
says what it promises, and a few steps of it run on the CPU with its own models, losses and strategy
(crops shrunk to 64x128, untrained teachers of the teacher config's model, tiny Cityscapes-layout files)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd.config import ExperimentConfig, TeacherTrainConfig, check_runnable, load_config
from mtkd.data.seg_formats import CITYSCAPES_LABEL_TO_TRAIN, IMAGENET_STATS
from mtkd.models import create_model
from mtkd.session import Session
from mtkd.teachers import LocalTeacherPool, Teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = CONFIGS / "cirkd-cityscapes-deeplabv3.yaml"
TEACHER = CONFIGS / "teacher-deeplabv3_resnet101-cityscapes.yaml"
CITYSCAPES_TRAIN_IMAGES = 2975


def test_recipe_config_is_the_cirkd_setting():
    config = load_config(ExperimentConfig, RECIPE)
    check_runnable(config)
    teacher = load_config(TeacherTrainConfig, TEACHER)
    assert (config.student, teacher.model) == ("deeplabv3_resnet18", "deeplabv3_resnet101")
    assert config.data.name == teacher.data.name == "cityscapes"
    assert config.data.options == teacher.data.options  # same crops: the pool's input shape fits the student's
    assert config.data.options["crop_size"] == [512, 1024] and config.data.augment and config.data.augment_bank == 0
    assert config.data.batch_size in (8, 16) and config.optim.lr == 0.01 and config.optim.schedule == "onecycle"
    steps = CITYSCAPES_TRAIN_IMAGES // config.data.batch_size  # drop_last
    assert (config.optim.epochs - 1) * steps < 40_000 <= config.optim.epochs * steps  # 40k iterations
    assert config.distill.temperature == 4.0 and config.distill.strategy == "mtkd_rl"
    assert (config.runtime.device, config.runtime.teacher_precision, config.cache.url) == ("cuda", "bf16", None)
    # the first teacher is what the teacher config writes; the second its seed=1 run (the comments' command)
    assert [t.checkpoint for t in config.teachers] == [teacher.output_dir, teacher.output_dir.replace("seed0", "seed1")]


def write_cityscapes(root: Path, split: str, count: int, h: int = 64, w: int = 128) -> None:
    from PIL import Image

    rng = np.random.default_rng(len(split))
    ids = np.array([0, *CITYSCAPES_LABEL_TO_TRAIN])
    for j in range(count):
        stem = f"{('aachen', 'bremen')[j % 2]}_{j:06d}_000019"
        city = stem.split("_")[0]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = ids[rng.integers(0, len(ids), (h, w))].astype(np.uint8)
        for folder, name, pixels in [("leftImg8bit", "leftImg8bit", image), ("gtFine", "gtFine_labelIds", mask)]:
            path = root / folder / split / city / f"{stem}_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)


def test_recipe_runs_a_few_steps_on_the_cpu(tmp_path):
    root = tmp_path / "cityscapes"
    write_cityscapes(root, "train", 4)
    write_cityscapes(root, "val", 2)
    config = load_config(ExperimentConfig, RECIPE, [
        f"data.root={root}", f"output_dir={tmp_path / 'run'}", "runtime.device=cpu", "data.batch_size=2",
        "data.eval_batch_size=2", "data.options.crop_size=[64, 128]", "data.options.read_threads=2",
        "distill.warmup_epochs=0", "agent.agent_step=1"])  # the agent acts and learns from the first step
    teacher_cfg = load_config(TeacherTrainConfig, TEACHER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured on a busy 2-core machine: one thread 2.6x faster than two
    try:
        teachers = []
        for i, spec in enumerate(config.teachers):
            torch.manual_seed(i)
            model = create_model(teacher_cfg.model, num_classes=19, in_channels=3)
            meta = {"model": teacher_cfg.model, "num_classes": 19, "in_channels": 3, "input_shape": [3, 64, 128],
                    "weights_digest": f"untrained-{i}", "task": "segmentation",
                    "dataset": {"name": "cityscapes", "mean": list(IMAGENET_STATS[0]), "std": list(IMAGENET_STATS[1])}}
            teachers.append(Teacher(model, meta, spec.name, device="cpu", precision=config.runtime.teacher_precision))
        session = Session.build(config, LocalTeacherPool(teachers))
        steps = []
        metrics = session.train_epoch(steps.append)
    finally:
        torch.set_num_threads(threads)
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) and s["kd"] > 0 for s in steps)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(session.distiller.module.student) == count(create_model("deeplabv3_resnet18", num_classes=19))
    assert session.distiller.descriptions[0]["model"] == "deeplabv3_resnet101"
    assert session.distiller.descriptions[0]["precision"] == "bf16"
    weights = [metrics[f"weights/logit/{t.name}"] for t in teachers]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5) and 0.0 <= metrics["test/miou"] <= 1.0
