"""Image classification: one decision unit per image (the paper's setting)."""
from __future__ import annotations

import torch
from torch import nn

from mtkd.distill import agent_state, feature_mse, kd_kl, per_sample_ce
from mtkd.distill.state import AgentState
from mtkd.distill.strategies import StepInputs
from mtkd.metrics import evaluate_model
from mtkd.models import Outputs
from mtkd.tasks.base import DistillTerms, StudentTerms, Task


class ClassificationTask(Task):
    """Logits ``[B, C]``, labels ``[B]``; units are the images (U = B)."""

    name = "classification"

    def student_terms(self, student: Outputs, targets: torch.Tensor) -> StudentTerms:
        ce = per_sample_ce(student.logits, targets)  # [B]
        correct = (student.logits.detach().argmax(1) == targets).sum()
        return StudentTerms(ce.mean(), ce, correct, torch.tensor(targets.shape[0], device=targets.device))

    def distill_terms(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                      targets: torch.Tensor, temperature: float) -> DistillTerms:
        kl = torch.stack([kd_kl(student.logits, t.logits, temperature) for t in teachers], 1)  # [B, M]
        mse = torch.stack([feature_mse(p, t.feature) for p, t in zip(projected, teachers)], 1)  # [B, M]
        return DistillTerms(kl, mse)

    def agent_state(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                    targets: torch.Tensor, temperature: float) -> AgentState:
        return agent_state(projected, [t.embedding for t in teachers], student.logits, [t.logits for t in teachers],
                           targets, temperature)

    def step_inputs(self, student: Outputs, teachers: list[Outputs], targets: torch.Tensor, state: AgentState | None,
                    warmup: bool, temperature: float) -> StepInputs:
        return StepInputs([t.logits for t in teachers], targets, state, warmup, student_logits=student.logits.detach(),
                          student_embedding=student.embedding.detach(), temperature=temperature)

    def state_layout(self, descriptions: list[dict], num_classes: int) -> tuple[list[int], int]:
        return [int(d["embedding_dim"]) for d in descriptions], num_classes

    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str) -> dict:
        return evaluate_model(model, loader, device, precision)
