"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385) as used in the CRD / torchdistill / mdistiller repos.

A 3x3 conv stem, then 3 stages of ``(depth - 2) / 6`` BasicBlocks at strides 1, 2, 2 with a
1x1 conv-BN shortcut wherever the shape changes. ``widths`` lists the stem's and the three
stages' channels: ``(16, 16, 32, 64)`` for the plain models and ``(32, 64, 128, 256)`` for
the "x4" models. At 32x32 input the feature map is ``[B, 64, 8, 8]`` (``[B, 256, 8, 8]`` for x4).

Example YAML:
    ``teacher: {name: resnet32x4, kwargs: {}}``
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.models._base import ClassifierNet, conv_bn
from mtkd.models._factory import MODELS

_NARROW = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn(out_channels, out_channels, 3, relu=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(ClassifierNet):
    """CIFAR ResNet of the given depth (``6n + 2``) and widths ``(stem, stage1, stage2, stage3)``."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__(num_classes, in_channels)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1; got {depth}")
        blocks = (depth - 2) // 6
        self.stem = conv_bn(in_channels, widths[0])
        self.stages = nn.Sequential(
            _stage(widths[0], widths[1], blocks, stride=1),
            _stage(widths[1], widths[2], blocks, stride=2),
            _stage(widths[2], widths[3], blocks, stride=2),
        )
        self._add_classifier(widths[3])


def _resnet(depth: int, widths: Sequence[int], num_classes: int, in_channels: int) -> CifarResNet:
    return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)


@MODELS.register
def resnet8(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8: 1 block per stage, widths 16/32/64."""
    return _resnet(8, _NARROW, num_classes, in_channels)


@MODELS.register
def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20: 3 blocks per stage, widths 16/32/64."""
    return _resnet(20, _NARROW, num_classes, in_channels)


@MODELS.register
def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32: 5 blocks per stage, widths 16/32/64."""
    return _resnet(32, _NARROW, num_classes, in_channels)


@MODELS.register
def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56: 9 blocks per stage, widths 16/32/64 (0.86M parameters at 100 classes)."""
    return _resnet(56, _NARROW, num_classes, in_channels)


@MODELS.register
def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110: 18 blocks per stage, widths 16/32/64."""
    return _resnet(110, _NARROW, num_classes, in_channels)


@MODELS.register
def resnet8x4(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8x4: 1 block per stage, stem 32, widths 64/128/256."""
    return _resnet(8, _X4, num_classes, in_channels)


@MODELS.register
def resnet32x4(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32x4: 5 blocks per stage, stem 32, widths 64/128/256 (7.43M parameters at 100 classes)."""
    return _resnet(32, _X4, num_classes, in_channels)
