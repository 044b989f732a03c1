"""Segmentation networks: every registered one honours the DenseOutputs contract."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mtkd.models import count_parameters, list_models
from mtkd.models.segmentation import (
    ASPP,
    SEG_MODELS,
    DenseOutputs,
    ImageNetResNet,
    ZooBackbone,
    build_seg_model,
    create_seg_model,
    list_seg_models,
    upsample_logits,
)
from mtkd.registry import UnknownNameError

NUM_CLASSES = 11
IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101")
# backbone -> (stride of `feature`); LR-ASPP's logits are at half of it, the others' at it.
FEATURE_STRIDE = {
    "resnet8": 4, "resnet20": 4, "resnet56": 4, "resnet8x4": 4, "resnet32x4": 4, "wrn_16_2": 4, "wrn_40_2": 4,
    "vgg8": 8, "vgg13": 8, "shufflenetv2": 8, "mobilenetv2": 8, **{name: 8 for name in IMAGENET},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _split(name: str) -> tuple[str, str]:
    head, backbone = name.split("_", 1)
    return head, backbone


@pytest.mark.parametrize("name", list_seg_models())
def test_contract_stride_and_gradients(name: str):
    head, backbone = _split(name)
    imagenet = backbone in IMAGENET
    model = create_seg_model(name, num_classes=NUM_CLASSES, in_channels=1)
    assert (model.num_classes, model.in_channels) == (NUM_CLASSES, 1)
    assert model.feature_stride == FEATURE_STRIDE[backbone]
    assert model.output_stride == model.feature_stride // (2 if head == "lraspp" else 1)
    # ImageNet-style: one odd-sized image (eval mode: ASPP's pooled BatchNorm needs 2 to train).
    batch, size = (1, 65) if imagenet else (2, 32)
    if imagenet:
        model.eval()

    out = model(torch.randn(batch, 1, size, size))

    assert isinstance(out, DenseOutputs)
    side = -(-size // model.output_stride)
    assert out.logits.shape == (batch, NUM_CLASSES, side, side)
    fside = -(-size // model.feature_stride)
    assert out.feature.shape == (batch, model.feature_channels, fside, fside)
    assert model.embedding_dim == model.feature_channels
    assert out.embedding.shape == (batch, model.embedding_dim)
    torch.testing.assert_close(out.embedding, out.feature.mean((2, 3)))

    loss = upsample_logits(out.logits, (size, size)).logsumexp(1).mean() + out.embedding.pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


CHEAP_TO_BUILD = [n for n in list_seg_models() if _split(n)[1] not in ("resnet50", "resnet101")]


@pytest.mark.parametrize("name", CHEAP_TO_BUILD)
def test_deterministic_init(name: str):
    torch.manual_seed(3)
    first = create_seg_model(name, num_classes=NUM_CLASSES, in_channels=1).state_dict()
    torch.manual_seed(3)
    second = create_seg_model(name, num_classes=NUM_CLASSES, in_channels=1).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_registry_is_apart_from_the_classifiers():
    assert {"fcn_resnet8", "deeplabv3_resnet20", "deeplabv3_vgg8", "lraspp_mobilenetv2", "deeplabv3_wrn_16_2",
            "deeplabv3_resnet8", "deeplabv3_resnet18", "deeplabv3_resnet101"} <= set(list_seg_models())
    assert not set(list_seg_models()) & set(list_models())
    assert list_seg_models("lraspp_*") == ["lraspp_mobilenetv2", "lraspp_shufflenetv2"]
    assert set(list_seg_models()) == set(SEG_MODELS.names())


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean .*'deeplabv3_resnet20'") as info:
        create_seg_model("deeplabv3_resnt20")
    assert isinstance(info.value, ValueError) and "valid:" in str(info.value)
    with pytest.raises(ValueError, match="unknown segmentation head"):
        build_seg_model("pspnet", "resnet20")
    with pytest.raises(UnknownNameError, match="unknown model 'resnet21'"):
        build_seg_model("fcn", "resnet21")


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 1}, {"num_classes": 0}, {"num_classes": 2.5}, {"num_classes": True}, {"in_channels": 0}],
)
def test_bad_sizes_raise(kwargs: dict):
    with pytest.raises(ValueError, match="num_classes|in_channels"):
        create_seg_model("fcn_resnet8", **kwargs)


def test_aspp_rates_and_widths():
    model = create_seg_model(
        "deeplabv3_resnet20", num_classes=NUM_CLASSES, atrous_rates=(3, 5, 7), head_channels=32
    )
    aspp = model.head.aspp
    assert isinstance(aspp, ASPP) and aspp.rates == (3, 5, 7) and len(aspp.convs) == 5
    assert aspp.convs[0][0].kernel_size == (1, 1)
    for branch, rate in zip(aspp.convs[1:4], (3, 5, 7)):
        conv = branch[0]
        assert (conv.kernel_size, conv.dilation, conv.padding) == ((3, 3), (rate, rate), (rate, rate))
        assert conv.out_channels == 32
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, NUM_CLASSES, 8, 8)
    # Defaults: the paper's 12/24/36 on ImageNet ResNets at stride 8, 2/4/6 on the CIFAR ones at stride 4.
    assert create_seg_model("deeplabv3_resnet18").head.aspp.rates == (12, 24, 36)
    assert create_seg_model("deeplabv3_resnet8").head.aspp.rates == (2, 4, 6)
    for bad in [(), (0, 2), (2.0, 4)]:
        with pytest.raises(ValueError, match="atrous rates"):
            create_seg_model("deeplabv3_resnet8", atrous_rates=bad)


def test_aspp_pooling_refuses_a_training_batch_of_one():
    model = create_seg_model("deeplabv3_resnet8", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="at least 2 images"):
        model(torch.randn(1, 3, 32, 32))
    assert model.eval()(torch.randn(1, 3, 32, 32)).logits.shape == (1, NUM_CLASSES, 8, 8)


def test_upsample_logits_recovers_the_input_size():
    logits = torch.randn(2, NUM_CLASSES, 8, 8)
    images = torch.randn(2, 1, 64, 60)
    assert upsample_logits(logits, (64, 60)).shape == (2, NUM_CLASSES, 64, 60)
    assert upsample_logits(logits, images).shape == (2, NUM_CLASSES, 64, 60)
    assert upsample_logits(logits, torch.zeros(2, 33, 31, dtype=torch.long)).shape == (2, NUM_CLASSES, 33, 31)
    assert upsample_logits(logits, (8, 8)) is logits
    constant = torch.full((1, 3, 4, 4), 2.5)  # bilinear keeps a constant map constant
    torch.testing.assert_close(upsample_logits(constant, (16, 16)), torch.full((1, 3, 16, 16), 2.5))
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        upsample_logits(torch.randn(2, 3, 4), (8, 8))
    with pytest.raises(ValueError, match="size must be"):
        upsample_logits(logits, (64,))


def test_model_logits_upsample_back_to_the_input():
    model = create_seg_model("lraspp_mobilenetv2", num_classes=NUM_CLASSES, in_channels=1)
    images = torch.randn(2, 1, 64, 64)
    out = model(images)
    assert out.logits.shape[-2:] == (16, 16) and out.feature.shape[-2:] == (8, 8)
    assert upsample_logits(out.logits, images).shape == (2, NUM_CLASSES, 64, 64)


def test_imagenet_resnets_match_torchvision():
    # torchvision's resnetNN minus its fc (513,000 / 2,049,000 parameters).
    expected = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160}
    for depth, count in expected.items():
        assert count_parameters(ImageNetResNet(depth)) == count
    # torchvision's deeplabv3_resnet101 (60,996,202) minus its auxiliary FCN head (2,365,205).
    assert count_parameters(create_seg_model("deeplabv3_resnet101", num_classes=21)) == 58_630_997
    backbone = ImageNetResNet(50, output_stride=8)
    first = [backbone.layer2[0].conv2, backbone.layer3[0].conv2, backbone.layer4[0].conv2]
    assert [c.stride for c in first] == [(2, 2), (1, 1), (1, 1)]
    # A stage's first block keeps the dilation reached before the stage.
    assert [c.dilation for c in first] == [(1, 1), (1, 1), (2, 2)]
    assert [backbone.layer3[1].conv2.dilation, backbone.layer4[1].conv2.dilation] == [(2, 2), (4, 4)]
    keys = set(backbone.state_dict())  # torchvision's names
    assert {"conv1.weight", "layer4.2.bn3.running_var", "layer1.0.downsample.0.weight"} <= keys
    with pytest.raises(ValueError, match="depth"):
        ImageNetResNet(152)
    with pytest.raises(ValueError, match="output_stride"):
        ImageNetResNet(18, output_stride=4)


@pytest.mark.parametrize("output_stride, side", [(16, 2), (32, 1)])
def test_imagenet_resnet_other_strides(output_stride: int, side: int):
    model = create_seg_model("deeplabv3_resnet18", num_classes=NUM_CLASSES, output_stride=output_stride)
    model.eval()
    assert model.output_stride == output_stride
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, NUM_CLASSES, side, side)


def test_zoo_backbone_dilation():
    native = ZooBackbone("mobilenetv2")
    assert (native.output_stride, native.low_stride, native.low_channels) == (16, 8, 48)
    dilated = ZooBackbone("mobilenetv2", output_stride=8)
    assert (dilated.output_stride, dilated.low_stride, dilated.low_channels) == (8, 4, 16)
    assert count_parameters(dilated) == count_parameters(native)
    convs = [m for m in dilated.stages[5].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs[0].stride == (1, 1) and convs[0].dilation == (1, 1) and convs[1].dilation == (2, 2)
    # A CIFAR ResNet at stride 2: its last stage dilated, the map twice as large.
    model = create_seg_model("fcn_resnet20", num_classes=NUM_CLASSES, output_stride=2)
    assert model.output_stride == 2
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, NUM_CLASSES, 16, 16)
    assert ZooBackbone("mobilenetv2", width_mult=1.5).out_channels == 1920
    for bad in (3, 8, 0):
        with pytest.raises(ValueError, match="output_stride"):
            create_seg_model("fcn_resnet20", output_stride=bad)
    with pytest.raises(ValueError, match="MaxPool2d"):
        ZooBackbone("vgg8", output_stride=4)
    with pytest.raises(TypeError):
        create_seg_model("lraspp_mobilenetv2", atrous_rates=(1, 2, 3))
