"""Per-object reduction of a per-cell loss map: what per-object decision units are made of.

The cells of a map are partitioned by ``owner`` (:func:`mtkd.detection.encode.location_owner`): each
cell belongs to one object or to the background. An image has ``N + 1`` units: its N objects (padding
objects and objects that own no cell are empty) and its background. A unit's value is the mean of the
map over its cells; the image's value is a weighted sum of its units' values, with weights ``mass``
(summing to 1 per image), so per-unit weights of equal value give back the per-image value exactly:

* ``fg_share = f`` (FGD's foreground/background split): the non-empty objects share ``f`` equally
  (each box counts as much whatever its area, as FGD's scale mask does), the background ``1 - f``;
  all to one side when the other is empty;
* ``fg_share = None``: every unit weighs by its cell count, so the image's value is the plain mean
  over all its cells.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ObjectValues", "pool_by_object", "reduce_by_object"]


class ObjectValues(NamedTuple):
    """A per-cell map reduced per unit (B images, N object slots).

    Attributes:
        units: ``[B, N + 1]`` mean over each unit's cells (objects ``0..N-1``, then the background);
            0 for an empty unit.
        count: ``[B, N + 1]`` int64 cells per unit.
        mass: ``[B, N + 1]`` each unit's share of its image's value (rows sum to 1; 0 for empty units).
        per_image: ``[B]`` ``(mass * units).sum(1)``.
    """

    units: torch.Tensor
    count: torch.Tensor
    mass: torch.Tensor
    per_image: torch.Tensor

    @property
    def objects(self) -> torch.Tensor:
        """``[B, N]`` the objects' values."""
        return self.units[:, :-1]

    @property
    def background(self) -> torch.Tensor:
        """``[B]`` the background's value."""
        return self.units[:, -1]


def reduce_by_object(values: torch.Tensor, owner: torch.Tensor, num_objects: int,
                     fg_share: float | None = 0.5) -> ObjectValues:
    """Reduce a per-cell map per object and background (see the module docstring).

    Args:
        values: ``[B, h, w]`` per-cell values.
        owner: ``[B, h, w]`` int64 object index in ``[0, N)`` or -1 (background).
        num_objects: N, the object slots (padding included).
        fg_share: the objects' share of an image's value, in ``[0, 1]``; None: by cell count.

    Returns:
        :class:`ObjectValues`.
    """
    if values.shape != owner.shape or values.ndim != 3:
        raise ValueError(f"values {tuple(values.shape)} and owner {tuple(owner.shape)} must both be [B, h, w]")
    if fg_share is not None and not 0 <= fg_share <= 1:
        raise ValueError(f"fg_share must be in [0, 1] or None; got {fg_share}")
    batch, n = values.shape[0], int(num_objects)
    unit = torch.where(owner < 0, torch.full_like(owner, n), owner).flatten(1)  # [B, h*w]
    dtype = torch.promote_types(values.dtype, torch.float32)
    sums = torch.zeros(batch, n + 1, dtype=dtype, device=values.device).scatter_add(1, unit, values.flatten(1).to(dtype))
    count = torch.zeros(batch, n + 1, dtype=torch.int64, device=values.device).scatter_add(
        1, unit, torch.ones_like(unit))
    units = sums / count.clamp(min=1).to(dtype)
    filled = (count > 0).to(dtype)
    if fg_share is None:
        mass = count.to(dtype) / count.sum(1, keepdim=True).clamp(min=1).to(dtype)
    else:
        objects = filled[:, :-1].sum(1, keepdim=True)  # [B, 1] non-empty objects
        has_bg = filled[:, -1:]
        fg = torch.where(has_bg > 0, torch.full_like(has_bg, fg_share), torch.ones_like(has_bg))
        fg = torch.where(objects > 0, fg, torch.zeros_like(fg))  # no object: everything to the background
        mass = torch.cat([filled[:, :-1] * fg / objects.clamp(min=1), has_bg * (1 - fg)], 1)
    return ObjectValues(units, count, mass, (mass * units).sum(1))


def pool_by_object(feature: torch.Tensor, owner: torch.Tensor, num_objects: int) -> torch.Tensor:
    """Average a feature map over each unit's cells (for the agent's pooled-feature cosine per unit).

    Args:
        feature: ``[B, C, h, w]``.
        owner: ``[B, h, w]`` int64 object index in ``[0, N)`` or -1 (background).
        num_objects: N.

    Returns:
        ``[B, N + 1, C]``: objects, then the background; zeros for an empty unit.
    """
    if feature.ndim != 4 or feature.shape[:1] + feature.shape[2:] != owner.shape:
        raise ValueError(f"feature {tuple(feature.shape)} and owner {tuple(owner.shape)}: expected [B, C, h, w], [B, h, w]")
    batch, channels = feature.shape[:2]
    n = int(num_objects)
    unit = torch.where(owner < 0, torch.full_like(owner, n), owner).flatten(1)  # [B, h*w]
    sums = torch.zeros(batch, n + 1, channels, dtype=feature.dtype, device=feature.device)
    sums.scatter_add_(1, unit[..., None].expand(-1, -1, channels), feature.flatten(2).transpose(1, 2))
    count = torch.zeros(batch, n + 1, dtype=feature.dtype, device=feature.device).scatter_add(
        1, unit, torch.ones_like(unit, dtype=feature.dtype))
    return sums / count.clamp(min=1)[..., None]
