"""What a run measures: the scalars of one training step, their sample-weighted totals over an
epoch, and the evaluation of a model on a loader. Used by the engine (:mod:`mtkd.engine`) and
teacher training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtkd.devices import autocast
from mtkd.distill.losses import per_sample_ce
from mtkd.models import Outputs


@dataclass
class StepResult:
    """Scalars of one step (Python floats) and the per-teacher mean weights (over the step's units)."""

    loss: float
    ce: float
    kd: float
    feature: float
    correct: int
    batch: int
    weight_logit: list[float]
    weight_feature: list[float]
    reward: float
    reward_hat: float
    diagnostics: dict
    counted: int | None = None
    """Predictions behind ``correct`` (pixels in segmentation); None: ``batch``."""


class EpochTotals:
    """Sample-weighted running sums of a step's scalars over an epoch."""

    def __init__(self, num_teachers: int):
        self.samples = self.correct = self.counted = self.steps = 0
        self.sums = {"loss/total": 0.0, "loss/ce": 0.0, "loss/kd": 0.0, "loss/feature": 0.0,
                     "reward/mean": 0.0, "reward/normalized_mean": 0.0}
        self.weight_logit = [0.0] * num_teachers
        self.weight_feature = [0.0] * num_teachers
        self.diagnostics: dict = {}
        self.weighted = False

    def add(self, r: StepResult) -> None:
        n = r.batch
        self.weighted = self.weighted or bool(r.weight_logit)
        self.samples += n
        self.correct += r.correct
        self.counted += r.batch if r.counted is None else r.counted
        self.steps += 1
        for key, value in zip(self.sums, (r.loss, r.ce, r.kd, r.feature, r.reward, r.reward_hat)):
            self.sums[key] += value * n
        for m, (wl, wf) in enumerate(zip(r.weight_logit, r.weight_feature)):
            self.weight_logit[m] += wl * n
            self.weight_feature[m] += wf * n
        self.diagnostics.update(r.diagnostics)

    def summary(self, teacher_names: list[str]) -> dict:
        n = max(self.samples, 1)
        metrics = {k: v / n for k, v in self.sums.items()}
        metrics["train/acc"] = self.correct / max(self.counted, 1)
        if self.weighted:  # with ce the teachers take no part: no weights to report
            for name, wl, wf in zip(teacher_names, self.weight_logit, self.weight_feature):
                metrics[f"weights/logit/{name}"] = wl / n
                metrics[f"weights/feature/{name}"] = wf / n
        metrics.update({k: v for k, v in self.diagnostics.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        return metrics


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, device: torch.device | str = "cpu", precision: str = "fp32") -> dict:
    """``{"test/acc", "test/loss"}`` of ``model`` (on ``device``) over ``loader`` in eval mode, under
    ``precision``'s autocast (mode restored after). One host sync at the end."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    for batch in loader:
        images, labels = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = Outputs(*model(images)).logits.float()
        loss_sum += per_sample_ce(logits, labels).sum()
        correct += (logits.argmax(1) == labels).sum()
        total += labels.shape[0]
    model.train(was_training)
    return {"test/acc": int(correct) / max(total, 1), "test/loss": float(loss_sum) / max(total, 1)}
