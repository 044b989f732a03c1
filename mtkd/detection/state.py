"""The agent's state of a detection step per (unit, teacher): what the agent reads of each teacher.

Per teacher, four values, in this order (the task's ``state_layout``: ``D_m = 1``, ``C = 0``):

* ``cos``: cosine of the pooled projected student feature and the pooled teacher feature over the
  unit's cells (per image: the whole map, i.e. the teacher's embedding);
* ``KL``: the heatmap distillation (binary KL at T, FGD-weighted per image) on the unit;
* ``CE``: the teacher's own classification loss, the mean penalty-reduced focal loss of its heatmap
  over the unit's cells (per image: over all cells);
* ``loc``: its localisation error, ``1 - IoU`` of the box it predicts at the object's centre cell
  with the object's box (:func:`~mtkd.detection.losses.centre_iou`); the background unit and a whole
  image take the mean over the image's objects (0 without objects).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd.detection.encode import CenterNetTargets
from mtkd.detection.losses import centre_iou, focal_map, heatmap_kd
from mtkd.detection.models import split_logits
from mtkd.detection.regions import pool_by_object, reduce_by_object

__all__ = ["StateParts", "state_parts"]


class StateParts:
    """``cos``, ``kl``, ``ce``, ``loc``: ``[B, U_b, M]`` each (``U_b`` = 1 per image, ``N + 1`` per object)."""

    def __init__(self, cos: torch.Tensor, kl: torch.Tensor, ce: torch.Tensor, loc: torch.Tensor):
        self.cos, self.kl, self.ce, self.loc = cos, kl, ce, loc

    def vector(self) -> torch.Tensor:
        """``[B * U_b, 4M]``: per teacher ``[cos, KL, CE, loc]``, teacher after teacher."""
        stacked = torch.stack([self.cos, self.kl, self.ce, self.loc], 3)  # [B, U_b, M, 4]
        return stacked.flatten(2).flatten(0, 1)


def _resized(heatmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(heatmap.shape[-2:]) == tuple(size):
        return heatmap
    return F.interpolate(heatmap, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def state_parts(student_logits: torch.Tensor, projected: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                teacher_features: list[torch.Tensor], encoded: CenterNetTargets, boxes: torch.Tensor, stride: int,
                temperature: float, per_object: bool, fg_share: float | None = 0.5) -> StateParts:
    """The four state values per unit and teacher (see the module docstring).

    Args:
        student_logits: ``[B, K + 4, h, w]``.
        projected: per teacher, the projected student feature ``[B, D_m, h, w]``.
        teacher_logits: per teacher ``[B, K + 4, h, w]``. teacher_features: per teacher ``[B, D_m, h, w]``.
        encoded: the batch's encoded targets on the ``h x w`` map (``owner``, ``heatmap``, centres).
        boxes: ``[B, N, 4]`` ground-truth boxes. stride: the output stride.
        temperature: of the KL. per_object: units are objects + background, else images.
        fg_share: the objects' share of an image's KL (as the distillation term).

    Returns:
        :class:`StateParts`, detached.
    """
    owner, valid = encoded.owner, encoded.valid
    n = valid.shape[1]
    size = tuple(student_logits.shape[-2:])
    cos, kl, ce, loc = [], [], [], []
    objects = valid.sum(1).clamp(min=1).to(torch.float32)
    for s_map, z, feature in zip(projected, teacher_logits, teacher_features):
        kd = heatmap_kd(student_logits, z, temperature, owner, n, fg_share)
        focal = reduce_by_object(focal_map(_resized(split_logits(z).heatmap, size), encoded.heatmap), owner, n, None)
        error = torch.where(valid, 1 - centre_iou(z, encoded, boxes, stride), torch.zeros(()))  # [B, N]
        mean_error = error.sum(1) / objects  # [B]
        if per_object:
            pooled_s, pooled_t = pool_by_object(s_map, owner, n), pool_by_object(feature, owner, n)  # [B, N+1, D]
            cos.append(F.cosine_similarity(pooled_s, pooled_t, dim=2))
            kl.append(kd.units)
            ce.append(focal.units)
            loc.append(torch.cat([error, mean_error[:, None]], 1))
        else:
            cos.append(F.cosine_similarity(s_map.mean((2, 3)), feature.mean((2, 3)), dim=1)[:, None])
            kl.append(kd.per_image[:, None])
            ce.append(focal.per_image[:, None])  # by cell count: the mean over all cells
            loc.append(mean_error[:, None])
    return StateParts(*(torch.stack(v, 2) for v in (cos, kl, ce, loc)))
