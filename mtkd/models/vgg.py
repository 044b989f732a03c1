"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, https://arxiv.org/abs/1409.1556),
CRD style: five blocks of 3x3 conv-BN-ReLU layers, 2x2 max-pooling after the first three,
global average pooling and a single linear classifier.

At 32x32 input the feature map is ``[B, 512, 4, 4]`` (``[B, 512, 3, 3]`` at 28x28).

Example YAML:
    ``student: {name: vgg8, kwargs: {}}``
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from mtkd.models._base import ClassifierNet, conv_bn
from mtkd.models._factory import MODELS

# Output channels of the convs of each of the five blocks.
_VGG8 = ((64,), (128,), (256,), (512,), (512,))
_VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


def _block(in_channels: int, widths: Sequence[int], pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if pool else []
    for width in widths:
        layers.append(conv_bn(in_channels, width))
        in_channels = width
    return nn.Sequential(*layers)


class VGG(ClassifierNet):
    """VGG-BN; ``config`` lists the conv widths of each of the five blocks."""

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 10, in_channels: int = 3):
        super().__init__(num_classes, in_channels)
        self.stem = _block(in_channels, config[0], pool=False)
        stages, width = [], config[0][-1]
        for index, widths in enumerate(config[1:], start=1):
            stages.append(_block(width, widths, pool=index <= 3))
            width = widths[-1]
        self.stages = nn.Sequential(*stages)
        self._add_classifier(width)


@MODELS.register
def vgg8(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-8-BN: one conv per block (64, 128, 256, 512, 512)."""
    return VGG(_VGG8, num_classes=num_classes, in_channels=in_channels)


@MODELS.register
def vgg13(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-13-BN: two convs per block (64, 128, 256, 512, 512)."""
    return VGG(_VGG13, num_classes=num_classes, in_channels=in_channels)
