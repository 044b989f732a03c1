"""Detection on the one engine path: data and config, rows, per-object mass, the meta rule's
hypergradient checked against autograd, every strategy and rule per image and per object, exact
resume, the run folder with mAP, export and `mtkd eval`, and `mtkd train-teacher` for a detector."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fashion
from mtkd.config import ConfigError, ExperimentConfig, TeacherSpec
from mtkd.config_loader import load_config
from mtkd.data import BatchLoader, augment_generator, train_test
from mtkd.data.seg_augment import SegAugmentConfig
from mtkd.detection.augment import det_augment_batch
from mtkd.detection.losses import heatmap_kd
from mtkd.detection.models import DET_MODELS, CenterNet
from mtkd.detection.rows import binary_rows
from mtkd.distill.meta import consensus_gradient, hypergradient, kd_logit_gradient, meta_direction
from mtkd.distill.strategies import STRATEGIES, per_unit_mean
from mtkd.engine import PoolMismatchError
from mtkd.models import Outputs, create_model
from mtkd.session import Session
from mtkd.tasks import DetectionTask, dataset_task, model_registry
from mtkd.teachers import LocalTeacherPool, load_teacher, save_teacher

T = 4.0
SIZE = 32
OPTIONS = {"num_canvases": {"train": 24, "test": 16}, "size": SIZE}


@pytest.fixture(scope="module")
def det_teachers(tmp_path_factory):
    """Two untrained detectors of different backbones (the engine's arithmetic does not need them trained)."""
    root = tmp_path_factory.mktemp("det-teachers")
    folders = []
    for i, name in enumerate(["centernet_resnet8", "centernet_vgg8"]):
        torch.manual_seed(i)
        model = create_model(name, num_classes=10, in_channels=1)
        meta = {"model": name, "num_classes": 10, "in_channels": 1, "input_shape": [1, SIZE, SIZE], "task": "detection",
                "dataset": {"name": "canvases_det", "mean": [0.2], "std": [0.25]}}
        save_teacher(root / name, model, meta)
        folders.append(str(root / name))
    return folders


def det_experiment(output_dir, teachers, overrides=()) -> ExperimentConfig:
    config = load_config(ExperimentConfig, None, [
        f"output_dir={output_dir}", "student=centernet_resnet8", "data.name=canvases_det", "data.batch_size=8",
        "data.eval_batch_size=8", "optim.epochs=2", "optim.milestones=[1]", "distill.warmup_epochs=1",
        "distill.beta=0.5", "runtime.runtime=inprocess", "runtime.device=cpu", "runtime.threads=1",
        "runtime.teacher_precision=fp32", "agent.agent_step=2", *overrides])
    config.data.options = dict(OPTIONS)
    config.teachers = [TeacherSpec(checkpoint=d) for d in teachers]
    return config


# ------------------------------------------------------------------------------ data and config
def test_detection_data_names_its_task_registry_and_config_errors():
    assert dataset_task("canvases_det") == "detection" and model_registry("canvases_det") is DET_MODELS
    assert isinstance(create_model("centernet_resnet8", num_classes=10, in_channels=1), CenterNet)
    base = ["data.name=canvases_det", "student=centernet_resnet8", "runtime.runtime=inprocess"]
    cases = [(["distill.units=object"], "distill.units"), ([*base, "student=resnet8"], "student"),
             ([*base, "data.augment_bank=2"], "augment_bank"), ([*base, "cache.url=local"], "cache.url"),
             ([*base, "distill.region_grid=2"], "region_grid"), ([*base, "distill.dense_kd=cwd"], "dense_kd"),
             ([*base, "data.options={bogus: 1}"], "bogus"), ([*base, "distill.units=cell"], "distill.units")]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_config(ExperimentConfig, None, overrides)
    # unaugmented, the cache keys name every image exactly (augmented: refused above); Ray is the default runtime
    assert load_config(ExperimentConfig, None, [*base, "cache.url=local", "data.augment=false"]).cache.url == "local"
    assert load_config(ExperimentConfig, None, base[:2]).runtime.runtime == "ray"
    assert load_config(ExperimentConfig, None, [*base, "distill.units=object"]).distill.units == "object"


@needs_fashion
def test_the_loader_moves_boxes_with_their_images():
    train, _ = train_test("canvases_det", None, **OPTIONS)
    loader = BatchLoader(train, 8, augment=True, crop_padding=4, seed=3, drop_last=True)
    loader.set_epoch(1)
    batch = list(loader)[1]
    index = loader.sample_indices(1, None)
    config = SegAugmentConfig(crop_size=None, padding=4, hflip=True)
    images, targets = det_augment_batch(train.images[index], train.targets[index], augment_generator(3, 1, 1), config)
    assert torch.equal(batch.labels, targets) and batch.augment is None
    assert not torch.equal(targets, train.targets[index])  # the boxes moved
    mean, std = train.mean[0], train.std[0]
    assert torch.allclose(batch.images, (images - mean) / std, atol=1e-5)
    plain = next(iter(BatchLoader(train, 8, shuffle=False)))
    assert torch.equal(plain.labels, train.targets[:8])  # not augmented: the stored boxes, never a crop of them
    with pytest.raises(ValueError, match="augment_bank"):
        BatchLoader(train, 8, augment=True, augment_bank=2)


# ------------------------------------------------------------------------------ the task's tensors
def _batch(seed=0, batch=2, classes=3, cells=4, teachers=2, dim=5):
    """Outputs on a ``cells x cells`` map of 4-pixel cells and packed boxes (3 slots, one padding)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor([[[0, 1, 1, 9, 9], [2, 6, 2, 15, 14], [-1, 0, 0, 0, 0]],
                            [[1, 0, 4, 7, 15], [-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]]], dtype=torch.float32)[:batch]
    feature = torch.randn(batch, dim, cells, cells, generator=g)
    student = Outputs(torch.randn(batch, classes + 4, cells, cells, generator=g), feature.mean((2, 3)), feature)
    outs = [Outputs(torch.randn(batch, classes + 4, cells, cells, generator=g) * 3, torch.randn(batch, dim),
                    torch.randn(batch, dim, cells, cells, generator=g)) for _ in range(teachers)]
    projected = [torch.randn(batch, dim, cells, cells, generator=g) for _ in range(teachers)]
    return student, outs, projected, targets


def test_binary_rows_are_the_heatmap_sigmoids():
    heat = torch.randn(2, 3, 4, 5) * 4
    rows = binary_rows(heat)
    assert rows.shape == (2 * 4 * 5 * 3, 6)
    probs = F.softmax(rows / T, 1).view(2, 4, 5, 3, 3, 2)  # rows (b, y, x, k) x slots (class, yes/no)
    for k in range(3):
        assert torch.allclose(probs[:, :, :, k, k, 0], torch.sigmoid(heat[:, k] / T), atol=1e-6)
        others = [j for j in range(3) if j != k]
        assert probs[:, :, :, k, others].abs().max() == 0  # slots of other classes: exactly 0


@pytest.mark.parametrize("units", ["image", "object"])
def test_camkd_scores_each_unit_by_its_cells(units):
    """Independent loop: per unit, the mean over its cells and classes of each teacher's binary
    cross-entropy of "an object of class k is centred here" (positive where the target heatmap >= 0.5)."""
    student, teachers, _, targets = _batch()
    task = DetectionTask(num_classes=3, max_objects=3, units=units)
    inputs = task.step_inputs(student, teachers, targets, None, False, T)
    encoded = task.encode(student.logits, targets)
    owner = encoded.owner
    unit_count = 2 * task.units_per_image
    expected = torch.zeros(unit_count, 2)
    for m, t in enumerate(teachers):
        sums, counts = torch.zeros(unit_count), torch.zeros(unit_count)
        for b in range(2):
            for y in range(4):
                for x in range(4):
                    u = b if units == "image" else b * 4 + (3 if owner[b, y, x] < 0 else int(owner[b, y, x]))
                    for k in range(3):
                        p = torch.sigmoid(t.logits[b, k, y, x])
                        positive = encoded.heatmap[b, k, y, x] >= 0.5
                        sums[u] += -torch.log(p if positive else 1 - p)
                        counts[u] += 1
        expected[:, m] = sums / counts.clamp(min=1)
    invert = lambda v: (1 - torch.softmax(v, 1)) / (v.shape[1] - 1)  # noqa: E731
    weights = STRATEGIES.get("camkd")().weights(inputs).logit
    assert weights.shape == (unit_count, 2)
    assert torch.allclose(weights, invert(expected), atol=1e-4)
    if units == "object":  # padding slots have no cell: equal weights; labels: class, K for background/padding
        assert torch.allclose(weights[[2, 5, 6]], torch.full((3, 2), 0.5))
        assert inputs.unit_labels.tolist() == [0, 2, 3, 3, 1, 3, 3, 3]


def test_per_object_mass_gives_back_the_per_image_loss():
    student, teachers, projected, targets = _batch(seed=1)
    per_image = DetectionTask(3, 3, "image").distill_terms(student, projected, teachers, targets, T)
    per_object = DetectionTask(3, 3, "object").distill_terms(student, projected, teachers, targets, T)
    assert per_image.mass is None and per_object.kl.shape == (8, 2)
    assert torch.allclose(per_object.mass.sum(), torch.tensor(1.0)) and (per_object.mass[[2, 5, 6]] == 0).all()
    for weight in (torch.full((2, 2), 0.5), torch.tensor([[0.2, 0.8], [0.7, 0.3]])):
        expanded = weight.repeat_interleave(4, 0)  # each image's weights on all its units
        for a, b in ((per_image.kl, per_object.kl), (per_image.mse, per_object.mse)):
            assert torch.allclose(per_image.reduce(weight * a), per_object.reduce(expanded * b), atol=1e-6)
    # a padding slot mirrors its image's background unit (losses and state)
    assert torch.equal(per_object.kl[5], per_object.kl[7]) and torch.equal(per_object.kl[2], per_object.kl[3])
    state = DetectionTask(3, 3, "object").agent_state(student, projected, teachers, targets, T)
    assert state.vector.shape == (8, 8) and torch.equal(state.vector[5], state.vector[7])
    assert torch.isfinite(state.vector).all()


def test_dense_meta_hypergradient_is_the_derivative_through_one_update():
    """Per-object units: ``lr * mass_u * K / 2 * h[u, m]`` is d(meta loss)/d(w[u, m]) through one SGD step of
    a per-cell linear heatmap head on fixed features, trained on the units' heatmap distillation."""
    torch.manual_seed(0)
    classes, dim, cells, lr, batch = 3, 5, 4, 0.3, 2
    weight, bias = torch.randn(classes + 4, dim) * 0.3, torch.randn(classes + 4) * 0.1
    task = DetectionTask(classes, 3, "object")

    def logits_of(feature, W, c):  # 1x1 conv
        return torch.einsum("kd,bdhw->bkhw", W, feature) + c[None, :, None, None]

    def outputs(z, f):
        return Outputs(z, f.mean((2, 3)), f)

    student, teacher_out, _, targets = _batch(seed=2)
    feature = student.feature
    _, meta_teachers, _, meta_targets = _batch(seed=3)
    meta_feature = torch.randn(batch, dim, cells, cells, generator=torch.Generator().manual_seed(4))
    inputs = task.step_inputs(outputs(logits_of(feature, weight, bias), feature), teacher_out, targets, None, False, T)
    encoded = task.encode(student.logits, targets)
    unit_weights = torch.full((batch * 4, 2), 0.5, requires_grad=True)
    W, c = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    z = logits_of(feature, W, c)
    kd = [heatmap_kd(z, t.logits, T, encoded.owner, 3, task.fg_share) for t in teacher_out]
    mass = kd[0].mass.flatten() / batch
    loss = (mass[:, None] * unit_weights * torch.stack([v.units.flatten() for v in kd], 1)).sum()
    gW, gc = torch.autograd.grad(loss, (W, c), create_graph=True)
    W1, c1 = W - lr * gW, c - lr * gc
    task._memo = None
    meta_inputs = task.step_inputs(outputs(logits_of(meta_feature, W1.detach(), c1.detach()), meta_feature),
                                   meta_teachers, meta_targets, None, False, T)
    delta = kd_logit_gradient(inputs.student_logits, inputs.teacher_logits, T)
    gradient = consensus_gradient(meta_inputs.student_logits, meta_inputs.targets, meta_inputs.teacher_logits, T)
    direction = meta_direction(inputs.student_embedding, meta_inputs.student_embedding, gradient)
    h_units = per_unit_mean(hypergradient(delta, direction), inputs.unit_of_row, inputs.num_units)  # [U, M]
    # the meta loss, independently: per (cell, class), binary KD from the teachers right about "centred here"
    heat = logits_of(meta_feature, W1, c1)[:, :classes]
    positive = task.encode(heat, meta_targets).heatmap >= 0.5
    teacher_heat = torch.stack([t.logits[:, :classes] for t in meta_teachers])  # [M, B, K, h, w]
    right = ((teacher_heat > 0) == positive).float()
    count = right.sum(0)
    q = (right * torch.sigmoid(teacher_heat / T)).sum(0) / count.clamp(min=1)
    log_p, log_not_p = F.logsigmoid(heat / T), F.logsigmoid(-heat / T)
    kl = q * (torch.log(q.clamp(min=1e-30)) - log_p) + (1 - q) * (torch.log((1 - q).clamp(min=1e-30)) - log_not_p)
    meta_loss = (T * T * kl * (count > 0)).mean()
    expected = torch.autograd.grad(meta_loss, unit_weights)[0]
    assert expected.abs().max() > 1e-6
    assert torch.allclose(lr * mass[:, None] * classes / 2 * h_units, expected, rtol=1e-3, atol=1e-8)


# ------------------------------------------------------------------------- the engine, end to end
@needs_fashion
@pytest.mark.parametrize("strategy, rule, units", [
    ("aver", "meta", "image"), ("ebkd", "meta", "object"), ("camkd", "meta", "image"), ("mtkd_rl", "meta", "image"),
    ("mtkd_rl", "meta", "object"), ("mtkd_rl", "reference", "object"), ("mtkd_rl", "reference", "image"),
    ("mtkd_rl", "reinforce", "object"),
])
def test_detection_trains_with_every_strategy(tmp_path, det_teachers, one_torch_thread, strategy, rule, units):
    config = det_experiment(tmp_path, det_teachers, [f"distill.strategy={strategy}", f"agent.rule={rule}",
                                                     f"distill.units={units}"])
    session = Session.build(config, LocalTeacherPool([load_teacher(d) for d in det_teachers]))
    assert session.distiller.task.units_per_image == (6 if units == "object" else 1)
    for _ in session.epochs():
        metrics = session.train_epoch()
    assert 0.0 <= metrics["test/map"] <= 1.0 and 0.0 <= metrics["test/map50"] <= 1.0
    assert all(math.isfinite(metrics[k]) for k in ("loss/total", "loss/ce", "loss/kd", "loss/feature", "test/loss"))
    assert metrics["loss/kd"] > 0 and metrics["loss/feature"] > 0
    means = [metrics[f"weights/logit/{t.name}"] for t in session.distiller.pool.teachers]
    if rule != "reference" or strategy != "mtkd_rl":  # the reference rule's weights need not sum to 1
        assert abs(sum(means) - 1.0) < 1e-5
    assert len(metrics["class_weights/logit"]) == 11  # 10 classes + background


@needs_fashion
def test_a_classifier_teacher_is_refused(tmp_path, det_teachers):
    classifier = create_model("resnet8", num_classes=10, in_channels=1)
    save_teacher(tmp_path / "cls", classifier, {"model": "resnet8", "num_classes": 10, "in_channels": 1,
                                                "input_shape": [1, SIZE, SIZE]})
    config = det_experiment(tmp_path, [det_teachers[0], str(tmp_path / "cls")], ["distill.strategy=aver"])
    with pytest.raises(PoolMismatchError, match="not a detector"):
        Session.build(config, LocalTeacherPool([load_teacher(d) for d in (det_teachers[0], tmp_path / "cls")]))


@needs_fashion
def test_detection_resumes_exactly(tmp_path, det_teachers, one_torch_thread):
    pool = LocalTeacherPool([load_teacher(d) for d in det_teachers])
    overrides = ["distill.strategy=mtkd_rl", "agent.rule=meta", "distill.units=object"]
    straight = Session.build(det_experiment(tmp_path / "a", det_teachers, overrides), pool)
    for _ in straight.epochs():
        straight.train_epoch()
    first = Session.build(det_experiment(tmp_path / "b", det_teachers, overrides), pool)
    first.train_epoch()
    first.save(tmp_path / "ckpt")
    second = Session.build(det_experiment(tmp_path / "b", det_teachers, overrides), pool)
    second.restore(tmp_path / "ckpt")
    for _ in second.epochs():
        second.train_epoch()
    a, b = straight.distiller.module.state_dict(), second.distiller.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_fashion
def test_a_detection_run_records_map_exports_its_student_and_eval_agrees(tmp_path, det_teachers, one_torch_thread):
    """The command's path: run folder, mAP in the metrics and the summary, an exported student that
    `mtkd eval` scores the same (mAP and loss)."""
    from mtkd.runner import run_inprocess
    from mtkd.teacher_training import evaluate_checkpoint

    config = det_experiment(tmp_path / "run", det_teachers, ["distill.strategy=camkd", "optim.epochs=1",
                                                             "distill.units=object"])
    summary = run_inprocess(config, progress=False)
    assert 0.0 <= summary["test_map"] <= 1.0 and summary["test_acc"] == summary["test_map"]
    recorded = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert recorded[-1]["test/map"] == summary["test_map"] and "test/map50" in recorded[-1]
    scored = evaluate_checkpoint(summary["student"], batch_size=8)
    assert scored["test_map"] == pytest.approx(summary["test_map"], abs=1e-6)
    assert scored["test_loss"] == pytest.approx(summary["history"][-1]["test/loss"], rel=1e-6)
    assert json.loads((Path(summary["student"]) / "meta.json").read_text())["task"] == "detection"


@needs_fashion
def test_train_teacher_trains_a_detector(tmp_path, one_torch_thread):
    from mtkd.config import TeacherTrainConfig
    from mtkd.teacher_training import train_teacher

    cfg = load_config(TeacherTrainConfig, None, [
        "model=centernet_resnet8", f"output_dir={tmp_path / 'teacher'}", "data.name=canvases_det",
        "data.batch_size=8", "optim.epochs=1", "threads=1", "device=cpu"])
    cfg.data.options = dict(OPTIONS)
    meta = train_teacher(cfg, progress=False)
    assert meta["task"] == "detection" and 0.0 <= meta["test_map"] <= 1.0
    assert load_teacher(tmp_path / "teacher").describe()["logit_size"] == (SIZE // 4, SIZE // 4)
