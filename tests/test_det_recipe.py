"""The GPU detection recipe (configs/centernet-coco-resnet18_fpn.yaml and its teacher config): it loads,
says what it promises, and a few steps of it run on the CPU with its own models, losses, strategy and
rule (inputs shrunk to 32x32, untrained teachers of both recipe architectures, tiny COCO files with
COCO's 80 category ids)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtkd.config import ExperimentConfig, TeacherTrainConfig, check_runnable, load_config
from mtkd.data.det_files import IMAGENET_STATS
from mtkd.detection.models import DET_MODELS
from mtkd.models import create_model
from mtkd.session import Session
from mtkd.teachers import LocalTeacherPool, Teacher

from test_det_files import write_image  # noqa: E402  (noise images with painted boxes)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = CONFIGS / "centernet-coco-resnet18_fpn.yaml"
TEACHER = CONFIGS / "teacher-centernet_resnet50_fpn-coco.yaml"
COCO_TRAIN_ANNOTATED = 117_266  # train2017 images with at least one annotation (the training split)
COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
            *range(84, 91)]  # COCO-2017's 80 category ids


def test_recipe_config_is_the_coco_setting():
    config = load_config(ExperimentConfig, RECIPE)
    check_runnable(config)
    teacher = load_config(TeacherTrainConfig, TEACHER)
    assert (config.student, teacher.model) == ("centernet_resnet18_fpn", "centernet_resnet50_fpn")
    assert config.data.name == teacher.data.name == "coco" and "centernet_resnet101_fpn" in DET_MODELS
    assert config.data.options == teacher.data.options  # same inputs: the pool's input shape fits the student's
    assert config.data.options["input_size"] == [512, 512] and config.data.augment and config.data.augment_bank == 0
    steps = COCO_TRAIN_ANNOTATED // config.data.batch_size  # drop_last
    assert config.optim.epochs * steps == 87_936  # what the comment says
    # the meta rule's rows are per (cell, class): at K = 80 and 128 x 128 maps they cannot fit; reinforce reads none
    assert (config.distill.strategy, config.agent.rule, config.distill.units) == ("mtkd_rl", "reinforce", "image")
    assert (config.runtime.runtime, config.runtime.device, config.runtime.teacher_precision) == ("inprocess", "cuda",
                                                                                                   "bf16")
    # the first teacher is what the teacher config writes; the second its ResNet-101 run (the comments' command)
    assert [t.checkpoint for t in config.teachers] == [teacher.output_dir, teacher.output_dir.replace("50", "101")]


def write_coco80(root: Path, split: str, sizes: list[tuple[int, int]], seed: int) -> None:
    """Noise images of ``sizes`` with two painted boxes each, in categories drawn from COCO's 80 ids."""
    g = torch.Generator().manual_seed(seed)
    images, annotations = [], []
    for i, (h, w) in enumerate(sizes):
        boxes = [(2, 3, w // 2 - 2, h // 2), (w // 2 + 1, h // 3, w - 3, h - 2)]
        write_image(root / split / f"{i:012d}.jpg", (h, w), [(0, b, 0) for b in boxes], 100 * seed + i)
        images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
        for x0, y0, x1, y1 in boxes:
            category = COCO_IDS[int(torch.randint(80, (1,), generator=g))]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c, "name": f"class{c}"} for c in COCO_IDS]}))


def test_recipe_runs_a_few_steps_on_the_cpu(tmp_path):
    assert len(COCO_IDS) == 80
    root = tmp_path / "coco"
    write_coco80(root, "train2017", [(60, 80), (64, 64), (48, 72), (80, 56)], seed=1)
    write_coco80(root, "val2017", [(64, 48), (56, 80)], seed=2)
    config = load_config(ExperimentConfig, RECIPE, [
        f"data.root={root}", f"output_dir={tmp_path / 'run'}", "runtime.device=cpu", "data.batch_size=2",
        "data.eval_batch_size=2", "data.options.input_size=[32, 32]", "data.options.read_threads=2",
        "distill.warmup_epochs=0", "agent.agent_step=1"])  # the agent acts and learns from the first step
    teacher_cfg = load_config(TeacherTrainConfig, TEACHER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches on a busy 2-core machine: one thread is faster
    try:
        teachers = []
        for i, (spec, model_name) in enumerate(zip(config.teachers, [teacher_cfg.model, "centernet_resnet101_fpn"])):
            torch.manual_seed(i)
            model = create_model(model_name, num_classes=80, in_channels=3)
            meta = {"model": model_name, "num_classes": 80, "in_channels": 3, "input_shape": [3, 32, 32],
                    "weights_digest": f"untrained-{i}", "task": "detection",
                    "dataset": {"name": "coco", "mean": list(IMAGENET_STATS[0]), "std": list(IMAGENET_STATS[1])}}
            teachers.append(Teacher(model, meta, spec.name, device="cpu", precision=config.runtime.teacher_precision))
        session = Session.build(config, LocalTeacherPool(teachers))
        steps = []
        metrics = session.train_epoch(steps.append)
    finally:
        torch.set_num_threads(threads)
    assert session.train_set.num_classes == 80 and session.train_set.image_shape == (3, 32, 32)
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) and s["kd"] > 0 for s in steps)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(session.distiller.module.student) == count(create_model("centernet_resnet18_fpn", num_classes=80))
    assert [d["model"] for d in session.distiller.descriptions] == ["centernet_resnet50_fpn", "centernet_resnet101_fpn"]
    assert session.distiller.descriptions[0]["precision"] == "bf16"
    weights = [metrics[f"weights/logit/{t.name}"] for t in teachers]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5) and 0.0 <= metrics["test/map"] <= 1.0
