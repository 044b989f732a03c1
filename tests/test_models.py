"""The model zoo: every registered network honours the Outputs contract (docs/method.md §1)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mtkd.models import MODELS, ModelAdapter, Outputs, count_parameters, create_model, list_models
from mtkd.registry import UnknownNameError

NUM_CLASSES = 7
INPUTS = [(1, 28), (3, 32), (3, 16)]  # (in_channels, H = W): Fashion-MNIST, CIFAR, the smallest


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels, size", INPUTS)
def test_contract(name: str, in_channels: int, size: int):
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels)
    assert (model.num_classes, model.in_channels) == (NUM_CLASSES, in_channels)
    assert model.embedding_dim == model.feature_channels

    out = model(torch.randn(2, in_channels, size, size))

    assert isinstance(out, Outputs)
    assert out.logits.shape == (2, NUM_CLASSES)
    assert out.embedding.shape == (2, model.embedding_dim)
    assert out.feature.dim() == 4 and out.feature.shape[:2] == (2, model.feature_channels)
    assert min(out.feature.shape[2:]) >= 1
    torch.testing.assert_close(out.embedding, out.feature.mean((2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, model.classifier(out.embedding), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_backward_and_determinism(name: str):
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=1)
    out = model(torch.randn(2, 1, 28, 28))
    loss = out.logits.logsumexp(1).mean() + out.feature.pow(2).mean() + out.embedding.sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    torch.manual_seed(0)
    first = create_model(name, num_classes=NUM_CLASSES, in_channels=1).state_dict()
    torch.manual_seed(0)
    second = create_model(name, num_classes=NUM_CLASSES, in_channels=1).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name, expected", [("resnet56", 0.86e6), ("resnet32x4", 7.43e6)])
def test_parameter_counts(name: str, expected: float):
    assert count_parameters(create_model(name, num_classes=100)) == pytest.approx(expected, rel=0.03)


def test_list_models_filters():
    assert "resnet56" in list_models()
    assert list_models("wrn_*") == ["wrn_16_2", "wrn_28_4", "wrn_40_2"]
    assert set(list_models()) == set(MODELS.names())


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet56'") as info:
        create_model("resnet65")
    assert isinstance(info.value, ValueError) and "valid:" in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 1}, {"num_classes": 0}, {"num_classes": 2.5}, {"in_channels": 0}]
)
def test_bad_sizes_raise(kwargs: dict):
    with pytest.raises(ValueError, match="num_classes|in_channels"):
        create_model("resnet8", **kwargs)


def test_family_kwargs():
    wide = create_model("mobilenetv2", width_mult=1.0)
    assert count_parameters(wide) > count_parameters(create_model("mobilenetv2"))
    with pytest.raises(ValueError, match="net_size"):
        create_model("shufflenetv2", net_size=0.7)
    with pytest.raises(TypeError):
        create_model("resnet8", width_mult=2)


# ---- ModelAdapter ---------------------------------------------------------------------------


class TinyNet(nn.Module):
    """A hand-written classifier: body (Sequential of stages) -> pool -> fc."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, output: str = "tensor"):
        super().__init__()
        self.output = output
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        logits = self.fc(self.flat(self.pool(self.body(x))))
        if self.output == "tuple":
            return ("not a tensor", logits, logits * 2)
        if self.output == "dict":
            return {"aux": logits * 2, "logits": logits}
        if self.output == "str":
            return "nothing"
        return logits


@pytest.mark.parametrize("output", ["tensor", "tuple", "dict"])
def test_adapter_contract(output: str):
    net = TinyNet(in_channels=1, output=output)
    model = ModelAdapter(net, last_stage="body.1", classifier="fc")
    assert (model.num_classes, model.in_channels, model.feature_channels) == (5, 1, None)

    out = model(torch.randn(2, 1, 28, 28))

    assert out.logits.shape == (2, 5)
    assert out.feature.shape == (2, 16, 14, 14)
    assert (model.feature_channels, model.embedding_dim) == (16, 16)
    torch.testing.assert_close(out.embedding, out.feature.mean((2, 3)))
    torch.testing.assert_close(out.logits, model.classifier(out.embedding))
    (out.logits.sum() + out.feature.pow(2).mean()).backward()
    assert net.body[0][0].weight.grad is not None
    assert model._captured is None  # no tensor kept alive between calls


def test_adapter_infer_shapes_keeps_mode_and_stats():
    model = ModelAdapter(TinyNet(), last_stage="body")
    stats = model.module.body[1][1].running_mean.clone()
    model.infer_shapes(torch.randn(1, 3, 32, 32))
    assert model.training and (model.feature_channels, model.num_classes) == (16, 5)
    assert torch.equal(stats, model.module.body[1][1].running_mean)
    assert set(model.state_dict()) == {f"module.{k}" for k in TinyNet().state_dict()}


def test_adapter_unknown_names_list_close_matches():
    expected = r"unknown last_stage 'body\.2' in TinyNet; did you mean .*'body\.1'.*available submodules"
    with pytest.raises(ValueError, match=expected):
        ModelAdapter(TinyNet(), last_stage="body.2")
    with pytest.raises(ValueError, match="unknown classifier 'fc1'.*'fc'"):
        ModelAdapter(TinyNet(), last_stage="body", classifier="fc1")


def test_adapter_rejects_non_4d_feature_and_bad_outputs():
    with pytest.raises(ValueError, match=r"'flat'.*4-D.*\(2, 16\)"):
        ModelAdapter(TinyNet(), last_stage="flat")(torch.randn(2, 3, 16, 16))
    with pytest.raises(TypeError, match="cannot find logits"):
        ModelAdapter(TinyNet(output="str"), last_stage="body")(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="expected num_classes=9"):
        ModelAdapter(TinyNet(), last_stage="body", num_classes=9)(torch.randn(2, 3, 16, 16))


def test_import_pulls_no_ray_or_grpc():
    code = (
        "import sys, mtkd.models; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'grpc'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
