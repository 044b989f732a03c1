"""Box operations: areas, IoU, greedy NMS, and the packed target layout of a detection batch.

Coordinates are continuous pixels, ``(x0, y0, x1, y1)`` with ``x0 < x1``: pixel column ``i`` covers
``[i, i + 1)``, so the tight box of a mask whose columns run ``c0 .. c1`` is ``x0 = c0, x1 = c1 + 1``.

A batch's ground truth travels as **one tensor** ``[B, N, 5]`` float32 (:func:`pack_targets`): row
``(class, x0, y0, x1, y1)`` per object, ``N`` the batch's largest count, padding rows with class -1.
So detection targets fit wherever a batch's labels are one tensor (the loader, the task layer).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["box_area", "box_iou", "nms", "batched_nms", "pack_targets", "unpack_targets", "target_valid"]

PAD_CLASS = -1
"""Class of the padding rows of packed targets."""


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyxy -> ``[...]`` area (0 for an empty or inverted box)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: ``a [N, 4]``, ``b [M, 4]`` xyxy -> ``[N, M]`` (0 where the union is empty)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (no compiled op needed).

    Boxes are visited by decreasing score (ties: lower index first); a box is kept unless its IoU
    with an already kept box is above ``iou_threshold``.

    Args:
        boxes: ``[N, 4]`` xyxy.
        scores: ``[N]``.
        iou_threshold: suppress above this IoU.

    Returns:
        ``[K]`` int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms: boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)}; expected [N, 4] and [N]")
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order], boxes[order]) > iou_threshold  # [N, N] in score order
    suppressed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    keep = []
    # one pass over the sorted boxes; each kept box suppresses its overlaps among the later ones
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i]
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms` within each group (class): boxes of different groups never suppress each other.

    Shapes: ``boxes [N, 4]``, ``scores [N]``, ``groups [N]`` int -> ``[K]`` int64 kept indices by
    decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    # shift each group far from the others, so that only boxes of one group can overlap
    span = (boxes.max() - boxes.min()).abs() + 1
    shifted = boxes + (groups.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def pack_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], min_rows: int = 0) -> torch.Tensor:
    """Per-image boxes and labels -> one ``[B, N, 5]`` float32 tensor (see the module docstring).

    Args:
        boxes: B tensors ``[n_b, 4]`` xyxy.
        labels: B int tensors ``[n_b]`` in ``[0, K)``.
        min_rows: N at least this (so that fixed-size batches stack).

    Returns:
        ``[B, N, 5]``, ``N = max(min_rows, max_b n_b)``; padding rows ``(-1, 0, 0, 0, 0)``.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"pack_targets: {len(boxes)} box sets and {len(labels)} label sets")
    rows = max([min_rows, *(int(b.shape[0]) for b in boxes)])
    out = torch.zeros(len(boxes), rows, 5)
    out[:, :, 0] = PAD_CLASS
    for i, (b, l) in enumerate(zip(boxes, labels)):
        n = int(b.shape[0])
        if b.shape != (n, 4) or l.shape != (n,):
            raise ValueError(f"pack_targets: image {i} has boxes {tuple(b.shape)} and labels {tuple(l.shape)}")
        out[i, :n, 0] = l.to(torch.float32)
        out[i, :n, 1:] = b.to(torch.float32)
    return out


def target_valid(targets: torch.Tensor) -> torch.Tensor:
    """``[B, N, 5]`` packed targets -> ``[B, N]`` bool, the real (non-padding) rows."""
    if targets.ndim != 3 or targets.shape[-1] != 5:
        raise ValueError(f"detection targets must be [B, N, 5] (class, x0, y0, x1, y1); got {tuple(targets.shape)}")
    return targets[..., 0] >= 0


def unpack_targets(targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[B, N, 5]`` -> B pairs ``(boxes [n_b, 4] float32, labels [n_b] int64)`` without the padding."""
    valid = target_valid(targets)
    return [(t[v, 1:], t[v, 0].long()) for t, v in zip(targets, valid)]
