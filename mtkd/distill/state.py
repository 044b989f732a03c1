"""The agent's state (docs/method.md §4): per sample and teacher, the teacher-student feature
gap, logit gap, the teacher's cross-entropy, its embedding and its logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import kd_kl, per_sample_ce


@dataclass(frozen=True)
class AgentState:
    """The state of one batch, detached from every graph.

    Attributes:
        vector: ``[B, dim]``: per teacher, in order, ``[cos, KL, CE, embedding (D_m), logits (C)]``;
            ``dim = sum_m (D_m + C + 3)``.
        teacher_ce: ``[B, M]`` cross-entropy of each teacher on the true label (T = 1).
        logit_gap: ``[B, M]`` KL_T(teacher || student), T^2 included.
        feature_gap: ``[B, M]`` cosine similarity of GAP(P_m(F_s)) and the teacher embedding.
    """

    vector: torch.Tensor
    teacher_ce: torch.Tensor
    logit_gap: torch.Tensor
    feature_gap: torch.Tensor

    @property
    def num_teachers(self) -> int:
        return self.teacher_ce.shape[1]

    @classmethod
    def from_vector(cls, vector: torch.Tensor, embedding_dims: list[int], num_classes: int) -> "AgentState":
        """Rebuild the state from its vector alone (what travels between processes).

        Args:
            vector: ``[B, dim]`` as produced by :func:`agent_state`.
            embedding_dims: ``D_m`` per teacher.
            num_classes: C.
        """
        expected = state_dim(embedding_dims, num_classes)
        if vector.ndim != 2 or vector.shape[1] != expected:
            raise ValueError(f"agent state must be [B, {expected}], got {list(vector.shape)}")
        offsets = _block_offsets(embedding_dims, num_classes)
        cos = vector[:, [o for o in offsets]]
        kl = vector[:, [o + 1 for o in offsets]]
        ce = vector[:, [o + 2 for o in offsets]]
        return cls(vector=vector, teacher_ce=ce, logit_gap=kl, feature_gap=cos)


def state_dim(embedding_dims: list[int], num_classes: int) -> int:
    """``sum_m (D_m + C + 3)``: the width of the agent state vector."""
    return sum(d + num_classes + 3 for d in embedding_dims)


def _block_offsets(embedding_dims: list[int], num_classes: int) -> list[int]:
    offsets, start = [], 0
    for dim in embedding_dims:
        offsets.append(start)
        start += dim + num_classes + 3
    return offsets


@torch.no_grad()
def agent_state(
    projected_student_maps: list[torch.Tensor],
    teacher_embeddings: list[torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: list[torch.Tensor],
    targets: torch.Tensor,
    T: float,
) -> AgentState:
    """Build the agent state of a batch.

    Args:
        projected_student_maps: per teacher, ``P_m(F_s)`` ``[B, K_m, H_m, W_m]``.
        teacher_embeddings: per teacher, ``[B, D_m]`` (``D_m == K_m``).
        student_logits: ``[B, C]``.
        teacher_logits: per teacher, ``[B, C]``.
        targets: ``[B]`` class indices.
        T: temperature of the logit gap.

    Returns:
        An :class:`AgentState`, every tensor detached.
    """
    student_logits = student_logits.detach()
    blocks, cos_list, kl_list, ce_list = [], [], [], []
    for proj_map, t_emb, t_logits in zip(projected_student_maps, teacher_embeddings, teacher_logits, strict=True):
        pooled = proj_map.detach().mean(dim=(2, 3))
        cos = F.cosine_similarity(pooled, t_emb, dim=1)
        kl = kd_kl(student_logits, t_logits, T)
        ce = per_sample_ce(t_logits, targets)
        blocks.append(torch.cat([cos[:, None], kl[:, None], ce[:, None], t_emb, t_logits], dim=1))
        cos_list.append(cos)
        kl_list.append(kl)
        ce_list.append(ce)
    return AgentState(
        vector=torch.cat(blocks, dim=1),
        teacher_ce=torch.stack(ce_list, dim=1),
        logit_gap=torch.stack(kl_list, dim=1),
        feature_gap=torch.stack(cos_list, dim=1),
    )
