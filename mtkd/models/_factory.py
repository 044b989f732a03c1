"""The model registry and the public entry points that use it (timm style)."""
from __future__ import annotations

from torch import nn

from mtkd.models._base import check_sizes
from mtkd.registry import Registry

MODELS: Registry = Registry("model")
"""Registered network factories ``f(num_classes=10, in_channels=3, **kwargs) -> nn.Module``."""


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered network.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet56"``, or a segmentation network's
            (:func:`mtkd.models.segmentation.list_seg_models`, returning ``DenseOutputs``) or a
            detector's (:func:`mtkd.detection.models.list_det_models`, returning ``DetectionOutputs``).
        num_classes: C, classes of the classifier (>= 2).
        in_channels: channels of the input images (>= 1; 1 for Fashion-MNIST).
        **kwargs: family-specific options, e.g. ``width_mult`` for ``mobilenetv2``.

    Returns:
        A module mapping ``[B, in_channels, H, W]`` (H, W >= 16) to
        ``Outputs(logits [B, C], embedding [B, D], feature [B, K, H', W'])``.

    Raises:
        UnknownNameError: (a :class:`mtkd.errors.UserError`, ``KeyError`` and ``ValueError``) for an
            unknown name; lists close matches.
        ValueError: for a bad ``num_classes`` or ``in_channels``.

    In a config a model is named by a string (``student: resnet56`` in an experiment,
    ``model: resnet20`` in a teacher-training file); the config takes no ``kwargs``, so the models it
    builds use their family's defaults.
    """
    from mtkd.detection.models import DET_MODELS
    from mtkd.models.segmentation._factory import SEG_MODELS

    if name not in MODELS and name in SEG_MODELS:  # a dense network: one entry point builds any checkpoint
        factory = SEG_MODELS.get(name)
    elif name not in MODELS and name in DET_MODELS:  # a detector, likewise
        factory = DET_MODELS.get(name)
    else:
        factory = MODELS.get(name)
    check_sizes(num_classes, in_channels)
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching the fnmatch ``pattern`` (e.g. ``"resnet*"``)."""
    return MODELS.names(pattern)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
