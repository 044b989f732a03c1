"""The detector family: registry, shapes, the heatmap prior, and a distillation step end to end."""
from __future__ import annotations

import math

import pytest
import torch

from mtkd.detection.boxes import pack_targets
from mtkd.detection.encode import encode_centernet
from mtkd.detection.losses import centernet_loss, heatmap_kd, pkd_loss, regression_kd
from mtkd.detection.models import create_det_model, list_det_models, split_logits
from mtkd.distill.projector import build_projectors
from mtkd.registry import UnknownNameError

SMALL = ["centernet_resnet8", "centernet_resnet20", "centernet_wrn_16_2", "centernet_vgg8", "centernet_shufflenetv2",
         "centernet_mobilenetv2"]


def test_registry_has_the_family():
    names = list_det_models()
    assert set(SMALL) <= set(names)
    assert {f"centernet_resnet{d}_fpn" for d in (18, 34, 50, 101)} <= set(names)
    with pytest.raises(UnknownNameError, match="centernet_resnet20"):
        create_det_model("centernet_resnet_20")


@pytest.mark.parametrize("name", SMALL)
def test_small_detectors_on_48px_canvases(name, one_torch_thread):
    torch.manual_seed(0)
    model = create_det_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 48, 48))
    d = model.feature_channels
    assert out.logits.shape == (2, 14, 12, 12) and out.feature.shape == (2, d, 12, 12) and out.embedding.shape == (2, d)
    assert model.output_stride == model.feature_stride == 4
    maps = split_logits(out.logits)
    assert maps.heatmap.shape == (2, 10, 12, 12) and maps.size.shape == maps.offset.shape == (2, 2, 12, 12)
    # CenterNet's prior: every cell starts near probability 0.1
    assert abs(float(maps.heatmap.sigmoid().mean()) - 0.1) < 0.03
    assert torch.allclose(out.embedding, out.feature.mean(dim=(2, 3)))


def test_student_is_smaller_than_every_teacher():
    counts = {n: sum(p.numel() for p in create_det_model(n, 10, 1).parameters()) for n in SMALL}
    assert all(counts["centernet_resnet8"] * 3 < c for n, c in counts.items() if n != "centernet_resnet8")


def test_odd_input_size_gives_ceil_maps(one_torch_thread):
    model = create_det_model("centernet_vgg8", num_classes=3, in_channels=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 50, 45))
    assert out.logits.shape == (1, 7, 13, 12)


def test_gpu_recipe_models_take_a_distillation_step(one_torch_thread):
    """ResNet-50-FPN teacher -> ResNet-18-FPN student on a synthetic 64 px batch: every loss term
    reaches the student and its projector."""
    torch.manual_seed(0)
    teacher = create_det_model("centernet_resnet50_fpn", num_classes=5).eval()
    student = create_det_model("centernet_resnet18_fpn", num_classes=5)
    images = torch.randn(2, 3, 64, 64)
    targets = pack_targets([torch.tensor([[4.0, 6, 30, 40], [30, 30, 60, 62]]), torch.tensor([[10.0, 10, 20, 50]])],
                           [torch.tensor([0, 4]), torch.tensor([2])])
    with torch.no_grad():
        t_out = teacher(images)
    s_out = student(images)
    assert s_out.logits.shape == t_out.logits.shape == (2, 9, 16, 16)
    projector = build_projectors(student.feature_channels, [tuple(t_out.feature.shape[1:])])[0]
    enc = encode_centernet(targets, 5, 4, (16, 16))
    task = centernet_loss(s_out.logits, enc)
    kd = heatmap_kd(s_out.logits, t_out.logits, 2.0, enc.owner, 2)
    reg, _ = regression_kd(s_out.logits, t_out.logits, enc)
    feat = pkd_loss(projector(s_out.feature), t_out.feature, enc.owner, 2, fg_share=0.5)
    loss = (task.per_image + kd.per_image + reg + feat.per_image).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)
    assert projector.conv.weight.grad.abs().sum() > 0
    assert math.isclose(sum(p.numel() for p in student.backbone.parameters()), 11_176_512, rel_tol=0.01)
