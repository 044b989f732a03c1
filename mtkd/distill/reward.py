"""Rewards and the reference agent loss (SPEC.md section 4)."""
from __future__ import annotations

import torch

LOG_FLOOR = -100.0


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
    log_logit = torch.log(weight_logit).clamp(min=LOG_FLOOR)
    log_feature = torch.log(weight_feature).clamp(min=LOG_FLOOR)
    return (reward_hat[:, None] * (-log_logit - log_feature)).mean()
