"""Rewards and the reference agent loss (docs/method.md §4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

def raw_reward(
    student_ce: torch.Tensor,
    logit_gap: torch.Tensor,
    feature_mse: torch.Tensor,
    weight_logit: torch.Tensor,
    weight_feature: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """``r_i = -(CE_i + sum_m wL KL + beta * sum_m wF MSE)``, detached.

    Args:
        student_ce: ``[B]``. logit_gap, feature_mse, weight_logit, weight_feature: ``[B, M]``.

    Returns:
        ``[B]``.
    """
    total = student_ce + (weight_logit * logit_gap).sum(1) + beta * (weight_feature * feature_mse).sum(1)
    return -total.detach()


def normalized_reward(raw_reward: torch.Tensor) -> torch.Tensor:
    """``clamp((r - mean r) / std r, 0, 1)`` within the batch, std with Bessel's correction.

    ``[B]`` -> ``[B]``. When the batch has one sample or all rewards are equal there is no
    better-than-average sample and every normalised reward is 0.
    """
    if raw_reward.numel() < 2:
        return torch.zeros_like(raw_reward)
    std = raw_reward.std(unbiased=True)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(raw_reward)
    return ((raw_reward - raw_reward.mean()) / std).clamp(0.0, 1.0)


def reference_agent_loss(weight_logit: torch.Tensor, weight_feature: torch.Tensor, reward_hat: torch.Tensor) -> torch.Tensor:
    """``mean_{i,m}( r_hat_i * (-log wL[i,m] - log wF[i,m]) )``, logs floored at -100.

    Args:
        weight_logit, weight_feature: ``[B, M]`` recomputed with gradients.
        reward_hat: ``[B]`` normalised rewards.

    Returns:
        A scalar tensor.
    """
    # binary_cross_entropy towards 1 is -log(w) with the log floored at -100 (as the reference's
    # BCELoss), and unlike clamp(log(w)) its gradient stays finite when a weight is exactly 0.
    ones = torch.ones_like(weight_logit)
    nll_logit = F.binary_cross_entropy(weight_logit, ones, reduction="none")
    nll_feature = F.binary_cross_entropy(weight_feature, ones, reduction="none")
    return (reward_hat[:, None] * (nll_logit + nll_feature)).mean()
