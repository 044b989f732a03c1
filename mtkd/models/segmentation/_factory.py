"""The segmentation-model registry and its entry points (kept apart from the classifiers' ``MODELS``:
these networks return :class:`~mtkd.models.segmentation.outputs.DenseOutputs`, not ``Outputs``)."""
from __future__ import annotations

from torch import nn

from mtkd.models._base import check_sizes
from mtkd.registry import Registry

SEG_MODELS: Registry = Registry("segmentation model")
"""Registered factories ``f(num_classes=21, in_channels=3, **kwargs) -> SegmentationNet``."""


def create_seg_model(name: str, num_classes: int = 21, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered segmentation network.

    Args:
        name: a name from :func:`list_seg_models`, e.g. ``"deeplabv3_resnet20"``.
        num_classes: C, classes scored per pixel (>= 2, background included).
        in_channels: channels of the input images (>= 1; 1 for grey canvases).
        **kwargs: ``output_stride``, ``head_channels``, ``atrous_rates``, ``dropout`` and the
            backbone family's options (see :func:`mtkd.models.segmentation.build_seg_model`).

    Returns:
        A :class:`~mtkd.models.segmentation.SegmentationNet` mapping ``[B, in_channels, H, W]`` to
        ``DenseOutputs(logits [B, C, H/s, W/s], embedding [B, K], feature [B, K, h', w'])``,
        ``s`` its ``output_stride``.

    Raises:
        UnknownNameError: (a ``UserError``, ``KeyError`` and ``ValueError``) for an unknown name;
            lists close matches.
        ValueError: for a bad ``num_classes``, ``in_channels``, stride or rate.
    """
    factory = SEG_MODELS.get(name)
    check_sizes(num_classes, in_channels)
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)


def list_seg_models(pattern: str = "*") -> list[str]:
    """Sorted registered segmentation model names matching the fnmatch ``pattern``."""
    return SEG_MODELS.names(pattern)
