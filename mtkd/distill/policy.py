"""The MTKD-RL policy network and its mixing with heuristic terms (docs/method.md §4)."""
from __future__ import annotations

import torch
from torch import nn

from .losses import inverted_softmax_over_teachers
from .state import AgentState

HIDDEN_UNITS = 128


def heuristic_terms(state: AgentState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence ``c``, logit gap ``gL`` and feature gap ``gF``, each ``[B, M]`` summing to 1.

    ``c = (1 - softmax_m(CE_t)) / (M - 1)``, ``gL = softmax_m(KL)``, ``gF = softmax_m(cos)``.
    """
    confidence = inverted_softmax_over_teachers(state.teacher_ce)
    logit_gap = torch.softmax(state.logit_gap, dim=1)
    feature_gap = torch.softmax(state.feature_gap, dim=1)
    return confidence, logit_gap, feature_gap


class PolicyNet(nn.Module):
    """``h = ReLU(W1 s)``; two heads ``Linear(128 -> M) + softmax``; mixed with heuristics.

    Static mixing (default): ``wL = (aL + c + gL) / 3``, ``wF = (aF + c + gF) / 3``.
    Dynamic mixing: ``wL = l1 aL + l2 c + l3 gL`` with ``(l1, l2, l3) = softmax(theta_logit)``,
    ``theta_logit`` a learned 3-vector initialised to ones (``theta_feature`` likewise).

    Args:
        state_dim: width of ``AgentState.vector``.
        num_teachers: M.
        dynamic: learn the mixing coefficients.
    """

    def __init__(self, state_dim: int, num_teachers: int, dynamic: bool = False):
        super().__init__()
        self.state_dim = state_dim
        self.num_teachers = num_teachers
        self.dynamic = dynamic
        self.stem = nn.Linear(state_dim, HIDDEN_UNITS, bias=False)
        self.logit_head = nn.Linear(HIDDEN_UNITS, num_teachers)
        self.feature_head = nn.Linear(HIDDEN_UNITS, num_teachers)
        if dynamic:
            self.theta_logit = nn.Parameter(torch.ones(3))
            self.theta_feature = nn.Parameter(torch.ones(3))

    def actions(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's own distributions ``aL, aF`` ``[B, M]`` for a state vector ``[B, dim]``."""
        if vector.shape[-1] != self.state_dim:
            raise ValueError(f"policy expects states of width {self.state_dim}, got {vector.shape[-1]}")
        hidden = torch.relu(self.stem(vector))
        return torch.softmax(self.logit_head(hidden), dim=1), torch.softmax(self.feature_head(hidden), dim=1)

    def mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two 3-vectors of mixing coefficients (``1/3`` each when static)."""
        if self.dynamic:
            return torch.softmax(self.theta_logit, dim=0), torch.softmax(self.theta_feature, dim=0)
        third = torch.full((3,), 1.0 / 3.0, device=self.stem.weight.device)
        return third, third

    def forward(self, state: AgentState) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher weights ``(wL, wF)``, each ``[B, M]`` with rows summing to 1."""
        action_logit, action_feature = self.actions(state.vector)
        confidence, logit_gap, feature_gap = heuristic_terms(state)
        mix_logit, mix_feature = self.mixing()
        if not self.dynamic:  # the reference computes (a + c + g) / 3 literally
            return (action_logit + confidence + logit_gap) / 3, (action_feature + confidence + feature_gap) / 3
        weight_logit = mix_logit[0] * action_logit + mix_logit[1] * confidence + mix_logit[2] * logit_gap
        weight_feature = mix_feature[0] * action_feature + mix_feature[1] * confidence + mix_feature[2] * feature_gap
        return weight_logit, weight_feature
