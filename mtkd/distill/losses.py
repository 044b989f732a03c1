"""Per-sample distillation losses (docs/method.md §2). Every function returns one value per
sample so that a per-sample teacher weight can multiply it; none reduces over the batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) per sample, T^2 included.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]`` (no gradient is taken through them by the callers).
        T: temperature.

    Returns:
        ``[B]``: ``T^2 * sum_c p_t * (log p_t - log p_s)`` with ``p = softmax(z / T)``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; teachers and student must share the class count"
        )
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    return (T * T) * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def feature_mse(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample.

    Args:
        student_map: ``[B, K, H, W]`` (already projected to the teacher's shape).
        teacher_map: ``[B, K, H, W]``.

    Returns:
        ``[B]``: mean over ``K*H*W`` of the squared difference.
    """
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"projected student map {tuple(student_map.shape)} does not match teacher map "
            f"{tuple(teacher_map.shape)}"
        )
    return (student_map - teacher_map).pow(2).flatten(1).mean(dim=1)


def per_sample_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at T = 1 per sample. ``logits [B, C]``, ``targets [B]`` -> ``[B]``."""
    return F.cross_entropy(logits, targets, reduction="none")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per sample. ``[B, C]`` -> ``[B]``."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def inverted_softmax_over_teachers(scores: torch.Tensor) -> torch.Tensor:
    """``(1 - softmax_m(scores)) / (M - 1)``: a distribution that favours low scores.

    Args:
        scores: ``[B, M]`` one score per sample and teacher (entropy, cross-entropy...).

    Returns:
        ``[B, M]`` rows summing to 1. With a single teacher (M = 1) the weight is 1.
    """
    num_teachers = scores.shape[1]
    if num_teachers == 1:
        return torch.ones_like(scores)
    return (1.0 - torch.softmax(scores, dim=1)) / (num_teachers - 1)
