"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
https://arxiv.org/abs/1605.07146), as in the CRD repo: pre-activation blocks, depth ``6n + 4``.

``wrn_D_W``: depth D, widening factor W; stages of widths ``16W, 32W, 64W`` at strides 1, 2, 2,
then a final BN-ReLU (the ``head``) whose output is the feature map: ``[B, 64W, 8, 8]`` at 32x32.

Example YAML:
    ``teacher: {name: wrn_28_4, kwargs: {}}``
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.models._base import ClassifierNet
from mtkd.models._factory import MODELS


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut; the shortcut is
    a 1x1 conv of the pre-activated input when the shape changes.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]``.
    """

    batchnorm_folds = (("conv1", "bn2"),)  # bn2 only ever normalises conv1's output (mtkd.models.fold)

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        same_shape = stride == 1 and in_channels == out_channels
        self.shortcut = None if same_shape else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [WideBlock(in_channels, out_channels, stride)]
    layers += [WideBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WideResNet(ClassifierNet):
    """Wide ResNet of depth ``6n + 4`` and widening factor ``widen``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__(num_classes, in_channels)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 with n >= 1; got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stages = nn.Sequential(
            _stage(widths[0], widths[1], blocks, stride=1),
            _stage(widths[1], widths[2], blocks, stride=2),
            _stage(widths[2], widths[3], blocks, stride=2),
        )
        self.head = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        self._add_classifier(widths[3])


def _wrn(depth: int, widen: int, num_classes: int, in_channels: int) -> WideResNet:
    return WideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels)


@MODELS.register
def wrn_16_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-2: 2 blocks per stage, widths 32/64/128."""
    return _wrn(16, 2, num_classes, in_channels)


@MODELS.register
def wrn_40_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-40-2: 6 blocks per stage, widths 32/64/128."""
    return _wrn(40, 2, num_classes, in_channels)


@MODELS.register
def wrn_28_4(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-28-4: 4 blocks per stage, widths 64/128/256."""
    return _wrn(28, 4, num_classes, in_channels)
