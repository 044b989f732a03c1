"""Segmentation heads: FCN, DeepLabV3 (ASPP) and LR-ASPP, as in torchvision's segmentation models.

Every head maps :class:`~mtkd.models.segmentation.backbones.BackboneFeatures` ``(low, high)`` to
logits ``[B, num_classes, h, w]`` at its native stride: ``high``'s for :class:`FCNHead` and
:class:`DeepLabV3Head`, ``low``'s for :class:`LRASPPHead` (``reads_low`` says which). None of them
upsamples to the input size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.models._base import conv_bn, init_weights
from mtkd.models.segmentation.backbones import BackboneFeatures


class FCNHead(nn.Module):
    """Long et al., "Fully Convolutional Networks for Semantic Segmentation" (CVPR 2015), torchvision
    form: 3x3 conv-BN-ReLU -> dropout -> 1x1 classifier (with bias).

    Args:
        in_channels: channels of ``high``.
        num_classes: C.
        channels: width of the 3x3 conv; default ``in_channels // 4`` (torchvision), at least 16.
        dropout: dropout probability before the classifier.

    Shapes: ``high [B, in_channels, h, w] -> [B, C, h, w]``.
    """

    reads_low = False

    def __init__(self, in_channels: int, num_classes: int, channels: int | None = None, dropout: float = 0.1):
        super().__init__()
        channels = channels or max(in_channels // 4, 16)
        self.block = conv_bn(in_channels, channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        return self.classifier(self.dropout(self.block(features.high)))


class ASPPPooling(nn.Module):
    """ASPP's image-level branch: global average pool -> 1x1 conv-BN-ReLU -> broadcast back to
    ``h x w`` (bilinear from 1x1, i.e. a copy). Shapes: ``[B, in, h, w] -> [B, out, h, w]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            raise ValueError(
                "ASPP's image-pooling branch batch-normalises a 1x1 map: training needs a batch of "
                "at least 2 images (or put the model in eval mode)"
            )
        out = self.conv(self.pool(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (Chen et al., "Rethinking Atrous Convolution for Semantic Image
    Segmentation", arXiv 1706.05587).

    Five parallel branches of ``out_channels`` each, concatenated and projected: ``convs[0]`` a 1x1
    conv-BN-ReLU, ``convs[1..3]`` 3x3 conv-BN-ReLU of dilation ``rates[0..2]``, ``convs[4]`` the
    image-pooling branch; ``project`` is 1x1 conv-BN-ReLU -> dropout.

    Args:
        in_channels: channels of the input map.
        rates: dilations of the 3x3 branches (any number >= 1 of positive ints; DeepLabV3 uses three:
            12, 24, 36 at output stride 8).
        out_channels: width of every branch and of the output.
        dropout: dropout probability after the projection.

    Shapes: ``[B, in_channels, h, w] -> [B, out_channels, h, w]``.
    """

    def __init__(self, in_channels: int, rates: Sequence[int] = (12, 24, 36), out_channels: int = 256,
                 dropout: float = 0.5):
        super().__init__()
        rates = tuple(rates)
        if not rates or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
            raise ValueError(f"atrous rates must be a non-empty sequence of ints >= 1; got {rates!r}")
        self.rates = rates
        branches: list[nn.Module] = [conv_bn(in_channels, out_channels, 1)]
        for rate in rates:
            branches.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ))
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn(len(branches) * out_channels, out_channels, 1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3's head (torchvision ``DeepLabHead``): ASPP -> 3x3 conv-BN-ReLU -> 1x1 classifier.

    Args:
        in_channels: channels of ``high``.
        num_classes: C.
        rates: ASPP's atrous rates.
        channels: width of ASPP and the 3x3 conv (256 in the paper).
        dropout: dropout after ASPP's projection.

    Shapes: ``high [B, in_channels, h, w] -> [B, C, h, w]``.
    """

    reads_low = False

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (12, 24, 36),
                 channels: int = 256, dropout: float = 0.5):
        super().__init__()
        self.aspp = ASPP(in_channels, rates, channels, dropout)
        self.block = conv_bn(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        return self.classifier(self.block(self.aspp(features.high)))


class LRASPPHead(nn.Module):
    """Lite R-ASPP (Howard et al., "Searching for MobileNetV3", ICCV 2019), torchvision form.

    ``high`` goes through a 1x1 conv-BN-ReLU, times a gate ``sigmoid(1x1 conv(GAP(high)))``, is
    upsampled bilinearly to ``low``'s size and classified by a 1x1 conv; a 1x1 conv classifies
    ``low``; the two score maps are summed.

    Args:
        low_channels: channels of ``low``.
        high_channels: channels of ``high``.
        num_classes: C.
        channels: width of the gated branch (128 in the paper).

    Shapes: ``(low [B, low_channels, h, w], high [B, high_channels, h', w']) -> [B, C, h, w]``.
    """

    reads_low = True

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, channels: int = 128):
        super().__init__()
        self.cbr = conv_bn(high_channels, channels, 1)
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, channels, 1, bias=False), nn.Sigmoid()
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)

    def forward(self, features: BackboneFeatures) -> torch.Tensor:
        low, high = features
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)
