"""The task layer: segmentation on the one engine path, per image and per region, every strategy and
rule, checked against independent computations (classification's exactness is held by the engine,
parity and resume tests, unchanged)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtkd.config import ConfigError, ExperimentConfig
from mtkd.config_loader import load_config
from mtkd.distill.meta import consensus_gradient, hypergradient, kd_logit_gradient, meta_direction
from mtkd.distill.strategies import STRATEGIES, per_unit_mean
from mtkd.models import Outputs, create_model
from mtkd.session import Session
from mtkd.tasks import SegmentationTask, dataset_task, model_registry
from mtkd.tasks.segmentation import cell_ids
from mtkd.teachers import LocalTeacherPool, load_teacher

from conftest import seg_experiment  # noqa: E402  (the seg_teachers fixture is there too)

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
T = 4.0


def test_per_unit_mean_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(20, 3, generator=g)
    unit = torch.randint(0, 6, (20,), generator=g)
    unit[unit == 4] = 5  # unit 4 has no row: 0
    got = per_unit_mean(values, unit, 6)
    for u in range(6):
        rows = values[unit == u]
        expected = rows.mean(0) if len(rows) else torch.zeros(3)
        assert torch.allclose(got[u], expected, atol=1e-6)
    assert per_unit_mean(values, None, None) is values


def test_cell_ids_follow_the_per_cell_partition():
    ids = cell_ids(7, 5, 2)
    # rows 0..2 -> cell row 0 (floor(7/2) = 3), rows 3..6 -> 1; columns 0..1 -> 0, 2..4 -> 1
    assert ids[2, 1].item() == 0 and ids[3, 1].item() == 2 and ids[0, 2].item() == 1 and ids[6, 4].item() == 3


def _dense_batch(seed=0, batch=2, classes=4, h=4, w=4, teachers=2, ignore=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch, 2 * h, 2 * w), generator=g)  # labels at twice the logit size
    if ignore:
        labels[0, :3, :5] = 255
        labels[1] = 255  # image 1 has no valid pixel in a corner cell only after the next line
        labels[1, 4:, :] = torch.randint(0, classes, (2 * h - 4, 2 * w), generator=g)
    feature = torch.randn(batch, 5, h, w, generator=g)
    student = Outputs(torch.randn(batch, classes, h, w, generator=g), feature.mean((2, 3)), feature)
    outs = [Outputs(torch.randn(batch, classes, h // (1 + m % 2), w // (1 + m % 2), generator=g) * 3,
                    torch.randn(batch, 6), torch.randn(batch, 6, h, w, generator=g)) for m in range(teachers)]
    return student, outs, labels


@pytest.mark.parametrize("grid", [0, 2])
def test_camkd_and_ebkd_score_each_unit_by_its_pixels(grid):
    """Independent loop: per unit, the mean over its valid logit-grid pixels of each teacher's pixel CE
    (entropy), teacher logits resized bilinearly to the student's grid, labels nearest-sampled."""
    student, teachers, labels = _dense_batch()
    task = SegmentationTask(num_classes=4, region_grid=grid)
    inputs = task.step_inputs(student, teachers, labels, None, False, T)
    h, w = student.logits.shape[-2:]
    small = labels[:, ::2, ::2]  # nearest sampling at stride 2
    resized = [F.interpolate(t.logits, size=(h, w), mode="bilinear", align_corners=False) for t in teachers]
    units = [(b, None) for b in range(2)] if not grid else [(b, c) for b in range(2) for c in range(grid * grid)]
    cells = cell_ids(h, w, max(grid, 1))
    expected_ce, expected_h = torch.zeros(len(units), 2), torch.zeros(len(units), 2)
    for u, (b, c) in enumerate(units):
        for m, z in enumerate(resized):
            ce, ent = [], []
            for y in range(h):
                for x in range(w):
                    if small[b, y, x] == 255 or (c is not None and cells[y, x] != c):
                        continue
                    logp = F.log_softmax(z[b, :, y, x], 0)
                    ce.append(-logp[small[b, y, x]])
                    ent.append(-(logp.exp() * logp).sum())
            expected_ce[u, m] = torch.stack(ce).mean() if ce else 0.0
            expected_h[u, m] = torch.stack(ent).mean() if ent else 0.0
    invert = lambda v: (1 - torch.softmax(v, 1)) / (v.shape[1] - 1)  # noqa: E731
    camkd = STRATEGIES.get("camkd")().weights(inputs)
    ebkd = STRATEGIES.get("ebkd")().weights(inputs)
    assert camkd.logit.shape == (len(units), 2)
    assert torch.allclose(camkd.logit, invert(expected_ce), atol=1e-5)
    assert torch.allclose(ebkd.logit, invert(expected_h), atol=1e-5)
    assert torch.allclose(STRATEGIES.get("aver")().weights(inputs).logit, torch.full((len(units), 2), 0.5))


def test_dense_meta_hypergradient_is_the_derivative_through_one_update():
    """Per-image units: the meta rule's ``h`` times ``lr / B`` is d(meta loss)/d(weight) through one SGD
    step of a per-pixel linear classifier on fixed features (the closed form's first-order term)."""
    torch.manual_seed(0)
    classes, dim, h, w, lr, batch = 4, 5, 4, 4, 0.3, 2
    weight = torch.randn(classes, dim) * 0.3
    bias = torch.randn(classes) * 0.1

    def logits_of(feature, W, c):  # 1x1 conv
        return torch.einsum("kd,bdhw->bkhw", W, feature) + c[None, :, None, None]

    def batch_of(seed):
        g = torch.Generator().manual_seed(seed)
        feature = torch.randn(batch, dim, h, w, generator=g)
        labels = torch.randint(0, classes, (batch, h, w), generator=g)
        labels[0, 0, :3] = 255
        teachers = [torch.randn(batch, classes, h, w, generator=g) * 2 for _ in range(2)]
        return feature, labels, teachers

    feature, labels, teacher_logits = batch_of(1)
    meta_feature, meta_labels, meta_teachers = batch_of(2)
    task = SegmentationTask(num_classes=classes)
    as_outputs = lambda z, f: Outputs(z, f.mean((2, 3)), f)  # noqa: E731
    student = as_outputs(logits_of(feature, weight, bias), feature)
    teachers = [as_outputs(z, feature) for z in teacher_logits]
    inputs = task.step_inputs(student, teachers, labels, None, False, T)
    # autograd through one step
    unit_weights = torch.full((batch, 2), 0.5, requires_grad=True)
    W, c = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    valid = labels != 255
    z = logits_of(feature, W, c)
    per_image = []
    for t in teacher_logits:
        kl = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(z / T, 1))).sum(1) * T * T
        per_image.append(torch.stack([kl[b][valid[b]].mean() for b in range(batch)]))
    loss = (unit_weights * torch.stack(per_image, 1)).mean(0).sum()
    gW, gc = torch.autograd.grad(loss, (W, c), create_graph=True)
    W1, c1 = W - lr * gW, c - lr * gc  # the updated classifier: the meta batch is scored by it
    meta_inputs = task.step_inputs(as_outputs(logits_of(meta_feature, W1.detach(), c1.detach()), meta_feature),
                                   [as_outputs(z, meta_feature) for z in meta_teachers], meta_labels, None, False, T)
    # closed form, as MetaAgent computes it
    delta = kd_logit_gradient(inputs.student_logits, inputs.teacher_logits, T)
    gradient = consensus_gradient(meta_inputs.student_logits, meta_inputs.targets, meta_inputs.teacher_logits, T)
    direction = meta_direction(inputs.student_embedding, meta_inputs.student_embedding, gradient)
    h_units = per_unit_mean(hypergradient(delta, direction), inputs.unit_of_row, inputs.num_units)  # [B, M]
    z_meta = logits_of(meta_feature, W1, c1).permute(0, 2, 3, 1).reshape(-1, classes)
    keep = (meta_labels != 255).flatten()
    z_meta, y_meta = z_meta[keep], meta_labels.flatten()[keep]
    soft = torch.stack([F.softmax(t.permute(0, 2, 3, 1).reshape(-1, classes)[keep] / T, 1) for t in meta_teachers], 1)
    right = torch.stack([t.permute(0, 2, 3, 1).reshape(-1, classes)[keep].argmax(1) == y_meta
                         for t in meta_teachers], 1).float()
    count = right.sum(1, keepdim=True)
    q = (right[:, :, None] * soft).sum(1) / count.clamp(min=1)
    kl_meta = (q * (torch.log(q.clamp(min=1e-30)) - F.log_softmax(z_meta / T, 1))).sum(1) * T * T
    meta_loss = (kl_meta * (count[:, 0] > 0)).mean()
    expected = torch.autograd.grad(meta_loss, unit_weights)[0]
    assert torch.allclose(lr / batch * h_units, expected, rtol=1e-3, atol=1e-7)


def test_meta_direction_orders_agree():
    g = torch.Generator().manual_seed(3)
    e, e_meta, grad = torch.randn(1100, 8, generator=g), torch.randn(1000, 8, generator=g), torch.randn(1000, 5, generator=g)
    pairwise = (e @ e_meta.T + 1.0) @ grad / 1000
    assert torch.allclose(meta_direction(e, e_meta, grad), pairwise, atol=1e-5)  # 1.1M pairs: the other order


def test_dataset_task_and_model_registry():
    assert dataset_task("canvases") == "segmentation" and dataset_task("fashion_mnist") == "classification"
    assert "fcn_resnet8" in model_registry("canvases") and "resnet8" in model_registry("fashion_mnist")
    with pytest.raises(ConfigError, match="student"):
        load_config(ExperimentConfig, None, ["data.name=canvases", "student=resnet8"])
    with pytest.raises(ConfigError, match="region_grid"):
        load_config(ExperimentConfig, None, ["distill.region_grid=4"])


# ------------------------------------------------------------------------- the engine, end to end
@pytest.mark.parametrize("strategy, rule, grid", [  # camkd per region: the run folder test below
    ("aver", "meta", 0), ("ebkd", "meta", 2), ("mtkd_rl", "meta", 0), ("mtkd_rl", "meta", 2),
    ("mtkd_rl", "reference", 2), ("mtkd_rl", "reinforce", 0),
])
def test_segmentation_trains_with_every_strategy(tmp_path, seg_teachers, one_torch_thread, strategy, rule, grid):
    config = seg_experiment(tmp_path, seg_teachers, [f"distill.strategy={strategy}", f"agent.rule={rule}",
                                                     f"distill.region_grid={grid}"])
    session = Session.build(config, LocalTeacherPool([load_teacher(d) for d in seg_teachers]))
    for _ in session.epochs():
        metrics = session.train_epoch()
    assert 0.0 <= metrics["test/miou"] <= 1.0 and 0.0 <= metrics["test/acc"] <= 1.0
    assert all(math.isfinite(metrics[k]) for k in ("loss/total", "loss/kd", "loss/feature", "test/loss"))
    means = [metrics[f"weights/logit/{t.name}"] for t in session.distiller.pool.teachers]
    assert abs(sum(means) - (1.0 if strategy != "mtkd_rl" or rule != "reference" else sum(means))) < 1e-5
    assert len(metrics["class_weights/logit"]) == 11


@pytest.mark.parametrize("grid", [0, 2])
def test_channel_wise_distillation_trains_per_image_and_per_region(tmp_path, seg_teachers, one_torch_thread, grid):
    config = seg_experiment(tmp_path, seg_teachers, ["distill.strategy=mtkd_rl", "distill.dense_kd=cwd",
                                                     f"distill.region_grid={grid}", "optim.epochs=1",
                                                     "distill.warmup_epochs=0"])
    session = Session.build(config, LocalTeacherPool([load_teacher(d) for d in seg_teachers]))
    assert session.distiller.task.logit_kd == "cwd"
    metrics = session.train_epoch()
    assert math.isfinite(metrics["loss/kd"]) and metrics["loss/kd"] > 0
    with pytest.raises(ConfigError, match="dense_kd"):
        load_config(ExperimentConfig, None, ["distill.dense_kd=cwd"])  # classification data


def test_segmentation_resumes_exactly(tmp_path, seg_teachers, one_torch_thread):
    """Train 2 epochs; or 1, checkpoint, a new session restores it and trains the second: equal weights."""
    pool = LocalTeacherPool([load_teacher(d) for d in seg_teachers])
    overrides = ["distill.strategy=mtkd_rl", "agent.rule=meta", "distill.region_grid=2"]
    straight = Session.build(seg_experiment(tmp_path / "a", seg_teachers, overrides), pool)
    for _ in straight.epochs():
        straight.train_epoch()
    first = Session.build(seg_experiment(tmp_path / "b", seg_teachers, overrides), pool)
    first.train_epoch()
    first.save(tmp_path / "ckpt")
    second = Session.build(seg_experiment(tmp_path / "b", seg_teachers, overrides), pool)
    second.restore(tmp_path / "ckpt")
    for _ in second.epochs():
        second.train_epoch()
    a, b = straight.distiller.module.state_dict(), second.distiller.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_segmentation_run_records_miou_exports_its_student_and_draws_masks(tmp_path, seg_teachers, one_torch_thread):
    """The command's path: run folder, mIoU in the summary, an exported student that `mtkd eval` scores
    the same, through the cache of dense teacher outputs; and the demo's picture of masks."""
    from mtkd.cache import MemoryStore
    from mtkd.plot import plot_segmentation_examples
    from mtkd.runner import run_inprocess
    from mtkd.teacher_training import evaluate_checkpoint

    config = seg_experiment(tmp_path / "run", seg_teachers, ["distill.strategy=camkd", "optim.epochs=1",
                                                             "distill.region_grid=2"])
    store = MemoryStore()
    summary = run_inprocess(config, progress=False, store=store)
    assert 0.0 <= summary["test_miou"] <= 1.0 and store.values  # dense teacher outputs went through the cache
    scored = evaluate_checkpoint(summary["student"], batch_size=8)
    assert scored["test_miou"] == pytest.approx(summary["test_miou"], abs=1e-6)
    masks = torch.randint(0, 11, (2, 16, 16))
    plot_segmentation_examples(torch.rand(2, 16, 16), masks, {"teacher": masks, "student": masks},
                               [f"c{k}" for k in range(11)], tmp_path / "masks.png", title="t")
    assert (tmp_path / "masks.png").stat().st_size > 1000
