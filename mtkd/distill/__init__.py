"""The MTKD-RL mathematics: losses, projectors, agent state, policy, rewards, strategies.

The verification interface of docs/method.md §7 is exported here.
"""
from .agent import Agent, act_with_policy
from .losses import feature_mse, kd_kl, per_sample_ce, prediction_entropy
from .policy import PolicyNet, heuristic_terms
from .projector import FeatureProjector, build_projectors, resize_feature_map
from .reward import normalized_reward, raw_reward, reference_agent_loss
from .state import AgentState, agent_state, state_dim
from .strategies import STRATEGIES, StepFeedback, StepInputs, Strategy, Weights

__all__ = [
    "Agent", "AgentState", "FeatureProjector", "PolicyNet", "STRATEGIES", "StepFeedback", "StepInputs",
    "Strategy", "Weights", "act_with_policy", "agent_state", "build_projectors", "feature_mse",
    "heuristic_terms", "kd_kl", "normalized_reward", "per_sample_ce", "prediction_entropy", "raw_reward",
    "reference_agent_loss", "resize_feature_map", "state_dim",
]
