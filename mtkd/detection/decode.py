"""Detector outputs -> boxes: a max-pool peak search over the class heatmaps (no NMS needed).

A cell of class ``k`` is a peak when its heatmap score is the maximum of its ``pool x pool``
neighbourhood (ties kept: every cell of a plateau is a peak). The ``top_k`` highest peaks over all
classes and cells of an image become boxes centred at ``((x + dx) s, (y + dy) s)`` of size
``(w s, h s)``, read from the box channels at that cell (:mod:`mtkd.detection.encode`'s
parameterisation), clipped to the image.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtkd.detection.boxes import batched_nms
from mtkd.detection.models import split_logits

__all__ = ["Detections", "decode_centernet", "peak_mask"]


class Detections(NamedTuple):
    """``top_k`` detections per image, by decreasing score.

    Attributes:
        boxes: ``[B, k, 4]`` xyxy in input pixels.
        scores: ``[B, k]`` in ``[0, 1]``; 0 for padding (fewer peaks than ``k``, or below the threshold).
        labels: ``[B, k]`` int64 classes; -1 for padding.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def peak_mask(scores: torch.Tensor, pool: int = 3) -> torch.Tensor:
    """``[B, K, h, w]`` -> bool ``[B, K, h, w]``: the cells equal to the max of their ``pool x pool``
    neighbourhood (the border counts as -inf)."""
    if pool % 2 != 1 or pool < 1:
        raise ValueError(f"pool must be an odd int >= 1; got {pool}")
    return F.max_pool2d(scores, pool, stride=1, padding=pool // 2) == scores


@torch.no_grad()
def decode_centernet(logits: torch.Tensor, stride: int, image_size: tuple[int, int], top_k: int = 100,
                     pool: int = 3, threshold: float = 0.0, nms_iou: float | None = None) -> Detections:
    """Decode CenterNet outputs.

    Args:
        logits: ``[B, K + 4, h, w]`` detector logits (:class:`~mtkd.detection.models.DetectionOutputs`).
        stride: input pixels per cell.
        image_size: ``(H, W)``; boxes are clipped to it.
        top_k: detections kept per image (COCO scores at most 100).
        pool: the peak neighbourhood.
        threshold: drop detections scoring at most this (they become padding).
        nms_iou: also run per-class NMS at this IoU among the kept peaks (None: no NMS, CenterNet's way).

    Returns:
        :class:`Detections` with ``k = min(top_k, K * h * w)``.
    """
    maps = split_logits(logits.float())
    scores = maps.heatmap.sigmoid()
    batch, classes, height, width = scores.shape
    peaks = torch.where(peak_mask(scores, pool), scores, torch.full_like(scores, -1.0))
    k = min(top_k, classes * height * width)
    top, index = peaks.flatten(1).topk(k, dim=1)  # [B, k]; index = class * h * w + y * w + x
    labels = index // (height * width)
    cell = index % (height * width)
    ys, xs = (cell // width).to(scores.dtype), (cell % width).to(scores.dtype)

    def at(m: torch.Tensor) -> torch.Tensor:  # [B, 2, h, w] -> [B, k, 2] at the peaks' cells
        return m.flatten(2).gather(2, cell[:, None, :].expand(-1, 2, -1)).transpose(1, 2)

    size, offset = at(maps.size), at(maps.offset)
    cx, cy = (xs + offset[..., 0]) * stride, (ys + offset[..., 1]) * stride
    half_w, half_h = size[..., 0] * stride / 2, size[..., 1] * stride / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)
    limit = torch.tensor([image_size[1], image_size[0]] * 2, dtype=boxes.dtype, device=boxes.device)
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    keep = top > threshold
    if nms_iou is not None:
        keep = keep & _nms_keep(boxes, top, labels, nms_iou)
    # padding to the end, keeping the score order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    keep, top, labels = keep.gather(1, order), top.gather(1, order), labels.gather(1, order)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    return Detections(torch.where(keep[..., None], boxes, torch.zeros_like(boxes)),
                      torch.where(keep, top, torch.zeros_like(top)), torch.where(keep, labels, torch.full_like(labels, -1)))


def _nms_keep(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for b in range(boxes.shape[0]):
        keep[b, batched_nms(boxes[b], scores[b], labels[b], iou)] = True
    return keep
