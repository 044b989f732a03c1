"""The inference-only rewrites of teachers (mtkd.models.fold, Teacher's defaults): batch-norm folding
keeps fp32 results within 1e-5 relative, storing conv/linear weights in the autocast dtype changes no
bit, fp32 teachers stay exactly the reference computation, and the caller's model is left alone."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtkd.devices import resolve_precision, runs_faster
from mtkd.models import create_model, list_models
from mtkd.models.fold import fold_batchnorm, store_low_precision_weights
from mtkd.teachers import Teacher

CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_looking(name: str, seed: int = 0) -> nn.Module:
    """A zoo model in eval mode whose batch-norms have non-trivial statistics and affine parameters
    (freshly initialised ones are the identity map, which would make folding trivially exact)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=CLASSES).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.2, 3.0)
                module.weight.uniform_(0.3, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def meta(name: str) -> dict:
    return {"model": name, "num_classes": CLASSES, "input_shape": [3, 32, 32], "weights_digest": "d"}


@pytest.mark.parametrize("name", list_models())
def test_folding_keeps_fp32_outputs_within_1e5(name):
    model = trained_looking(name)
    folded = copy.deepcopy(model)
    count = fold_batchnorm(folded)
    assert count > 0
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    if not name.startswith("wrn"):  # wide ResNets keep their pre-activation batch-norms (ReLU in between)
        assert remaining == 0, remaining
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference, result = model(images), folded(images)
    for field, a, b in zip(reference._fields, result, reference):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert relative_error(a, b) < 1e-5, (name, field, relative_error(a, b))


def test_folding_skips_hooked_and_training_batchnorms():
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    hooked[1].register_forward_hook(lambda *args: None)
    assert fold_batchnorm(hooked) == 0 and isinstance(hooked[1], nn.BatchNorm2d)
    training = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorm(training) == 0
    separated = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(separated) == 0


@pytest.mark.parametrize("name", ["regnety_400mf", "wrn_16_2", "resnet8x4"])
def test_low_precision_weights_are_bit_identical_under_autocast(name):
    model = trained_looking(name).to(memory_format=torch.channels_last)
    fold_batchnorm(model)
    stored = copy.deepcopy(model)
    store_low_precision_weights(stored, torch.bfloat16)
    assert all(m.weight.dtype == torch.bfloat16 for m in stored.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert all(m.weight.dtype == torch.float32 for m in stored.modules() if isinstance(m, nn.BatchNorm2d))
    images = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, result = model(images), stored(images)
    for a, b in zip(result, reference):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)


def test_fp32_teacher_is_the_reference_computation():
    model = trained_looking("wrn_16_2")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
    teacher = Teacher(model, meta("wrn_16_2"))
    assert not teacher.fold_batchnorm and not teacher.channels_last
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.model.modules()) == 13  # none folded
    out = teacher.infer_raw(images)
    for a, b in zip(out, reference):
        assert torch.equal(a, b)
    assert teacher.describe()["numerics"].startswith("cpu-fp32-torch")


def test_folded_fp32_teacher_within_1e5_and_tagged():
    model = trained_looking("regnetx_200mf")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
    teacher = Teacher(model, meta("regnetx_200mf"), fold_batchnorm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the caller's model was changed"
    for a, b in zip(teacher.infer_raw(images), reference):
        assert relative_error(a, b) < 1e-5
    assert "-foldbn-" in teacher.describe()["numerics"]


@pytest.mark.parametrize("channels_last", [None, True, False])
def test_reduced_precision_teacher(channels_last):
    model = trained_looking("resnet8x4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = Teacher(model, meta("resnet8x4"), precision="bf16", channels_last=channels_last)
    # the caller's model is untouched: same layers, dtypes and values
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert teacher.fold_batchnorm and not any(isinstance(m, nn.BatchNorm2d) for m in teacher.model.modules())
    expect_cl = channels_last is not False
    assert teacher.channels_last is expect_cl
    conv = next(m for m in teacher.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.dtype == torch.bfloat16
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is expect_cl
    images = torch.randn(2, 3, 32, 32)
    raw = teacher.infer_raw(images)
    assert all(t.dtype == torch.bfloat16 for t in raw)
    with torch.no_grad():
        reference = model(images)
    for a, b in zip(raw, reference):  # bf16 is close to fp32, not equal
        assert relative_error(a, b) < 0.1
    numerics = teacher.describe()["numerics"]
    assert numerics.startswith("cpu-bf16-foldbn") and (("-nchw-" in numerics) is (not expect_cl))


def test_auto_precision_is_bf16_only_where_it_is_faster():
    amx = bool(torch.cpu.get_capabilities().get("amx_bf16"))
    assert runs_faster("cpu", "bf16") is amx and not runs_faster("cpu", "fp32")
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if amx else "fp32")
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # explicit bf16 is kept
