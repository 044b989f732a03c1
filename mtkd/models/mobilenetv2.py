"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018, https://arxiv.org/abs/1801.04381), CRD style.

CRD's CIFAR student ``mobile_half``: a stride-2 3x3 stem, the seven inverted-residual stages
of the paper (every block keeps its 1x1 expansion, even at expansion 1), channels scaled by
``width_mult`` (default 0.5), then a 1x1 conv-BN-ReLU to 1280 channels (the ``head``, whose
output is the feature map: ``[B, 1280, 2, 2]`` at 32x32).

Example YAML:
    ``student: {name: mobilenetv2, kwargs: {width_mult: 0.5}}``
"""
from __future__ import annotations

import torch
from torch import nn

from mtkd.models._base import ClassifierNet, conv_bn
from mtkd.models._factory import MODELS

# Per stage: (expands? (else expansion 1), output channels at width 1, blocks, first stride).
_SETTINGS = (
    (False, 16, 1, 1),
    (True, 24, 2, 1),
    (True, 32, 3, 2),
    (True, 64, 4, 2),
    (True, 96, 3, 1),
    (True, 160, 3, 2),
    (True, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear); identity shortcut
    when stride is 1 and the channels match.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            conv_bn(in_channels, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, expansion: int) -> nn.Sequential:
    layers = [InvertedResidual(in_channels, out_channels, stride, expansion)]
    layers += [InvertedResidual(out_channels, out_channels, 1, expansion) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class MobileNetV2(ClassifierNet):
    """CIFAR MobileNetV2 with width multiplier ``width_mult`` and expansion ``expansion``."""

    def __init__(
        self, width_mult: float = 0.5, expansion: int = 6, num_classes: int = 10, in_channels: int = 3
    ):
        super().__init__(num_classes, in_channels)
        if width_mult <= 0 or expansion < 1:
            raise ValueError(f"need width_mult > 0 and expansion >= 1; got {width_mult!r}, {expansion!r}")
        width = int(32 * width_mult)
        self.stem = conv_bn(in_channels, width, 3, stride=2)
        stages = []
        for expands, channels, blocks, stride in _SETTINGS:
            out_width = int(channels * width_mult)
            stages.append(_stage(width, out_width, blocks, stride, expansion if expands else 1))
            width = out_width
        self.stages = nn.Sequential(*stages)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.head = conv_bn(width, last, 1)
        self._add_classifier(last)


@MODELS.register
def mobilenetv2(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6
) -> MobileNetV2:
    """CIFAR MobileNetV2; the default is CRD's ``mobile_half`` (width 0.5, expansion 6)."""
    return MobileNetV2(width_mult, expansion, num_classes=num_classes, in_channels=in_channels)
