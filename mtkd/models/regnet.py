"""RegNets for CIFAR (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020,
https://arxiv.org/abs/2003.13678), in the CIFAR form of the pycls / kuangliu repos.

A stride-1 3x3 conv-BN-ReLU stem (64 channels, as in kuangliu's CIFAR RegNets), four stages of
X blocks (1x1, grouped 3x3, 1x1, residual) at strides 1, 1, 2, 2 with the ImageNet depths and
widths of the named model; RegNetY adds squeeze-excitation. At 32x32 input the feature map is
``[B, widths[-1], 8, 8]``.

Example YAML:
    ``teacher: {name: regnety_400mf, kwargs: {}}``
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.models._base import ClassifierNet, conv_bn
from mtkd.models._factory import MODELS


@dataclass(frozen=True)
class RegNetConfig:
    """The design of one RegNet."""

    depths: tuple[int, int, int, int]
    """Blocks per stage."""
    widths: tuple[int, int, int, int]
    """Output channels per stage."""
    group_width: int
    """Channels per group of the 3x3 convs."""
    se_ratio: float = 0.0
    """Squeeze-excitation width as a fraction of the block's input width (0: no SE, RegNetX)."""
    bottleneck_ratio: float = 1.0
    """Width of the inner convs as a fraction of the block's output width."""
    strides: tuple[int, int, int, int] = (1, 1, 2, 2)
    """Stride of each stage's first block."""
    stem_width: int = 64
    """Channels of the stem conv."""


_REGNETX_200MF = RegNetConfig(depths=(1, 1, 4, 7), widths=(24, 56, 152, 368), group_width=8)
_REGNETX_400MF = RegNetConfig(depths=(1, 2, 7, 12), widths=(32, 64, 160, 384), group_width=16)
_REGNETY_400MF = RegNetConfig(depths=(1, 3, 6, 6), widths=(48, 104, 208, 440), group_width=8, se_ratio=0.25)


class SqueezeExcite(nn.Module):
    """Channel gating: ``x * sigmoid(conv(relu(conv(GAP(x)))))``. Shapes: ``[B, C, H, W] -> same``."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class RegNetBlock(nn.Module):
    """X (or Y, with SE) block: 1x1-BN-ReLU, grouped 3x3-BN-ReLU, [SE], 1x1-BN, plus a shortcut
    (1x1 conv-BN when the shape changes), ReLU after the sum.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: RegNetConfig):
        super().__init__()
        inner = int(round(out_channels * config.bottleneck_ratio))
        groups = inner // config.group_width
        layers = [conv_bn(in_channels, inner, 1), conv_bn(inner, inner, 3, stride, groups=groups)]
        if config.se_ratio > 0:
            layers.append(SqueezeExcite(inner, int(round(in_channels * config.se_ratio))))
        layers.append(conv_bn(inner, out_channels, 1, relu=False))
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _stage(
    in_channels: int, out_channels: int, blocks: int, stride: int, config: RegNetConfig
) -> nn.Sequential:
    layers = [RegNetBlock(in_channels, out_channels, stride, config)]
    layers += [RegNetBlock(out_channels, out_channels, 1, config) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class RegNet(ClassifierNet):
    """CIFAR RegNet built from a :class:`RegNetConfig`."""

    def __init__(self, config: RegNetConfig, num_classes: int = 10, in_channels: int = 3):
        super().__init__(num_classes, in_channels)
        self.stem = conv_bn(in_channels, config.stem_width)
        stages, width = [], config.stem_width
        for depth, out_width, stride in zip(config.depths, config.widths, config.strides):
            stages.append(_stage(width, out_width, depth, stride, config))
            width = out_width
        self.stages = nn.Sequential(*stages)
        self._add_classifier(width)


@MODELS.register
def regnetx_200mf(num_classes: int = 10, in_channels: int = 3) -> RegNet:
    """CIFAR RegNetX-200MF: depths 1/1/4/7, widths 24/56/152/368, group width 8."""
    return RegNet(_REGNETX_200MF, num_classes=num_classes, in_channels=in_channels)


@MODELS.register
def regnetx_400mf(num_classes: int = 10, in_channels: int = 3) -> RegNet:
    """CIFAR RegNetX-400MF: depths 1/2/7/12, widths 32/64/160/384, group width 16."""
    return RegNet(_REGNETX_400MF, num_classes=num_classes, in_channels=in_channels)


@MODELS.register
def regnety_400mf(num_classes: int = 10, in_channels: int = 3) -> RegNet:
    """CIFAR RegNetY-400MF: depths 1/3/6/6, widths 48/104/208/440, group width 8, SE 0.25."""
    return RegNet(_REGNETY_400MF, num_classes=num_classes, in_channels=in_channels)
