"""Detector heatmaps as the *rows* strategies score (``StepInputs``): one row per (cell, class).

A CenterNet heatmap scores each class at each cell with its own sigmoid. Row ``(b, y, x, k)`` holds
that score as a two-way choice, "an object of class k is centred here" or not, in a ``2K``-wide logit
vector: slot ``2k`` is the heatmap logit ``z``, slot ``2k + 1`` is 0, every other slot is
:data:`OFF_LOGIT` (its softmax probability underflows to exactly 0 in float32 at any temperature >= 1).
So ``softmax(row / T)`` is ``(sigmoid(z / T), 1 - sigmoid(z / T))`` in the row's two slots, and the
softmax KL of two rows is the binary KL of the heatmap distillation (:func:`~mtkd.detection.losses.binary_kd_map`)
at that cell and class. A row's label is ``2k`` (positive) where the encoded target heatmap is at least
``positive``, else ``2k + 1``. Rows of different classes share no slot: the ``meta`` rule's
hypergradient couples only rows of one class, exactly as the classes' separate heatmap weights do.
"""
from __future__ import annotations

import torch

__all__ = ["OFF_LOGIT", "binary_rows", "row_labels"]

OFF_LOGIT = -1.0e4
"""The logit of the slots a row does not use."""


def binary_rows(heatmap: torch.Tensor) -> torch.Tensor:
    """``[B, K, h, w]`` heatmap logits -> ``[B*h*w*K, 2K]`` rows, ordered ``(b, y, x, k)``."""
    batch, classes, height, width = heatmap.shape
    z = heatmap.permute(0, 2, 3, 1).reshape(-1)  # [R]
    rows = z.new_full((z.numel(), classes, 2), OFF_LOGIT)
    k = torch.arange(classes, device=z.device).repeat(batch * height * width)
    r = torch.arange(z.numel(), device=z.device)
    rows[r, k, 0] = z
    rows[r, k, 1] = 0.0
    return rows.view(z.numel(), 2 * classes)


def row_labels(target_heatmap: torch.Tensor, positive: float = 0.5) -> torch.Tensor:
    """``[B, K, h, w]`` target heatmap in ``[0, 1]`` -> ``[B*h*w*K]`` int64 row labels, ``2k`` where the
    target is at least ``positive``, else ``2k + 1`` (rows ordered as :func:`binary_rows`)."""
    batch, classes, height, width = target_heatmap.shape
    negative = (target_heatmap.permute(0, 2, 3, 1).reshape(-1) < positive).long()
    k = torch.arange(classes, device=target_heatmap.device).repeat(batch * height * width)
    return 2 * k + negative
