"""ShuffleNetV2 for CIFAR (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", ECCV 2018, https://arxiv.org/abs/1807.11164), in the CIFAR form of the
kuangliu / CRD repos: a stride-1 3x3 stem to 24 channels (no max-pool), three stages of one
downsampling unit plus ``num_blocks`` basic units, a 1x1 conv-BN-ReLU (the ``head``).

At 32x32 input (``net_size=1``) the feature map is ``[B, 1024, 4, 4]``.

Example YAML:
    ``student: {name: shufflenetv2, kwargs: {net_size: 1.0}}``
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.models._base import ClassifierNet, conv_bn
from mtkd.models._factory import MODELS

# net_size -> (stage widths, head width), blocks per stage (after the downsampling unit).
_CONFIGS = {
    0.5: ((48, 96, 192), 1024, (3, 7, 3)),
    1.0: ((116, 232, 464), 1024, (3, 7, 3)),
    1.5: ((176, 352, 704), 1024, (3, 7, 3)),
    2.0: ((224, 488, 976), 2048, (3, 7, 3)),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: ``[B, C, H, W] -> [B, C, H, W]``."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Basic unit: split the channels in half, transform one half (1x1-BN-ReLU, 3x3 depthwise-BN,
    1x1-BN-ReLU), concatenate, shuffle. Shapes: ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], dim=1))


class ShuffleDownUnit(nn.Module):
    """Downsampling unit: two stride-2 branches of ``out_channels / 2`` each, concatenated and
    shuffled. Shapes: ``[B, in_channels, H, W] -> [B, out_channels, ceil(H / 2), ceil(W / 2)]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, 2, groups=in_channels, relu=False),
            conv_bn(in_channels, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, half, 1),
            conv_bn(half, half, 3, 2, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1))


def _stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = [ShuffleDownUnit(in_channels, out_channels)]
    layers += [ShuffleUnit(out_channels) for _ in range(blocks)]
    return nn.Sequential(*layers)


class ShuffleNetV2(ClassifierNet):
    """CIFAR ShuffleNetV2 of the given ``net_size`` (0.5, 1.0, 1.5 or 2.0)."""

    def __init__(self, net_size: float = 1.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__(num_classes, in_channels)
        if net_size not in _CONFIGS:
            expected = sorted(_CONFIGS)
            raise ValueError(f"unknown ShuffleNetV2 net_size {net_size!r}; expected one of {expected}")
        widths, head_width, blocks = _CONFIGS[net_size]
        self.stem = conv_bn(in_channels, 24, 3)
        stages, width = [], 24
        for out_width, count in zip(widths, blocks):
            stages.append(_stage(width, out_width, count))
            width = out_width
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn(width, head_width, 1)
        self._add_classifier(head_width)


@MODELS.register
def shufflenetv2(num_classes: int = 10, in_channels: int = 3, net_size: float = 1.0) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 1.0x (CRD's ``ShuffleV2``)."""
    return ShuffleNetV2(net_size, num_classes=num_classes, in_channels=in_channels)
