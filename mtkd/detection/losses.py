"""Detection losses: CenterNet's task loss and three distillation terms, per image and per object.

Maps are at the detector's output stride (all registered detectors: 4). The task loss reads the
targets of :func:`mtkd.detection.encode.encode_centernet`; the per-object values read its ``owner``
partition (:mod:`mtkd.detection.regions`).

* **Task loss** (Zhou et al., "Objects as Points", 2019): the penalty-reduced focal loss on the
  heatmaps, summed over cells and classes, divided by the image's positives; plus L1 of the size (weight
  0.1) and offset (weight 1) at each object's centre cell, averaged over the image's objects.
* **Heatmap distillation**: binary KL at temperature T per class and cell,
  ``T^2 sum_k [q log(q / p) + (1 - q) log((1 - q) / (1 - p))]``, ``p = sigmoid(z_s / T)``,
  ``q = sigmoid(z_t / T)``, averaged per unit and weighted to the foreground as FGD (Yang et al.,
  "Focal and Global Knowledge Distillation for Detectors", CVPR 2022) weights its masks: every box
  the same share whatever its area, the background the rest.
* **Regression distillation**: L1 between the student's and the teacher's four box channels at each
  object's centre cell (the positive locations), averaged over the channels.
* **Feature distillation** as PKD (Cao et al., "PKD: General Distillation Framework for Object
  Detectors via Pearson Correlation Coefficient", NeurIPS 2022): each channel standardised to zero
  mean and unit variance, then half the squared difference averaged over channels. PKD (mmrazor's
  ``PKDLoss``) standardises a channel over the whole batch; here over each image's cells, so that an
  image's value does not depend on the other images of its batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtkd.detection.boxes import box_iou
from mtkd.detection.encode import CenterNetTargets
from mtkd.detection.models import split_logits
from mtkd.detection.regions import ObjectValues, reduce_by_object

__all__ = ["DetectionLoss", "binary_kd_map", "centernet_loss", "centre_iou", "focal_map", "heatmap_kd",
           "pkd_feature_map", "pkd_loss", "regression_kd"]


class DetectionLoss(NamedTuple):
    """CenterNet's task loss of B images with N object slots.

    Attributes:
        per_image: ``[B]`` ``heatmap + size_weight * size + offset_weight * offset``.
        heatmap: ``[B]`` focal loss (sum over cells and classes / the image's positives, at least 1).
        size: ``[B]`` mean L1 of the size at the centre cells (0 without objects).
        offset: ``[B]`` mean L1 of the offset there.
        per_object: ``[B, N]`` the focal loss summed over the object's cells, plus the weighted size and
            offset L1 at its centre (0 for padding); the background's focal sum is ``background``.
        background: ``[B]`` the focal loss summed over the background cells.
    """

    per_image: torch.Tensor
    heatmap: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor
    per_object: torch.Tensor
    background: torch.Tensor


def _check_pair(what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be the "
                         "same [B, C, h, w] (detectors of one output stride and class count)")


def focal_map(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """Penalty-reduced focal loss per cell, summed over classes.

    ``-(1 - p)^alpha log p`` where the target is 1, ``-(1 - y)^beta p^alpha log(1 - p)`` elsewhere,
    ``p = sigmoid(logit)`` (computed from log-sigmoids: finite for any logit).

    Shapes: ``logits [B, K, h, w]``, ``target [B, K, h, w]`` in ``[0, 1]`` -> ``[B, h, w]``.
    """
    if logits.shape != target.shape:
        raise ValueError(f"focal loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    logits = logits.float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    positive = target == 1
    pos = -torch.exp(alpha * log_not_p) * log_p
    neg = -torch.pow(1 - target, beta) * torch.exp(alpha * log_p) * log_not_p
    return torch.where(positive, pos, neg).sum(1)


def _at_centres(maps: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` read at flat cells ``centre [B, N]`` -> ``[B, N, C]``."""
    return maps.flatten(2).gather(2, centre[:, None, :].expand(-1, maps.shape[1], -1)).transpose(1, 2)


def _object_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` -> ``[B]`` mean over the valid objects (0 without any)."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum(1)
    return total / valid.sum(1).clamp(min=1).to(total.dtype)


def centernet_loss(logits: torch.Tensor, targets: CenterNetTargets, size_weight: float = 0.1,
                   offset_weight: float = 1.0) -> DetectionLoss:
    """CenterNet's task loss per image and per object.

    Args:
        logits: ``[B, K + 4, h, w]`` detector logits.
        targets: from :func:`~mtkd.detection.encode.encode_centernet` on the same ``(h, w)``.
        size_weight, offset_weight: weights of the two L1 terms (CenterNet: 0.1 and 1).

    Returns:
        :class:`DetectionLoss`.
    """
    maps = split_logits(logits)
    focal = focal_map(maps.heatmap, targets.heatmap)  # [B, h, w]
    positives = (targets.heatmap == 1).flatten(1).sum(1).clamp(min=1).to(focal.dtype)
    heatmap = focal.flatten(1).sum(1) / positives
    valid = targets.valid
    size_l1 = (_at_centres(maps.size.float(), targets.centre) - targets.size).abs().mean(2)  # [B, N]
    offset_l1 = (_at_centres(maps.offset.float(), targets.centre) - targets.offset).abs().mean(2)
    size, offset = _object_mean(size_l1, valid), _object_mean(offset_l1, valid)
    sums = reduce_by_object(focal, targets.owner, valid.shape[1], fg_share=None)
    focal_sums = sums.units * sums.count.to(sums.units.dtype)  # [B, N + 1] focal summed per unit
    per_object = torch.where(valid, focal_sums[:, :-1] + size_weight * size_l1 + offset_weight * offset_l1,
                             torch.zeros_like(size_l1))
    return DetectionLoss(heatmap + size_weight * size + offset_weight * offset, heatmap, size, offset, per_object,
                         focal_sums[:, -1])


@torch.no_grad()
def centre_iou(logits: torch.Tensor, targets: CenterNetTargets, boxes: torch.Tensor, stride: int) -> torch.Tensor:
    """IoU of the box a detector predicts at each object's centre cell with the object's box.

    Args:
        logits: ``[B, K + 4, h, w]``.
        targets: the encoded targets (for the centre cells).
        boxes: ``[B, N, 4]`` the ground-truth boxes (``packed[..., 1:]``).
        stride: the output stride.

    Returns:
        ``[B, N]`` in ``[0, 1]`` (0 for padding): ``1 - centre_iou`` is a scale-free localisation error.
    """
    maps = split_logits(logits.float())
    width = maps.size.shape[-1]
    size, offset = _at_centres(maps.size, targets.centre), _at_centres(maps.offset, targets.centre)
    cx = ((targets.centre % width).to(size.dtype) + offset[..., 0]) * stride
    cy = ((targets.centre // width).to(size.dtype) + offset[..., 1]) * stride
    half_w, half_h = size[..., 0].clamp(min=0) * stride / 2, size[..., 1].clamp(min=0) * stride / 2
    predicted = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)
    iou = torch.stack([box_iou(p, g).diagonal() for p, g in zip(predicted, boxes.float())])
    return torch.where(targets.valid, iou, torch.zeros_like(iou))


def binary_kd_map(student_heatmap: torch.Tensor, teacher_heatmap: torch.Tensor, T: float) -> torch.Tensor:
    """Binary KL(teacher || student) at temperature per cell, summed over classes, ``T^2`` included.

    Args:
        student_heatmap: ``[B, K, h, w]`` logits.
        teacher_heatmap: ``[B, K, h', w']`` logits; resized to ``(h, w)`` first (bilinear, in logit space).
        T: temperature (> 0).

    Returns:
        ``[B, h, w]``.
    """
    if not T > 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    if teacher_heatmap.shape[-2:] != student_heatmap.shape[-2:]:
        teacher_heatmap = F.interpolate(teacher_heatmap, size=student_heatmap.shape[-2:], mode="bilinear",
                                        align_corners=False)
    _check_pair("heatmap distillation", student_heatmap, teacher_heatmap)
    zs, zt = student_heatmap.float() / T, teacher_heatmap.float() / T
    q = torch.sigmoid(zt)
    # log q - log p = logsigmoid(zt) - logsigmoid(zs); the same with the negated logits for 1 - q
    kl = q * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - q) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
    return (T * T) * kl.sum(1)


def heatmap_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, owner: torch.Tensor,
               num_objects: int, fg_share: float | None = 0.5) -> ObjectValues:
    """Heatmap distillation per object, background and image (FGD's foreground weighting).

    Args:
        student_logits: ``[B, K + 4, h, w]`` detector logits.
        teacher_logits: ``[B, K + 4, h', w']``.
        T: temperature.
        owner: ``[B, h, w]`` the cells' objects (``CenterNetTargets.owner``).
        num_objects: N.
        fg_share: the boxes' share of an image's value (:func:`~mtkd.detection.regions.reduce_by_object`).

    Returns:
        :class:`~mtkd.detection.regions.ObjectValues` (``per_image [B]``, ``units [B, N + 1]``).
    """
    kd = binary_kd_map(split_logits(student_logits).heatmap, split_logits(teacher_logits).heatmap, T)
    return reduce_by_object(kd, owner, num_objects, fg_share)


def regression_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: CenterNetTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 between student and teacher box channels at the objects' centre cells.

    Args:
        student_logits: ``[B, K + 4, h, w]``.
        teacher_logits: ``[B, K + 4, h, w]`` (same output stride: box channels are in cells).
        targets: the encoded targets (centre cells, validity).

    Returns:
        ``(per_image [B], per_object [B, N])``: the mean over the 4 channels per object (0 for padding),
        and its mean over the image's objects (0 without objects).
    """
    _check_pair("regression distillation", student_logits, teacher_logits)
    k = student_logits.shape[1] - 4
    gap = (_at_centres(student_logits[:, k:].float(), targets.centre)
           - _at_centres(teacher_logits[:, k:].float(), targets.centre)).abs().mean(2)
    per_object = torch.where(targets.valid, gap, torch.zeros_like(gap))
    return _object_mean(per_object, targets.valid), per_object


def pkd_feature_map(student_feature: torch.Tensor, teacher_feature: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PKD's standardised feature distance per cell.

    Args:
        student_feature: ``[B, C, h, w]`` the projected student neck map.
        teacher_feature: ``[B, C, h, w]``.
        eps: added to each channel's standard deviation (population, over the image's cells).

    Returns:
        ``[B, h, w]``: ``0.5 * mean_c (s_hat - t_hat)^2``.
    """
    _check_pair("PKD feature distillation", student_feature, teacher_feature)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.var(dim=(2, 3), unbiased=False, keepdim=True).sqrt()
        return (x - mean) / (std + eps)

    return 0.5 * (standardise(student_feature) - standardise(teacher_feature)).pow(2).mean(1)


def pkd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, owner: torch.Tensor | None = None,
             num_objects: int = 0, fg_share: float | None = None) -> ObjectValues:
    """PKD per image (and per object with ``owner``): :func:`pkd_feature_map` reduced per unit.

    Shapes: features ``[B, C, h, w]``, ``owner [B, h, w]`` (None: every cell background) -> ObjectValues
    with ``per_image [B]`` (the plain mean over cells when ``fg_share`` is None).
    """
    values = pkd_feature_map(student_feature, teacher_feature)
    if owner is None:
        owner = torch.full(values.shape, -1, dtype=torch.int64, device=values.device)
    return reduce_by_object(values, owner, num_objects, fg_share)
