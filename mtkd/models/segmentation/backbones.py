"""Backbones for dense prediction: networks cut before their pooling and classifier.

Every backbone maps ``[B, in_channels, H, W]`` images to :class:`BackboneFeatures` ``(low, high)``:

- ``high`` ``[B, out_channels, H / output_stride, W / output_stride]``: the last feature map (the
  one the zoo network would have pooled);
- ``low``  ``[B, low_channels, H / low_stride, W / low_stride]``: the output of the last stage whose
  stride is below ``output_stride`` (the skip the LR-ASPP head reads; unused by FCN and DeepLabV3).

Two kinds:

- :class:`ZooBackbone`: any CIFAR-style network of :mod:`mtkd.models` (``stem -> stages -> head``
  of :class:`~mtkd.models._base.ClassifierNet`) without its classifier. Their stems keep full
  resolution, so the strides are small: 4 for the ResNets, WRNs and RegNets, 8 for VGG and
  ShuffleNetV2, 16 for MobileNetV2 (whose stem has stride 2). ``output_stride`` below the native one
  turns the last strides into dilation (as DeepLab does).
- :class:`ImageNetResNet`: the ImageNet ResNet-18/34/50/101 (7x7 stride-2 stem, 3x3 max-pool, four
  stages) with torchvision's ``replace_stride_with_dilation``; output stride 8 by default (the
  DeepLabV3 setting), 16 or 32 on request. Parameter names follow torchvision's ``resnetNN`` (minus
  ``fc``), so its ImageNet weights load with ``load_state_dict(..., strict=False)`` where a copy
  exists; nothing here downloads.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from mtkd.models._base import ClassifierNet, init_weights
from mtkd.models._factory import MODELS


class BackboneFeatures(NamedTuple):
    """The two maps a backbone returns.

    Attributes:
        low: ``[B, low_channels, H / low_stride, W / low_stride]``, an early, high-resolution map.
        high: ``[B, out_channels, H / output_stride, W / output_stride]``, the last feature map.
    """

    low: torch.Tensor
    high: torch.Tensor


class SegBackbone(nn.Module):
    """Base of the backbones. Subclasses set the attributes below and implement ``forward``.

    Attributes:
        in_channels: channels of the input images.
        out_channels: channels of ``high``.
        output_stride: input pixels per ``high`` pixel along each axis.
        low_channels: channels of ``low``.
        low_stride: input pixels per ``low`` pixel along each axis.
    """

    in_channels: int
    out_channels: int
    output_stride: int
    low_channels: int
    low_stride: int

    def forward(self, x: torch.Tensor) -> BackboneFeatures:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_output_stride(output_stride: int | None, allowed: Sequence[int], where: str) -> None:
    if output_stride is not None and output_stride not in allowed:
        raise ValueError(f"{where}: output_stride must be one of {sorted(allowed)}; got {output_stride!r}")


# ---- CIFAR-style networks of the zoo -------------------------------------------------------------


def dilate_stage(stage: nn.Module, dilation_in: int, dilation_out: int) -> None:
    """Replace a stage's down-sampling by dilation, in place (DeepLab's "atrous" trick).

    Every strided ``nn.Conv2d`` gets stride 1 and keeps seeing the input at ``dilation_in`` (the
    dilation reached before this stage); every other conv larger than 1x1 gets ``dilation_out``.
    Padding becomes ``dilation * (kernel // 2)`` so the map keeps its size.

    Raises:
        ValueError: if the stage down-samples with a pooling layer (it cannot be dilated).
    """
    for module in stage.modules():
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and module.stride not in (1, (1, 1)):
            raise ValueError(f"cannot dilate a stage that down-samples with {type(module).__name__}")
        if not isinstance(module, nn.Conv2d):
            continue
        strided = module.stride != (1, 1)
        module.stride = (1, 1)
        if module.kernel_size == (1, 1):
            continue
        dilation = dilation_in if strided else dilation_out
        module.dilation = (dilation, dilation)
        module.padding = (dilation * (module.kernel_size[0] // 2), dilation * (module.kernel_size[1] // 2))


class ZooBackbone(SegBackbone):
    """A zoo classifier (``stem -> stages -> head``) without its pooling and classifier.

    The channels and strides of its stages are measured once with a ``32 x 32`` dry run in eval mode
    (no statistics change), so every family and family option works. ``low`` is the output of the
    last stage whose stride is below ``output_stride``.

    Args:
        name: a name of :func:`mtkd.models.list_models`, e.g. ``"resnet20"``.
        in_channels: channels of the input images.
        output_stride: ``None`` for the network's native stride, else a smaller power of two: the
            stages that would exceed it are dilated (:func:`dilate_stage`).
        **kwargs: the family's options (``width_mult`` for ``mobilenetv2``...).

    Shapes: ``[B, in_channels, H, W] -> BackboneFeatures(low, high)``.
    """

    def __init__(self, name: str, in_channels: int = 3, output_stride: int | None = None, **kwargs):
        super().__init__()
        net = MODELS.build(name, num_classes=2, in_channels=in_channels, **kwargs)
        if not isinstance(net, ClassifierNet) or not isinstance(net.stages, nn.Sequential):
            raise ValueError(f"model {name!r} is not a stem -> stages -> head network of the zoo")
        self.name = name
        self.in_channels = in_channels
        self.stem, self.stages, self.head = net.stem, net.stages, net.head
        self.out_channels = net.feature_channels

        stem_stride, channels, strides = self._measure()
        native = strides[-1]
        if output_stride is not None:
            powers = [2**k for k in range(8) if stem_stride <= 2**k <= native]
            _check_output_stride(output_stride, powers, name)
            self._dilate(stem_stride, strides[:-1], output_stride)
            _, channels, strides = self._measure()
        self.output_stride = strides[-1]
        below = [i for i, s in enumerate(strides[:-1]) if s < self.output_stride]
        self.low_index = below[-1] if below else 0
        self.low_channels, self.low_stride = channels[self.low_index], strides[self.low_index]

    @torch.no_grad()
    def _measure(self, size: int = 32) -> tuple[int, list[int], list[int]]:
        """The stem's stride, and the channels and strides after each stage (last entry: after
        ``head``), from one dry run in eval mode."""
        was_training = self.training
        self.eval()
        try:
            x = self.stem(torch.zeros(1, self.in_channels, size, size))
            stem_stride, shapes = size // x.shape[-1], []
            for stage in self.stages:
                x = stage(x)
                shapes.append(x.shape)
            shapes.append(self.head(x).shape)
        finally:
            self.train(was_training)
        return stem_stride, [s[1] for s in shapes], [size // s[-1] for s in shapes]

    def _dilate(self, stem_stride: int, stage_strides: list[int], output_stride: int) -> None:
        """Dilate every stage whose down-sampling would take the stride past ``output_stride``."""
        reached, dilation, before = stem_stride, 1, stem_stride
        for stage, after in zip(self.stages, stage_strides):
            factor, before = after // before, after
            if reached * factor > output_stride:
                dilate_stage(stage, dilation, dilation * factor)
                dilation *= factor
            else:
                reached *= factor

    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        x = self.stem(x)
        low = x
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index == self.low_index:
                low = x
        return BackboneFeatures(low, self.head(x))


# ---- ImageNet ResNets ----------------------------------------------------------------------------


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)


class ImageNetBasicBlock(nn.Module):
    """Two 3x3 conv-BN (the first strided, both dilated) plus a shortcut; ReLU after the sum.

    Shapes: ``[B, in_channels, H, W] -> [B, planes, H / stride, W / stride]``.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ImageNetBottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (strided, dilated), 1x1 expand (x4), plus a shortcut.

    Shapes: ``[B, in_channels, H, W] -> [B, 4 * planes, H / stride, W / stride]``.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


_IMAGENET_RESNETS = {
    18: (ImageNetBasicBlock, (2, 2, 2, 2)),
    34: (ImageNetBasicBlock, (3, 4, 6, 3)),
    50: (ImageNetBottleneck, (3, 4, 6, 3)),
    101: (ImageNetBottleneck, (3, 4, 23, 3)),
}
_DILATE_FOR_STRIDE = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}


class ImageNetResNet(SegBackbone):
    """ImageNet ResNet (He et al., CVPR 2016) as a dense backbone, torchvision layout.

    ``conv1`` 7x7/2 -> ``bn1`` -> ReLU -> ``maxpool`` 3x3/2 -> ``layer1..layer4`` (64, 128, 256, 512
    planes, x4 for the bottleneck depths). At output stride 8 ``layer3`` and ``layer4`` trade their
    stride for dilation 2 and 4 (torchvision's ``replace_stride_with_dilation=[False, True, True]``).
    ``low`` is ``layer1``'s output (stride 4).

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: channels of the input images.
        output_stride: 8 (default, DeepLabV3), 16 or 32 (no dilation).

    Shapes: ``[B, in_channels, H, W] -> BackboneFeatures(low [B, 64|256, H/4, W/4],
    high [B, 512|2048, H/output_stride, W/output_stride])`` (``ceil`` for odd sizes).
    """

    def __init__(self, depth: int = 50, in_channels: int = 3, output_stride: int = 8):
        super().__init__()
        if depth not in _IMAGENET_RESNETS:
            depths = sorted(_IMAGENET_RESNETS)
            raise ValueError(f"ImageNet ResNet depth must be one of {depths}; got {depth!r}")
        _check_output_stride(output_stride, _DILATE_FOR_STRIDE, f"resnet{depth}")
        block, layers = _IMAGENET_RESNETS[depth]
        self.depth = depth
        self.in_channels = in_channels
        self.output_stride = output_stride
        self._inplanes, self._dilation = 64, 1
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        dilate = _DILATE_FOR_STRIDE[output_stride]
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[2])
        self.low_channels, self.low_stride = 64 * block.expansion, 4
        self.out_channels = 512 * block.expansion
        init_weights(self)

    def _make_layer(
        self, block: type, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        """torchvision's ``ResNet._make_layer``: a stage of ``blocks`` blocks; with ``dilate`` its
        stride becomes dilation (the first block keeps the dilation reached before the stage)."""
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self._inplanes, planes, stride, previous_dilation, downsample)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes, dilation=self._dilation) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return BackboneFeatures(low, self.layer4(self.layer3(self.layer2(low))))
