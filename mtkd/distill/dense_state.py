"""The agent's state for semantic segmentation, per (image, teacher) and per (image, cell, teacher):
teacher pixel cross-entropy (mean and a tail quantile), student-teacher pixel KL and the pooled
feature cosine. Conventions (strides, labels, cells) as in :mod:`mtkd.distill.dense_losses`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dense_losses import (_align_teacher, _cell_sum, _check_grid, _check_labels, _check_map, _masked_image_mean,
                           cell_mean, downsample_labels, pixel_kd_kl_map, valid_mask)

__all__ = ["DenseAgentState", "DenseCellState", "dense_agent_state"]

def _masked_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile ``q`` along the last dim over the valid entries (linear interpolation, as
    ``torch.quantile``); 0 where a row has none. ``[..., n]`` -> ``[...]``."""
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    ordered = torch.where(valid, values, inf).sort(dim=-1).values
    n = valid.sum(dim=-1)
    pos = q * (n - 1).clamp(min=0).to(values.dtype)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v_lo = ordered.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = ordered.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    out = v_lo + (pos - lo.to(values.dtype)) * (v_hi - v_lo)
    return torch.where(n > 0, out, torch.zeros((), dtype=values.dtype, device=values.device))


def _cell_index_table(h: int, w: int, grid: int, device: torch.device) -> torch.Tensor:
    """``[G*G, L]`` flat pixel indices of each cell (row-major cells), padded with ``h*w``."""
    rows = [((g * h) // grid, ((g + 1) * h) // grid) for g in range(grid)]
    cols = [((g * w) // grid, ((g + 1) * w) // grid) for g in range(grid)]
    cells = []
    for r0, r1 in rows:
        for c0, c1 in cols:
            ys, xs = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
            cells.append((ys * w + xs).flatten())
    longest = max(1, max(len(c) for c in cells))
    table = torch.full((grid * grid, longest), h * w, dtype=torch.long)
    for i, c in enumerate(cells):
        table[i, : len(c)] = c
    return table.to(device)


def _cell_quantile(values: torch.Tensor, valid: torch.Tensor, grid: int, q: float) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, G*G]`` quantile over each cell's valid pixels (0 where none)."""
    B, h, w = values.shape
    table = _cell_index_table(h, w, grid, values.device)
    padded_v = torch.cat([values.flatten(1), values.new_zeros(B, 1)], dim=1)
    padded_m = torch.cat([valid.flatten(1), valid.new_zeros(B, 1)], dim=1)
    flat = table.flatten()
    v = padded_v[:, flat].view(B, *table.shape)
    m = padded_m[:, flat].view(B, *table.shape)
    return _masked_quantile(v, m, q)


@dataclass(frozen=True)
class DenseCellState:
    """The agent state per (image, cell, teacher) on a ``G x G`` grid over the student's logit map
    (cells row-major, ``gy * G + gx``); detached.

    Attributes:
        teacher_ce_mean: ``[B, G*G, M]`` mean teacher pixel CE over the cell's valid pixels.
        teacher_ce_tail: ``[B, G*G, M]`` quantile ``q`` of the teacher pixel CE over those pixels.
        logit_gap: ``[B, G*G, M]`` mean pixel KL_T(teacher || student), T^2 included.
        feature_gap: ``[B, G*G, M]`` cosine of the cell-pooled projected student feature and the
            cell-pooled teacher feature (each pooled on the grid over its own map; all pixels).
        valid: ``[B, G*G]`` bool, the cell has at least one valid (non-ignored) pixel; where it does
            not, the CE and KL entries are 0.
        count: ``[B, G*G]`` int64 number of valid pixels at the logit size.
    """

    teacher_ce_mean: torch.Tensor
    teacher_ce_tail: torch.Tensor
    logit_gap: torch.Tensor
    feature_gap: torch.Tensor
    valid: torch.Tensor
    count: torch.Tensor

    @property
    def vector(self) -> torch.Tensor:
        """``[B, G*G, 4M]``: per teacher, in order, ``[cos, KL, CE mean, CE tail]``."""
        return torch.stack([self.feature_gap, self.logit_gap, self.teacher_ce_mean, self.teacher_ce_tail],
                           dim=-1).flatten(-2)


@dataclass(frozen=True)
class DenseAgentState:
    """The agent state per (image, teacher) of a segmentation batch; detached.

    Attributes:
        teacher_ce_mean: ``[B, M]`` teacher pixel CE (T = 1), mean over the valid pixels.
        teacher_ce_tail: ``[B, M]`` quantile ``q`` (0.9 by default) of the teacher pixel CE over the
            valid pixels (how bad the teacher's worst regions are).
        logit_gap: ``[B, M]`` pixel KL_T(teacher || student), T^2 included, as :func:`pixel_kd_kl`.
        feature_gap: ``[B, M]`` cosine of GAP(projected student feature) and GAP(teacher feature).
        cells: the same per grid cell, when a grid was asked for.
    """

    teacher_ce_mean: torch.Tensor
    teacher_ce_tail: torch.Tensor
    logit_gap: torch.Tensor
    feature_gap: torch.Tensor
    cells: DenseCellState | None = None

    @property
    def num_teachers(self) -> int:
        return self.teacher_ce_mean.shape[1]

    @property
    def vector(self) -> torch.Tensor:
        """``[B, 4M]``: per teacher, in order, ``[cos, KL, CE mean, CE tail]``."""
        return torch.stack([self.feature_gap, self.logit_gap, self.teacher_ce_mean, self.teacher_ce_tail],
                           dim=-1).flatten(-2)


@torch.no_grad()
def dense_agent_state(
    projected_student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    T: float,
    grid: int | None = None,
    tail_quantile: float = 0.9,
    ignore_index: int = 255,
) -> DenseAgentState:
    """Build the segmentation agent state of a batch.

    Everything logit-based is computed on the student's logit grid ``(h, w)``: each teacher's logits
    are resized there (bilinear, ``align_corners=False``) and the labels nearest-sampled there
    (:func:`downsample_labels`); ignored pixels take no part. Cheaper than the label size, and the
    same pixels as :func:`pixel_kd_kl` with :func:`valid_mask`.

    Args:
        projected_student_features: per teacher, ``P_m(F_s)`` ``[B, C_m, h_m, w_m]``.
        teacher_features: per teacher, ``[B, C_m, h'_m, w'_m]`` (sizes may differ from the projection's:
            each is pooled over its own map).
        student_logits: ``[B, K, h, w]``.
        teacher_logits: per teacher, ``[B, K, h_t, w_t]``.
        labels: ``[B, H, W]``, ``ignore_index`` for ignored pixels.
        T: temperature of the logit gap.
        grid: G for the per-cell state (``cells``), or None for none.
        tail_quantile: q of ``teacher_ce_tail`` in ``[0, 1]``.
        ignore_index: the ignore label.

    Returns:
        A :class:`DenseAgentState`, every tensor detached.
    """
    if not 0.0 <= tail_quantile <= 1.0:
        raise ValueError(f"tail_quantile must be in [0, 1], got {tail_quantile}")
    if not (len(projected_student_features) == len(teacher_features) == len(teacher_logits)) or not teacher_logits:
        raise ValueError(
            f"need one projected student feature, teacher feature and teacher logit map per teacher, got "
            f"{len(projected_student_features)}, {len(teacher_features)} and {len(teacher_logits)}"
        )
    if grid is not None:
        grid = _check_grid(grid)
    _check_map("student logits", student_logits)
    student_logits = student_logits.detach()
    size = tuple(student_logits.shape[-2:])
    small_labels = downsample_labels(_check_labels(labels, student_logits.shape[0]), size)
    valid = small_labels != ignore_index

    ce_mean, ce_tail, kl_mean, cos = [], [], [], []
    cell_ce_mean, cell_ce_tail, cell_kl, cell_cos = [], [], [], []
    cell_valid = cell_count = None
    for proj, t_feat, t_logits in zip(projected_student_features, teacher_features, teacher_logits, strict=True):
        proj, t_feat = proj.detach(), t_feat.detach()
        _check_map("projected student feature", proj)
        _check_map("teacher feature", t_feat)
        if proj.shape[:2] != t_feat.shape[:2]:
            raise ValueError(
                f"projected student feature {tuple(proj.shape)} and teacher feature {tuple(t_feat.shape)} "
                f"differ in batch or channel count"
            )
        t_logits = _align_teacher(student_logits, t_logits.detach())
        kl = pixel_kd_kl_map(student_logits, t_logits, T)
        ce = F.cross_entropy(t_logits, small_labels, ignore_index=ignore_index, reduction="none")
        ce_mean.append(_masked_image_mean(ce, valid))
        ce_tail.append(_masked_quantile(ce.flatten(1), valid.flatten(1), tail_quantile))
        kl_mean.append(_masked_image_mean(kl, valid))
        cos.append(F.cosine_similarity(proj.mean(dim=(2, 3)), t_feat.mean(dim=(2, 3)), dim=1))
        if grid is not None:
            ce_cells = cell_mean(ce, grid, valid)
            cell_valid, cell_count = ce_cells.valid.flatten(1), ce_cells.count.flatten(1)
            cell_ce_mean.append(ce_cells.value.flatten(1))
            cell_ce_tail.append(_cell_quantile(ce, valid, grid, tail_quantile))
            cell_kl.append(cell_mean(kl, grid, valid).value.flatten(1))
            pooled_s = _cell_sum(proj, grid) / _cell_sum(torch.ones_like(proj[:1, :1]), grid).clamp(min=1)
            pooled_t = _cell_sum(t_feat, grid) / _cell_sum(torch.ones_like(t_feat[:1, :1]), grid).clamp(min=1)
            cell_cos.append(F.cosine_similarity(pooled_s.flatten(2), pooled_t.flatten(2), dim=1).to(proj.dtype))

    cells = None
    if grid is not None:
        cells = DenseCellState(
            teacher_ce_mean=torch.stack(cell_ce_mean, dim=-1),
            teacher_ce_tail=torch.stack(cell_ce_tail, dim=-1),
            logit_gap=torch.stack(cell_kl, dim=-1),
            feature_gap=torch.stack(cell_cos, dim=-1),
            valid=cell_valid,
            count=cell_count,
        )
    return DenseAgentState(
        teacher_ce_mean=torch.stack(ce_mean, dim=1),
        teacher_ce_tail=torch.stack(ce_tail, dim=1),
        logit_gap=torch.stack(kl_mean, dim=1),
        feature_gap=torch.stack(cos, dim=1),
        cells=cells,
    )
