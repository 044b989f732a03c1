"""Semantic segmentation networks: the zoo's backbones (and ImageNet ResNets) under dense heads.

Every network maps ``[B, in_channels, H, W]`` images to ``DenseOutputs(logits [B, C, h, w],
embedding [B, K], feature [B, K, h', w'])``, the logits at the head's native stride
``output_stride`` (not upsampled: :func:`upsample_logits` resizes them), and has the attributes
``num_classes``, ``in_channels``, ``output_stride``, ``feature_stride``, ``feature_channels`` and
``embedding_dim``. They live in their own registry, ``SEG_MODELS``, apart from the classifiers.

Example:
    >>> from mtkd.models.segmentation import create_seg_model, list_seg_models, upsample_logits
    >>> list_seg_models("deeplabv3_*")
    >>> model = create_seg_model("deeplabv3_resnet20", num_classes=11, in_channels=1)
    >>> out = model(torch.randn(16, 1, 64, 64))          # out.logits: [16, 11, 16, 16]
    >>> scores = upsample_logits(out.logits, (64, 64))   # [16, 11, 64, 64]
"""
from mtkd.models.segmentation._factory import SEG_MODELS, create_seg_model, list_seg_models
from mtkd.models.segmentation.backbones import (
    BackboneFeatures,
    ImageNetResNet,
    SegBackbone,
    ZooBackbone,
    dilate_stage,
)
from mtkd.models.segmentation.heads import ASPP, DeepLabV3Head, FCNHead, LRASPPHead
from mtkd.models.segmentation.nets import SegmentationNet, build_seg_model
from mtkd.models.segmentation.outputs import DenseOutputs, upsample_logits

__all__ = [
    "ASPP",
    "BackboneFeatures",
    "DeepLabV3Head",
    "DenseOutputs",
    "FCNHead",
    "ImageNetResNet",
    "LRASPPHead",
    "SEG_MODELS",
    "SegBackbone",
    "SegmentationNet",
    "ZooBackbone",
    "build_seg_model",
    "create_seg_model",
    "dilate_stage",
    "list_seg_models",
    "upsample_logits",
]
