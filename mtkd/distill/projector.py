"""Per-teacher feature projectors P_m (docs/method.md §2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_feature_map(student_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, K, H, W]`` to ``[B, K, *size]``: adaptive average pooling when the map is at
    least as large as ``size`` in both dimensions, bilinear interpolation otherwise."""
    height, width = student_map.shape[-2:]
    if (height, width) == tuple(size):
        return student_map
    if height >= size[0] and width >= size[1]:
        return F.adaptive_avg_pool2d(student_map, size)
    return F.interpolate(student_map, size=size, mode="bilinear", align_corners=False)


class FeatureProjector(nn.Module):
    """Maps the student's last feature map onto one teacher's: resize, 1x1 conv (bias), BN, ReLU.

    Args:
        student_channels: K_s of the student map.
        teacher_channels: K_t of the teacher map.
        teacher_size: ``(H_t, W_t)`` of the teacher map.
    """

    def __init__(self, student_channels: int, teacher_channels: int, teacher_size: tuple[int, int]):
        super().__init__()
        self.teacher_size = (int(teacher_size[0]), int(teacher_size[1]))
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(teacher_channels)

    def forward(self, student_map: torch.Tensor) -> torch.Tensor:
        """``[B, K_s, H_s, W_s]`` -> ``[B, K_t, H_t, W_t]``; always from the original student map."""
        resized = resize_feature_map(student_map, self.teacher_size)
        return F.relu(self.bn(self.conv(resized)))


def build_projectors(student_channels: int, teacher_feature_shapes: list[tuple[int, int, int]]) -> nn.ModuleList:
    """One projector per teacher. ``teacher_feature_shapes``: ``(K, H, W)`` per teacher."""
    return nn.ModuleList(
        FeatureProjector(student_channels, shape[0], (shape[1], shape[2])) for shape in teacher_feature_shapes
    )
