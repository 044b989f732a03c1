"""CenterNet-style anchor-free detectors on the zoo's backbones (and the ImageNet ResNets).

``backbone (every stage) -> light FPN neck -> three heads`` at output stride 4 (CenterNet's):

* **backbone**: the stage outputs of a zoo network (:class:`~mtkd.models.segmentation.ZooBackbone`,
  native strides) or of an ImageNet ResNet (``layer1..4``, strides 4 to 32);
* **neck**: a top-down FPN over the stages at stride >= 4: a 1x1 lateral conv per stage, each
  coarser sum upsampled (nearest) and added to the next finer lateral, then a 3x3 conv-BN-ReLU;
  brought to ``ceil(H / 4)`` if the finest stage is coarser. Its output is the model's ``feature``;
* **heads** (3x3 conv-ReLU -> 1x1 conv each): the class heatmap logits ``[B, K, h, w]`` (bias
  ``-log((1 - 0.1) / 0.1)``: every cell starts at probability 0.1, CenterNet's prior), the box size
  ``(w, h)`` and the centre offset ``(dx, dy)`` in cells (:mod:`mtkd.detection.encode`).

Every detector returns :class:`DetectionOutputs`, three fields like the segmentation networks'
``DenseOutputs``: ``logits`` stacks the heatmap logits and the four box channels, so that a
detector's outputs travel (cache, gRPC, Ray) exactly like a segmentation network's. Read them with
:func:`split_logits`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.models._base import check_sizes, conv_bn, init_weights
from mtkd.models.segmentation.backbones import ImageNetResNet, ZooBackbone
from mtkd.registry import Registry

__all__ = ["DET_MODELS", "BOX_CHANNELS", "CenterNet", "DetectionOutputs", "LightFPN", "build_detector",
           "create_det_model", "list_det_models", "split_logits"]

DET_MODELS: Registry = Registry("detection model")
"""Registered factories ``f(num_classes=80, in_channels=3, **kwargs) -> CenterNet``."""
BOX_CHANNELS = 4
"""Box channels after the K heatmap channels of ``logits``: size w, size h, offset dx, offset dy."""
OUTPUT_STRIDE = 4


class DetectionOutputs(NamedTuple):
    """What a detector yields for B images of ``H x W`` pixels (``h = ceil(H / 4)``).

    Attributes:
        logits: ``[B, K + 4, h, w]``: K heatmap logits, then size ``(w, h)`` and offset ``(dx, dy)`` in
            cells (:func:`split_logits`).
        embedding: ``[B, D]`` the global average of ``feature``.
        feature: ``[B, D, h, w]`` the neck's output (what every head reads).
    """

    logits: torch.Tensor
    embedding: torch.Tensor
    feature: torch.Tensor


class HeadMaps(NamedTuple):
    """``logits`` split: ``heatmap [B, K, h, w]`` logits, ``size [B, 2, h, w]``, ``offset [B, 2, h, w]``."""

    heatmap: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor


def split_logits(logits: torch.Tensor) -> HeadMaps:
    """``[B, K + 4, h, w]`` detector logits -> :class:`HeadMaps` (views, no copy)."""
    if logits.ndim != 4 or logits.shape[1] <= BOX_CHANNELS:
        raise ValueError(f"detector logits must be [B, K + 4, h, w] with K >= 1; got {tuple(logits.shape)}")
    k = logits.shape[1] - BOX_CHANNELS
    return HeadMaps(logits[:, :k], logits[:, k:k + 2], logits[:, k + 2:])


# ---- backbones: every stage's output -------------------------------------------------------------


class StagedBackbone(nn.Module):
    """A backbone that returns the output of each stage, finest first.

    Attributes:
        channels: channels per stage output.
        strides: input pixels per cell of each stage output (measured with a 64 x 64 dry run).
    """

    def __init__(self, name: str, in_channels: int, **kwargs):
        super().__init__()
        self.name = name
        if name in _IMAGENET_DEPTHS:
            if kwargs:
                raise TypeError(f"{name} takes no options {sorted(kwargs)}")
            self.net = ImageNetResNet(_IMAGENET_DEPTHS[name], in_channels, output_stride=32)
        else:
            self.net = ZooBackbone(name, in_channels, **kwargs)
        self.in_channels = in_channels
        self.channels, self.strides = self._measure()

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        if isinstance(net, ImageNetResNet):
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            outs = []
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
                x = layer(x)
                outs.append(x)
            return outs
        x = net.stem(x)
        outs = []
        for stage in net.stages:
            x = stage(x)
            outs.append(x)
        outs[-1] = net.head(outs[-1])  # the zoo's final activation (pre-activation nets) belongs to the last map
        return outs

    @torch.no_grad()
    def _measure(self, size: int = 64) -> tuple[list[int], list[int]]:
        was_training = self.training
        self.eval()
        try:
            outs = self._stages(torch.zeros(1, self.in_channels, size, size))
        finally:
            self.train(was_training)
        return [o.shape[1] for o in outs], [size // o.shape[-1] for o in outs]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, C, H, W]`` -> the stage outputs ``[B, channels[i], H / strides[i], W / strides[i]]``."""
        return self._stages(x)


_IMAGENET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


# ---- neck and heads ------------------------------------------------------------------------------


class LightFPN(nn.Module):
    """Top-down FPN over the stages at stride >= ``output_stride`` (the finest stage if none is).

    Args:
        channels: channels of every stage output, finest first.
        strides: their strides.
        width: channels of the laterals and of the output.
        output_stride: stride of the output map.

    Shapes: stage outputs -> ``[B, width, ceil(H / output_stride), ceil(W / output_stride)]``.
    """

    def __init__(self, channels: list[int], strides: list[int], width: int, output_stride: int = OUTPUT_STRIDE):
        super().__init__()
        used = [i for i, s in enumerate(strides) if s >= output_stride] or [len(strides) - 1]
        self.used = used
        self.output_stride = output_stride
        self.laterals = nn.ModuleList(nn.Conv2d(channels[i], width, 1) for i in used)
        self.smooth = conv_bn(width, width, 3)

    def forward(self, stages: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = [lateral(stages[i]) for lateral, i in zip(self.laterals, self.used)]
        x = maps[-1]
        for finer in reversed(maps[:-1]):
            x = finer + F.interpolate(x, size=finer.shape[-2:], mode="nearest")
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.smooth(x)


def _head(width: int, channels: int, out: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(nn.Conv2d(width, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, out, 1))
    init_weights(head)
    nn.init.normal_(head[-1].weight, std=0.01)  # small last layer: the bias sets the starting prediction
    nn.init.constant_(head[-1].bias, bias)
    return head


class CenterNet(nn.Module):
    """Backbone, light FPN and CenterNet heads (see the module docstring).

    Attributes:
        num_classes: K.
        in_channels: channels of the input images.
        output_stride: 4, input pixels per output cell (``logits`` and ``feature``).
        feature_stride: the same 4 (``feature`` is the neck's map).
        feature_channels, embedding_dim: D, the neck's width.
    """

    def __init__(self, backbone: StagedBackbone, num_classes: int, neck_channels: int = 64,
                 head_channels: int = 64, prior: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.neck = LightFPN(backbone.channels, backbone.strides, neck_channels)
        init_weights(self.neck)
        self.heatmap_head = _head(neck_channels, head_channels, num_classes, -math.log((1 - prior) / prior))
        self.size_head = _head(neck_channels, head_channels, 2)
        self.offset_head = _head(neck_channels, head_channels, 2)
        self.num_classes = num_classes
        self.in_channels = backbone.in_channels
        self.output_stride = self.feature_stride = OUTPUT_STRIDE
        self.feature_channels = self.embedding_dim = neck_channels

    def forward(self, x: torch.Tensor) -> DetectionOutputs:
        """``[B, in_channels, H, W]`` -> ``DetectionOutputs(logits [B, K + 4, h, w], embedding [B, D],
        feature [B, D, h, w])``, ``h = ceil(H / 4)``."""
        size = (-(-x.shape[-2] // OUTPUT_STRIDE), -(-x.shape[-1] // OUTPUT_STRIDE))
        feature = self.neck(self.backbone(x), size)
        logits = torch.cat([self.heatmap_head(feature), self.size_head(feature), self.offset_head(feature)], 1)
        return DetectionOutputs(logits, feature.mean(dim=(2, 3)), feature)


# ---- builders and registry -----------------------------------------------------------------------


def build_detector(backbone: str, num_classes: int = 80, in_channels: int = 3, neck_channels: int | None = None,
                   head_channels: int | None = None, **backbone_kwargs) -> CenterNet:
    """A :class:`CenterNet` on ``backbone`` (registered or not).

    Args:
        backbone: a zoo name (``"resnet20"``, ``"vgg8"``...) or an ImageNet ResNet (``"resnet18"``,
            ``"resnet34"``, ``"resnet50"``, ``"resnet101"``).
        num_classes: K, heatmap channels (no background class).
        in_channels: channels of the input images.
        neck_channels: width of the FPN (default 64 zoo, 128 ImageNet).
        head_channels: width of each head's 3x3 conv (default the neck's).
        **backbone_kwargs: the zoo family's options (``width_mult``...).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
    check_sizes(2, in_channels)
    imagenet = backbone in _IMAGENET_DEPTHS
    neck = neck_channels or (128 if imagenet else 64)
    return CenterNet(StagedBackbone(backbone, in_channels, **backbone_kwargs), num_classes, neck, head_channels or neck)


def create_det_model(name: str, num_classes: int = 80, in_channels: int = 3, **kwargs) -> CenterNet:
    """Build a registered detector (:func:`list_det_models`); an unknown name lists close matches."""
    return DET_MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)


def list_det_models(pattern: str = "*") -> list[str]:
    """Sorted registered detector names matching the fnmatch ``pattern``."""
    return DET_MODELS.names(pattern)


# (name, backbone, defaults, what it is for)
_REGISTERED: tuple[tuple[str, str, dict, str], ...] = (
    ("centernet_resnet8", "resnet8", {"neck_channels": 32}, "the canvases' student"),
    ("centernet_resnet20", "resnet20", {}, "a canvases teacher"),
    ("centernet_wrn_16_2", "wrn_16_2", {}, "a canvases teacher"),
    ("centernet_vgg8", "vgg8", {}, "a canvases teacher (stride-8 backbone, FPN to stride 4)"),
    ("centernet_shufflenetv2", "shufflenetv2", {}, "a canvases teacher (stride-8 backbone)"),
    ("centernet_mobilenetv2", "mobilenetv2", {}, "a canvases teacher (stride-16 backbone)"),
    *((f"centernet_{b}_fpn", b, {}, "ImageNet-style ResNet, FPN over strides 4-32 (GPU, COCO)")
      for b in _IMAGENET_DEPTHS),
)


def _register(name: str, backbone: str, defaults: dict, what: str) -> None:
    def factory(num_classes: int = 80, in_channels: int = 3, **kwargs) -> CenterNet:
        return build_detector(backbone, num_classes, in_channels, **{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CenterNet on {backbone} ({what})."
    DET_MODELS.register(factory, name=name)


for _spec in _REGISTERED:
    _register(*_spec)
