"""Seeded augmentation of detection batches: the boxes move with the image.

The image part is the segmentation augmentation (:mod:`mtkd.data.seg_augment`: random scale, crop
with padding, horizontal flip, the same draws from the same generator). A box moves by the same map,
in continuous coordinates: scaling to ``height x width`` multiplies ``y`` by ``height / H`` and
``x`` by ``width / W``; the crop subtracts ``(top, left)``; a flip sends ``x`` to ``w_out - x``. The
box is then clipped to the crop; it is dropped (its row becomes padding) when it keeps less than
``min_kept`` of its area or is thinner than ``min_size`` pixels.
"""
from __future__ import annotations

import torch

from mtkd.data.dataset import DataError
from mtkd.data.seg_augment import SegAugmentConfig, SegAugmentParams, apply_seg_augment, seg_augment_params
from mtkd.detection.boxes import PAD_CLASS, box_area, target_valid

__all__ = ["det_augment_batch", "move_boxes"]


def move_boxes(targets: torch.Tensor, params: SegAugmentParams, image_size: tuple[int, int],
               out_size: tuple[int, int], min_size: float = 1.0, min_kept: float = 0.25) -> torch.Tensor:
    """Apply an augmentation to packed targets.

    Args:
        targets: ``[B, N, 5]`` packed boxes of images of size ``image_size = (H, W)``.
        params: the augmentation drawn for the batch (``seg_augment_params``).
        image_size: ``(H, W)`` before.
        out_size: ``(h, w)`` after (the crop size).
        min_size: drop boxes narrower or lower than this after clipping (pixels).
        min_kept: drop boxes keeping less than this fraction of their scaled area.

    Returns:
        ``[B, N, 5]`` float32: moved boxes; dropped boxes and padding are padding rows.
    """
    valid = target_valid(targets)
    (in_h, in_w), (out_h, out_w) = image_size, out_size
    boxes = targets[..., 1:].double()
    sy = (params.height.double() / in_h)[:, None]
    sx = (params.width.double() / in_w)[:, None]
    top, left = params.top.double()[:, None], params.left.double()[:, None]
    x0, x1 = boxes[..., 0] * sx - left, boxes[..., 2] * sx - left
    y0, y1 = boxes[..., 1] * sy - top, boxes[..., 3] * sy - top
    flip = params.flip[:, None]
    x0, x1 = torch.where(flip, out_w - x1, x0), torch.where(flip, out_w - x0, x1)
    scaled = torch.stack([x0, y0, x1, y1], -1)
    limit = torch.tensor([out_w, out_h, out_w, out_h], dtype=scaled.dtype)
    clipped = torch.minimum(scaled.clamp(min=0), limit)
    kept = box_area(clipped) >= min_kept * box_area(scaled)
    wide = ((clipped[..., 2] - clipped[..., 0]) >= min_size) & ((clipped[..., 3] - clipped[..., 1]) >= min_size)
    keep = valid & kept & wide
    out = torch.cat([targets[..., :1].double(), clipped], -1).float()
    out[~keep] = 0.0
    out[..., 0][~keep] = PAD_CLASS
    return out


def det_augment_batch(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                      config: SegAugmentConfig, min_size: float = 1.0,
                      min_kept: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of same-size images and their boxes, each sample its own draw.

    Args:
        images: ``[B, C, H, W]`` float or uint8 (read as ``x / 255``).
        targets: ``[B, N, 5]`` packed boxes.
        generator: the only source of randomness (the draws of ``seg_augment_params``).
        config: scale, crop, padding, flip and fill (its ``ignore_index`` is unused).
        min_size, min_kept: see :func:`move_boxes`.

    Returns:
        ``(images [B, C, h, w] float, targets [B, N, 5])``, ``(h, w)`` = ``config.crop_size`` or ``(H, W)``.
    """
    if images.ndim != 4 or targets.ndim != 3 or images.shape[0] != targets.shape[0]:
        raise DataError(f"det augment: images {list(images.shape)}, targets {list(targets.shape)}; expected "
                        "[B, C, H, W] and [B, N, 5]")
    size = tuple(images.shape[2:])
    params = seg_augment_params(images.shape[0], size, generator, config)
    blank = torch.zeros(images.shape[0], *size, dtype=torch.uint8)  # the image part reads a mask too
    out, _ = apply_seg_augment(images, blank, params, config)
    return out, move_boxes(targets, params, size, tuple(out.shape[2:]), min_size, min_kept)
