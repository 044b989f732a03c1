"""Ground-truth boxes -> CenterNet training targets on a detector's output grid.

Output cell ``(y, x)`` of a map at stride ``s`` covers input pixels ``[x*s, (x+1)*s)``; its centre is
``((x + 0.5) s, (y + 0.5) s)``. For each object of box ``(x0, y0, x1, y1)``:

* its **centre cell** is ``(floor(cy / s), floor(cx / s))`` (clamped to the map) with
  ``cx = (x0 + x1) / 2``; the **offset** is ``(cx / s - x, cy / s - y)`` and the **size**
  ``((x1 - x0) / s, (y1 - y0) / s)``, both in cells;
* its class heatmap gets an elliptical Gaussian centred on the centre cell (value exactly 1 there),
  ``sigma = alpha * size / 6`` per axis (TTFNet's rule), at least ``min_sigma``; overlapping
  Gaussians of one class take the maximum;
* its **footprint** is the cells whose centre lies inside the box, plus its centre cell. A cell in
  several footprints belongs to the smallest box (ties: the first object), so the objects and the
  background partition the map (``owner``): what per-object decision units are made of.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from mtkd.detection.boxes import box_area, target_valid

__all__ = ["CenterNetTargets", "encode_centernet", "location_owner"]


class CenterNetTargets(NamedTuple):
    """Training targets of B images with up to N objects on an ``h x w`` map of K classes.

    Attributes:
        heatmap: ``[B, K, h, w]`` float32 in ``[0, 1]``, exactly 1 at each object's centre cell.
        centre: ``[B, N]`` int64 flat index ``y * w + x`` of each object's centre cell (0 for padding).
        size: ``[B, N, 2]`` box width and height in cells.
        offset: ``[B, N, 2]`` the centre's position within its cell, ``(dx, dy)``.
        valid: ``[B, N]`` bool, real objects.
        owner: ``[B, h, w]`` int64, the object each cell belongs to, -1 for background.
    """

    heatmap: torch.Tensor
    centre: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor
    valid: torch.Tensor
    owner: torch.Tensor


def _centre_cells(boxes: torch.Tensor, stride: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, 4]`` -> (cell ``[B, N, 2]`` int64 ``(x, y)``, centre ``[B, N, 2]`` in cells)."""
    centre = torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2], -1) / stride
    cell = centre.floor().long()
    cell = torch.stack([cell[..., 0].clamp(0, width - 1), cell[..., 1].clamp(0, height - 1)], -1)
    return cell, centre


def location_owner(targets: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """The object each cell of an ``h x w`` map belongs to (see the module docstring).

    Args:
        targets: ``[B, N, 5]`` packed targets (:func:`~mtkd.detection.boxes.pack_targets`).
        stride: input pixels per cell.
        size: ``(h, w)`` of the map.

    Returns:
        ``[B, h, w]`` int64 object index in ``[0, N)``, or -1 (background).
    """
    valid = target_valid(targets)
    height, width = size
    boxes = targets[..., 1:]
    ys = (torch.arange(height, device=targets.device, dtype=boxes.dtype) + 0.5) * stride
    xs = (torch.arange(width, device=targets.device, dtype=boxes.dtype) + 0.5) * stride
    inside_y = (ys[None, None, :] >= boxes[..., 1:2]) & (ys[None, None, :] < boxes[..., 3:4])  # [B, N, h]
    inside_x = (xs[None, None, :] >= boxes[..., 0:1]) & (xs[None, None, :] < boxes[..., 2:3])  # [B, N, w]
    cover = inside_y[..., :, None] & inside_x[..., None, :]  # [B, N, h, w]
    cell, _ = _centre_cells(boxes, stride, height, width)
    flat = cover.flatten(2)
    flat.scatter_(2, (cell[..., 1] * width + cell[..., 0])[..., None], True)
    cover = flat.view_as(cover) & valid[..., None, None]
    area = torch.where(cover, box_area(boxes)[..., None, None], torch.full((), float("inf"), dtype=boxes.dtype,
                                                                              device=boxes.device))
    owner = area.argmin(1) if area.shape[1] else torch.zeros(area.shape[0], height, width, dtype=torch.int64)
    return torch.where(cover.any(1), owner, torch.full_like(owner, -1))


def encode_centernet(targets: torch.Tensor, num_classes: int, stride: int, size: tuple[int, int],
                     alpha: float = 0.54, min_sigma: float = 0.5) -> CenterNetTargets:
    """CenterNet targets of a batch (see the module docstring).

    Args:
        targets: ``[B, N, 5]`` packed ``(class, x0, y0, x1, y1)``, class -1 for padding.
        num_classes: K.
        stride: the output stride s.
        size: ``(h, w)`` of the output map.
        alpha: Gaussian spread as a fraction of the box (TTFNet: 0.54).
        min_sigma: the smallest standard deviation, in cells.

    Returns:
        :class:`CenterNetTargets`.
    """
    valid = target_valid(targets)
    labels = targets[..., 0].long()
    if valid.any() and int(labels[valid].max()) >= num_classes:
        raise ValueError(f"detection targets hold class {int(labels[valid].max())}; the model has {num_classes}")
    height, width = size
    boxes = targets[..., 1:].float()
    batch, rows = valid.shape
    cell, centre = _centre_cells(boxes, stride, height, width)
    box_size = torch.stack([boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], -1) / stride
    sigma = (alpha * box_size / 6).clamp(min=min_sigma)  # [B, N, 2]
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    gy = torch.exp(-((ys[None, None] - cell[..., 1:2]) ** 2) / (2 * sigma[..., 1:2] ** 2))  # [B, N, h]
    gx = torch.exp(-((xs[None, None] - cell[..., 0:1]) ** 2) / (2 * sigma[..., 0:1] ** 2))  # [B, N, w]
    blobs = (gy[..., :, None] * gx[..., None, :]) * valid[..., None, None]  # [B, N, h, w], 1 at the centre cell
    heatmap = torch.zeros(batch, num_classes, height, width, device=boxes.device)
    index = labels.clamp(min=0)[..., None, None].expand(-1, -1, height, width)
    heatmap.scatter_reduce_(1, index, blobs, reduce="amax")
    centre_index = torch.where(valid, cell[..., 1] * width + cell[..., 0], torch.zeros_like(cell[..., 0]))
    offset = torch.where(valid[..., None], centre - cell.to(centre.dtype), torch.zeros_like(centre))
    box_size = torch.where(valid[..., None], box_size, torch.zeros_like(box_size))
    return CenterNetTargets(heatmap, centre_index, box_size, offset, valid, location_owner(targets, stride, size))
