"""The contract every segmentation network fulfils, and the one resize the losses and metrics use."""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F


class DenseOutputs(NamedTuple):
    """What a segmentation network yields for a batch of B images of ``H x W`` pixels.

    Attributes:
        logits: ``[B, C, h, w]`` per-pixel class scores at the head's native stride ``s`` (the
            model's ``output_stride``): ``h = H / s`` when ``s`` divides ``H`` (otherwise
            ``ceil(H / s)``; the VGG backbones floor). *Not* upsampled: resize with
            :func:`upsample_logits` where full resolution is needed.
        embedding: ``[B, D]`` the global average of ``feature`` (``D == K``).
        feature: ``[B, K, h', w']`` the backbone feature the head consumes (stride
            ``feature_stride``; for DeepLabV3 and FCN ``h' == h``).
    """

    logits: torch.Tensor
    embedding: torch.Tensor
    feature: torch.Tensor


Size = Union[Sequence[int], torch.Size, torch.Tensor]


def upsample_logits(logits: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinearly resize dense logits (``align_corners=False``) to a target spatial size.

    Args:
        logits: ``[B, C, h, w]``.
        size: ``(H, W)``, or a tensor whose last two dimensions are the target (e.g. the images
            ``[B, in_channels, H, W]`` or the labels ``[B, H, W]``).

    Returns:
        ``[B, C, H, W]``; ``logits`` itself when it already has that size.

    Raises:
        ValueError: if ``logits`` is not 4-D or ``size`` is not two positive ints.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, C, h, w]; got shape {tuple(logits.shape)}")
    target = tuple(size.shape[-2:]) if isinstance(size, torch.Tensor) else tuple(size)
    if len(target) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in target):
        raise ValueError(f"size must be (H, W) with positive ints (or a tensor [..., H, W]); got {size!r}")
    if tuple(logits.shape[-2:]) == target:
        return logits
    return F.interpolate(logits, size=target, mode="bilinear", align_corners=False)
