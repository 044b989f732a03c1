"""The contract every network (teacher or student) fulfils: docs/method.md §1."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Outputs(NamedTuple):
    """What a network yields for a batch of B images.

    Attributes:
        logits: ``[B, C]`` class scores.
        embedding: ``[B, D]`` global-average-pooled output of the last stage (feeds the classifier).
        feature: ``[B, K, H, W]`` the last stage's feature map before pooling.
    """

    logits: torch.Tensor
    embedding: torch.Tensor
    feature: torch.Tensor
