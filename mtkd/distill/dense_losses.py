"""Per-image and per-cell distillation losses for semantic segmentation.

Conventions:

* logits are maps ``[B, K, h, w]`` at the head's native stride; labels are ``[B, H, W]`` integers with
  ``ignore_index`` (255) marking pixels that take no part;
* a teacher whose logits are at another stride is resized to the student's logit size with bilinear
  interpolation (``align_corners=False``) *in logit space*, before any softmax
  (:func:`resize_logits`);
* labels are brought to a logit size by nearest sampling: logit pixel ``(i, j)`` takes the label of
  pixel ``(i * H // h, j * W // w)`` (:func:`downsample_labels`, the rule of
  ``F.interpolate(mode="nearest")``, in exact integer arithmetic);
* every per-image loss returns ``[B]`` (so per-image teacher weights ``[B, M]`` can multiply it) and
  never reduces over the batch; an image with no valid pixel gets 0;
* every per-cell loss returns a :class:`CellValues` on a ``G x G`` grid: the mean over each cell's valid
  pixels ``[B, G, G]``, its validity and its pixel count. ``value.flatten(1)`` is ``[B, G*G]``, cell
  ``gy * G + gx`` (row-major), which per-cell weights ``[B, G*G, M]`` can multiply. The cells partition
  the map: cell row ``gy`` covers rows ``floor(gy*h/G) .. floor((gy+1)*h/G) - 1`` (columns alike), so a
  map smaller than ``G`` has empty cells, and the count-weighted mean of the cells is the per-image
  value exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtkd.models.segmentation.outputs import upsample_logits

__all__ = [
    "CellValues", "cell_ids", "cell_mean", "cwd_cells", "cwd_loss", "dense_feature_mse", "dense_feature_mse_cells", "downsample_labels",
    "pixel_ce", "pixel_ce_cells", "pixel_ce_map", "pixel_kd_kl", "pixel_kd_kl_cells", "pixel_kd_kl_map",
    "resize_logits", "valid_mask",
]


class CellValues(NamedTuple):
    """A per-cell reduction on a ``G x G`` grid.

    Attributes:
        value: ``[B, G, G]`` mean over the cell's valid pixels (0 where the cell has none).
        valid: ``[B, G, G]`` bool, the cell has at least one valid pixel.
        count: ``[B, G, G]`` int64, the number of valid pixels in the cell.
    """

    value: torch.Tensor
    valid: torch.Tensor
    count: torch.Tensor


# ----------------------------------------------------------------------------- checks and resizing
def _check_map(name: str, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be a [B, K, h, w] map, got shape {tuple(x.shape)}")


def _check_labels(labels: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(f"labels have batch {labels.shape[0]}, the logits {batch}")
    return labels.long()


def _check_temperature(T: float) -> None:
    if not T > 0:
        raise ValueError(f"temperature must be > 0, got {T}")


def _check_valid(valid: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor | None:
    """``valid`` against a ``[B, ..., h, w]`` reference: ``[B, h, w]`` bool or None."""
    if valid is None:
        return None
    expected = (reference.shape[0], *reference.shape[-2:])
    if tuple(valid.shape) != expected:
        raise ValueError(f"valid mask must be {list(expected)}, got {list(valid.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid mask must be bool, got {valid.dtype}")
    return valid


def _check_grid(grid: int) -> int:
    if int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid}")
    return int(grid)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, K, h', w']`` -> ``[B, K, *size]`` by bilinear interpolation, ``align_corners=False``
    (identity when the size already matches). Applied to logits, before any softmax."""
    _check_map("logits", logits)
    return upsample_logits(logits, (int(size[0]), int(size[1])))


def _align_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
    _check_map(f"student {what}", student_logits)
    _check_map(f"teacher {what}", teacher_logits)
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student {what} {tuple(student_logits.shape)} and teacher {what} {tuple(teacher_logits.shape)} "
            f"differ in batch or channel count; teachers and student must share the class count"
        )
    return resize_logits(teacher_logits, tuple(student_logits.shape[-2:]))


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest sampling of ``[B, H, W]`` labels to ``[B, *size]``: output ``(i, j)`` takes input
    ``(i * H // h, j * W // w)`` (``F.interpolate``'s ``"nearest"`` rule; exact for any integer dtype).
    Returns int64."""
    labels = _check_labels(labels)
    H, W = labels.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if (H, W) == (h, w):
        return labels
    rows = torch.arange(h, device=labels.device) * H // h
    cols = torch.arange(w, device=labels.device) * W // w
    return labels[:, rows][:, :, cols]


def valid_mask(labels: torch.Tensor, size: tuple[int, int], ignore_index: int = 255) -> torch.Tensor:
    """``[B, *size]`` bool: the pixels of a logit map whose nearest-sampled label is not ``ignore_index``
    (see :func:`downsample_labels`)."""
    return downsample_labels(labels, size) != ignore_index


# ----------------------------------------------------------------------------- reductions
def _masked_image_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B]`` mean over the valid pixels (0 for an image with none). Masked with
    ``where``, so values at invalid pixels (even inf or NaN) never reach the result."""
    if valid is None:
        return values.flatten(1).mean(dim=1)
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).flatten(1).sum(1)
    count = valid.flatten(1).sum(1)
    return total / count.clamp(min=1).to(total.dtype)


def _cell_matrix(n: int, grid: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[G, n]`` 0/1 membership: index ``k`` belongs to cell ``g`` iff
    ``floor(g*n/G) <= k < floor((g+1)*n/G)``."""
    bounds = torch.tensor([(g * n) // grid for g in range(grid + 1)], device=device)
    k = torch.arange(n, device=device)
    member = (k[None, :] >= bounds[:-1, None]) & (k[None, :] < bounds[1:, None])
    return member.to(dtype)


def cell_ids(height: int, width: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """``[h, w]`` int64: the cell ``gy * G + gx`` of each pixel of an ``h x w`` map; cell row ``gy``
    covers rows ``floor(gy*h/G) .. floor((gy+1)*h/G) - 1`` (columns alike), as the per-cell losses."""
    # the membership matrices of the per-cell losses ([G, n], one 1 per column): one partition for both
    gy = _cell_matrix(height, grid, torch.float32, device).argmax(0)
    gx = _cell_matrix(width, grid, torch.float32, device).argmax(0)
    return gy[:, None] * grid + gx[None, :]


def _cell_sum(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``[..., h, w]`` -> ``[..., G, G]`` sums over each cell, as ``R @ x @ C^T`` (deterministic,
    differentiable; autocast off so the sums stay in at least float32)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = _cell_matrix(x.shape[-2], grid, dtype, x.device)
    cols = _cell_matrix(x.shape[-1], grid, dtype, x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return rows @ x.to(dtype) @ cols.T


def cell_mean(values: torch.Tensor, grid: int, valid: torch.Tensor | None = None) -> CellValues:
    """Mean of a per-pixel map over the valid pixels of each cell of a ``G x G`` grid.

    Args:
        values: ``[B, h, w]``.
        grid: G.
        valid: optional ``[B, h, w]`` bool; all pixels when None.

    Returns:
        :class:`CellValues` with ``[B, G, G]`` tensors; a cell with no valid pixel has value 0.
    """
    grid = _check_grid(grid)
    if values.ndim != 3:
        raise ValueError(f"values must be [B, h, w], got shape {tuple(values.shape)}")
    valid = _check_valid(valid, values)
    if valid is None:
        valid = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    masked = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    total = _cell_sum(masked, grid)
    count = _cell_sum(valid.to(total.dtype), grid).round().long()
    value = (total / count.clamp(min=1).to(total.dtype)).to(values.dtype)
    return CellValues(value=value, valid=count > 0, count=count)


# ----------------------------------------------------------------------------- logit KD
def pixel_kd_kl_map(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per-pixel temperature-scaled KL(teacher || student), T^2 included.

    Args:
        student_logits: ``[B, K, h, w]``.
        teacher_logits: ``[B, K, h', w']``; resized to ``(h, w)`` first (bilinear, ``align_corners=False``).
        T: temperature.

    Returns:
        ``[B, h, w]``: ``T^2 * sum_k p_t (log p_t - log p_s)``, ``p = softmax_k(z / T)``.
    """
    _check_temperature(T)
    teacher_logits = _align_teacher(student_logits, teacher_logits)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    return (T * T) * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def pixel_kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-wise KD per image: :func:`pixel_kd_kl_map` averaged over each image's valid pixels.

    Args:
        student_logits: ``[B, K, h, w]``.
        teacher_logits: ``[B, K, h', w']`` (resized to ``(h, w)``, bilinear).
        T: temperature.
        valid: optional ``[B, h, w]`` bool (e.g. :func:`valid_mask` of the labels); all pixels when None.

    Returns:
        ``[B]`` (0 for an image without valid pixels).
    """
    kl = pixel_kd_kl_map(student_logits, teacher_logits, T)
    return _masked_image_mean(kl, _check_valid(valid, kl))


def pixel_kd_kl_cells(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    T: float,
    grid: int,
    valid: torch.Tensor | None = None,
) -> CellValues:
    """:func:`pixel_kd_kl` per cell of a ``G x G`` grid over the student's logit map -> ``[B, G, G]``."""
    kl = pixel_kd_kl_map(student_logits, teacher_logits, T)
    return cell_mean(kl, grid, _check_valid(valid, kl))


# ----------------------------------------------------------------------------- channel-wise distillation
def cwd_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, T: float) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., 2021; as in CIRKD's ``CriterionCWD`` and mmrazor's
    ``ChannelWiseDivergence``) per image.

    Each channel is turned into a distribution over the ``h*w`` positions, ``softmax(z / T)``;
    the loss is ``T^2 * sum_positions p_t (log p_t - log p_s)``, averaged over the channels.
    CIRKD/mmrazor divide the batch sum by ``B * K``: their value is the batch mean of this one.
    No pixel is masked (the method distils the whole map).

    Args:
        student_map: ``[B, K, h, w]`` (logits or a projected feature map).
        teacher_map: ``[B, K, h', w']``; resized to ``(h, w)`` first (bilinear, ``align_corners=False``).
        T: temperature.

    Returns:
        ``[B]``.
    """
    _check_temperature(T)
    teacher_map = _align_teacher(student_map, teacher_map, what="map")
    log_p_teacher = F.log_softmax(teacher_map.flatten(2) / T, dim=2)
    log_p_student = F.log_softmax(student_map.flatten(2) / T, dim=2)
    per_channel = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=2)
    return (T * T) * per_channel.mean(dim=1)


def cwd_cells(student_map: torch.Tensor, teacher_map: torch.Tensor, T: float, grid: int) -> CellValues:
    """:func:`cwd_loss` within each cell of a ``G x G`` grid: each channel is a distribution over the
    cell's positions (not the whole map's), so that a cell's value depends on that cell alone.

    Args:
        student_map: ``[B, K, h, w]``.
        teacher_map: ``[B, K, h', w']``; resized to ``(h, w)`` first.
        T: temperature.
        grid: G (each cell must hold at least one position: ``G <= min(h, w)``).

    Returns:
        :class:`CellValues` with ``[B, G, G]`` tensors; ``count`` is the cell's positions (no pixel is masked).
    """
    _check_temperature(T)
    grid = _check_grid(grid)
    teacher_map = _align_teacher(student_map, teacher_map, what="map")
    height, width = student_map.shape[-2:]
    if grid > min(height, width):
        raise ValueError(f"cwd per cell: a {grid}x{grid} grid over a {height}x{width} map leaves empty cells; "
                         f"expected distill.region_grid <= {min(height, width)}")
    cell = cell_ids(height, width, grid, student_map.device).flatten()  # [h*w]
    student_flat, teacher_flat = student_map.flatten(2) / T, teacher_map.flatten(2) / T  # [B, K, h*w]
    values, counts = [], []
    for g in range(grid * grid):
        where = (cell == g).nonzero().squeeze(1)
        log_p_teacher = F.log_softmax(teacher_flat.index_select(2, where), dim=2)
        log_p_student = F.log_softmax(student_flat.index_select(2, where), dim=2)
        values.append((log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(2).mean(1))  # [B]
        counts.append(where.numel())
    batch = student_map.shape[0]
    value = ((T * T) * torch.stack(values, 1)).reshape(batch, grid, grid)
    count = torch.tensor(counts, device=student_map.device).reshape(1, grid, grid).expand(batch, grid, grid)
    return CellValues(value=value, valid=count > 0, count=count)


# ----------------------------------------------------------------------------- feature MSE
def _feature_sq_map(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    _check_map("projected student feature", student)
    _check_map("teacher feature", teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"projected student feature {tuple(student.shape)} does not match teacher feature "
            f"{tuple(teacher.shape)}; project and resize the student feature to the teacher's shape first"
        )
    return (student - teacher).pow(2).mean(dim=1)


def dense_feature_mse(projected_student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per image.

    Args:
        projected_student_feature: ``[B, C, h, w]``, already at the teacher's shape.
        teacher_feature: ``[B, C, h, w]``.

    Returns:
        ``[B]``: mean over ``C*h*w``.
    """
    return _feature_sq_map(projected_student_feature, teacher_feature).flatten(1).mean(dim=1)


def dense_feature_mse_cells(
    projected_student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    grid: int,
    valid: torch.Tensor | None = None,
) -> CellValues:
    """:func:`dense_feature_mse` per cell: mean over ``C`` and the cell's (valid) pixels -> ``[B, G, G]``.
    ``valid``: optional ``[B, h, w]`` bool at the feature size; all pixels when None."""
    sq = _feature_sq_map(projected_student_feature, teacher_feature)
    return cell_mean(sq, grid, _check_valid(valid, sq))


# ----------------------------------------------------------------------------- cross-entropy
def pixel_ce_map(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel cross-entropy (T = 1) at the label size.

    Args:
        logits: ``[B, K, h, w]``; upsampled to the label size (bilinear, ``align_corners=False``).
        labels: ``[B, H, W]`` integers in ``[0, K)`` or ``ignore_index``.
        ignore_index: label of the pixels that take no part.

    Returns:
        ``(ce [B, H, W], valid [B, H, W] bool)``; ``ce`` is 0 at ignored pixels.
    """
    _check_map("logits", logits)
    labels = _check_labels(labels, logits.shape[0])
    logits = resize_logits(logits, tuple(labels.shape[-2:]))
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return ce, labels != ignore_index


def pixel_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy per image: :func:`pixel_ce_map` averaged over the image's valid pixels.

    Args:
        logits: ``[B, K, h, w]`` (upsampled to the label size, bilinear).
        labels: ``[B, H, W]``.
        ignore_index: label of the pixels that take no part.

    Returns:
        ``[B]`` (0 for an image whose pixels are all ignored).
    """
    ce, valid = pixel_ce_map(logits, labels, ignore_index)
    return _masked_image_mean(ce, valid)


def pixel_ce_cells(logits: torch.Tensor, labels: torch.Tensor, grid: int, ignore_index: int = 255) -> CellValues:
    """:func:`pixel_ce` per cell of a ``G x G`` grid over the *label* map -> ``[B, G, G]``."""
    ce, valid = pixel_ce_map(logits, labels, ignore_index)
    return cell_mean(ce, grid, valid)
