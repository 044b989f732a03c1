"""Segmentation networks (backbone + head) and the registered names.

Names are ``<head>_<backbone>``:

- heads: ``fcn`` (:class:`~.heads.FCNHead`), ``deeplabv3`` (:class:`~.heads.DeepLabV3Head`),
  ``lraspp`` (:class:`~.heads.LRASPPHead`);
- CIFAR-style backbones, i.e. the zoo's networks (:class:`~.backbones.ZooBackbone`), sized for
  32-64 px canvases: ``resnet8``, ``resnet20``, ``resnet56``, ``resnet8x4``, ``resnet32x4``,
  ``wrn_16_2``, ``wrn_40_2``, ``vgg8``, ``vgg13``, ``mobilenetv2`` (dilated to output stride 8),
  ``shufflenetv2``. Their heads are narrower than the papers' (``head_channels=128`` for DeepLabV3)
  and their ASPP rates smaller (2, 4, 6 at stride <= 4, else 1, 2, 3), as their maps are 8-16 px;
- ImageNet-style ResNets (:class:`~.backbones.ImageNetResNet`, output stride 8, torchvision's
  DeepLabV3 setting: ASPP rates 12, 24, 36, 256 channels): ``resnet18``, ``resnet34``, ``resnet50``,
  ``resnet101``. Note ``resnet18``/``resnet34``/``resnet50``/``resnet101`` are the ImageNet
  ResNets, ``resnet8``/``resnet20``/``resnet56`` the CIFAR ones.

Every factory is ``f(num_classes=21, in_channels=3, **kwargs)``; the kwargs are
``output_stride`` (backbone), ``head_channels`` (width of the head), ``atrous_rates`` (DeepLabV3),
``dropout`` (FCN, DeepLabV3), and the zoo family's own options (``width_mult``...).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mtkd.models._base import check_sizes
from mtkd.models.segmentation._factory import SEG_MODELS
from mtkd.models.segmentation.backbones import BackboneFeatures, ImageNetResNet, SegBackbone, ZooBackbone
from mtkd.models.segmentation.heads import DeepLabV3Head, FCNHead, LRASPPHead
from mtkd.models.segmentation.outputs import DenseOutputs


class SegmentationNet(nn.Module):
    """``backbone -> head``, returning :class:`DenseOutputs` (logits at the native stride).

    Attributes:
        backbone: a :class:`~.backbones.SegBackbone`.
        head: maps ``BackboneFeatures`` to logits.
        num_classes: C, channels of ``logits``.
        in_channels: channels of the input images.
        output_stride: input pixels per ``logits`` pixel along each axis.
        feature_stride: input pixels per ``feature`` pixel (the backbone's output stride).
        feature_channels: K, channels of ``feature`` (the backbone's ``high``).
        embedding_dim: D (equal to K), the width of ``embedding``.
    """

    def __init__(self, backbone: SegBackbone, head: nn.Module, num_classes: int):
        super().__init__()
        check_sizes(num_classes, backbone.in_channels)
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.in_channels = backbone.in_channels
        self.feature_stride = backbone.output_stride
        reads_low = getattr(head, "reads_low", False)
        self.output_stride = backbone.low_stride if reads_low else backbone.output_stride
        self.feature_channels = self.embedding_dim = backbone.out_channels

    def forward_features(self, x: torch.Tensor) -> BackboneFeatures:
        """``[B, in_channels, H, W] -> BackboneFeatures(low, high)``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> DenseOutputs:
        """Args:
            x: ``[B, in_channels, H, W]`` images (H, W >= 16 for the CIFAR-style backbones).

        Returns:
            ``DenseOutputs(logits [B, C, H/s, W/s], embedding [B, K], feature [B, K, H/f, W/f])``
            with ``s = output_stride`` and ``f = feature_stride``.
        """
        features = self.backbone(x)
        logits = self.head(features)
        return DenseOutputs(logits, features.high.mean(dim=(2, 3)), features.high)


# ---- builders ------------------------------------------------------------------------------------


def _small_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP rates for 32-64 px canvases: a 16 px map at stride 4 gets 2, 4, 6 (DeepLab's 6, 12, 18
    on its 33 px map, scaled), an 8 px map at stride >= 8 gets 1, 2, 3."""
    return (2, 4, 6) if output_stride <= 4 else (1, 2, 3)


def _make_head(kind: str, backbone: SegBackbone, num_classes: int, head_channels: int | None,
               atrous_rates: Sequence[int] | None, dropout: float | None, imagenet: bool) -> nn.Module:
    if kind == "fcn":
        return FCNHead(backbone.out_channels, num_classes, head_channels, 0.1 if dropout is None else dropout)
    if kind == "deeplabv3":
        if atrous_rates is None:
            atrous_rates = (12, 24, 36) if imagenet else _small_rates(backbone.output_stride)
        channels = head_channels or (256 if imagenet else 128)
        return DeepLabV3Head(backbone.out_channels, num_classes, atrous_rates, channels,
                             0.5 if dropout is None else dropout)
    if atrous_rates is not None or dropout is not None:
        raise TypeError("the lraspp head takes no atrous_rates or dropout")
    return LRASPPHead(backbone.low_channels, backbone.out_channels, num_classes, head_channels or 128)


def build_seg_model(
    head: str,
    backbone: str,
    num_classes: int = 21,
    in_channels: int = 3,
    output_stride: int | None = None,
    head_channels: int | None = None,
    atrous_rates: Sequence[int] | None = None,
    dropout: float | None = None,
    **backbone_kwargs,
) -> SegmentationNet:
    """Build ``head`` on ``backbone`` (unregistered combinations too).

    Args:
        head: ``"fcn"``, ``"deeplabv3"`` or ``"lraspp"``.
        backbone: a zoo name (``"resnet20"``, ``"wrn_16_2"``...) or an ImageNet ResNet
            (``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``).
        num_classes: C (>= 2).
        in_channels: channels of the input images (>= 1).
        output_stride: the backbone's stride (ImageNet ResNets: 8, 16 or 32, default 8; zoo networks:
            default native, smaller dilates).
        head_channels: width of the head (FCN: ``in // 4``; DeepLabV3: 256 ImageNet-style, 128
            CIFAR-style; LR-ASPP: 128).
        atrous_rates: DeepLabV3's ASPP rates (ImageNet-style 12, 24, 36; CIFAR-style see
            :func:`_small_rates`).
        dropout: FCN 0.1, DeepLabV3 0.5 by default.
        **backbone_kwargs: the zoo family's options (``width_mult``...).

    Raises:
        ValueError: for an unknown head or backbone, a bad size, stride or rate.
    """
    check_sizes(num_classes, in_channels)
    if head not in ("fcn", "deeplabv3", "lraspp"):
        raise ValueError(f"unknown segmentation head {head!r}; expected 'fcn', 'deeplabv3' or 'lraspp'")
    imagenet = backbone in _IMAGENET_DEPTHS
    if imagenet:
        if backbone_kwargs:
            raise TypeError(f"{backbone} takes no options {sorted(backbone_kwargs)}")
        stride = 8 if output_stride is None else output_stride
        net: SegBackbone = ImageNetResNet(_IMAGENET_DEPTHS[backbone], in_channels, stride)
    else:
        net = ZooBackbone(backbone, in_channels, output_stride, **backbone_kwargs)
    dense_head = _make_head(head, net, num_classes, head_channels, atrous_rates, dropout, imagenet)
    return SegmentationNet(net, dense_head, num_classes)


_IMAGENET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}

# (head, backbone, default backbone kwargs, what it is for)
_REGISTERED: tuple[tuple[str, str, dict, str], ...] = (
    *(("fcn", b, {}, "CIFAR-style")
      for b in ("resnet8", "resnet20", "resnet56", "resnet32x4", "wrn_16_2", "vgg8")),
    *(("deeplabv3", b, {}, "CIFAR-style") for b in (
        "resnet8", "resnet20", "resnet56", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2", "vgg8", "vgg13",
        "shufflenetv2")),
    ("deeplabv3", "mobilenetv2", {"output_stride": 8}, "CIFAR-style, dilated to stride 8"),
    ("lraspp", "mobilenetv2", {"output_stride": 8}, "CIFAR-style, dilated to stride 8; logits at stride 4"),
    ("lraspp", "shufflenetv2", {}, "CIFAR-style; logits at stride 4"),
    *(("fcn", b, {}, "ImageNet-style, output stride 8") for b in ("resnet50", "resnet101")),
    *(("deeplabv3", b, {}, "ImageNet-style, output stride 8") for b in _IMAGENET_DEPTHS),
)


def _register(head: str, backbone: str, defaults: dict, what: str) -> None:
    name = f"{head}_{backbone}"

    def factory(num_classes: int = 21, in_channels: int = 3, **kwargs) -> SegmentationNet:
        return build_seg_model(head, backbone, num_classes, in_channels, **{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{head} head on {backbone} ({what})."
    SEG_MODELS.register(factory, name=name)


for _spec in _REGISTERED:
    _register(*_spec)

__all__ = ["SegmentationNet", "build_seg_model"]
