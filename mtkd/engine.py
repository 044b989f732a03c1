"""The in-process distillation engine: one training step, one epoch, evaluation, and the
complete training state. The Ray learner drives this same object, with a teacher pool and an
agent that live in actors; nothing here knows about Ray.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from mtkd.config import ExperimentConfig, OptimConfig
from mtkd.distill import (STRATEGIES, Agent, StepFeedback, StepInputs, Strategy, agent_state, build_projectors,
                          feature_mse, kd_kl, per_sample_ce, raw_reward, normalized_reward)
from mtkd.models import Outputs, create_model


class NonFiniteLossError(RuntimeError):
    """A loss part became NaN or infinite; the message names the epoch, step and part."""


class PoolMismatchError(ValueError):
    """Teachers, student and dataset disagree (class count, input shape)."""


# ---------------------------------------------------------------------------------- building
def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with the global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def check_pool(descriptions: list[dict], num_classes: int, input_shape: tuple[int, int, int]) -> None:
    """Teacher names must be unique; every teacher must have the dataset's class count and input shape."""
    names = [d["name"] for d in descriptions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PoolMismatchError(f"teacher names must be unique, {', '.join(map(repr, repeated))} appear(s) more than "
                                f"once; give each teacher a name: in the config")
    for d in descriptions:
        if int(d["num_classes"]) != num_classes:
            raise PoolMismatchError(
                f"teacher {d['name']!r} predicts {d['num_classes']} classes but the dataset has {num_classes}"
            )
        if tuple(d["input_shape"]) != tuple(input_shape):
            raise PoolMismatchError(
                f"teacher {d['name']!r} takes input {tuple(d['input_shape'])} but the dataset gives {tuple(input_shape)}"
            )


class StudentWithProjectors(nn.Module):
    """The trainable part: the student and one feature projector per teacher."""

    def __init__(self, student: nn.Module, projectors: nn.ModuleList):
        super().__init__()
        self.student = student
        self.projectors = projectors

    def forward(self, images: torch.Tensor) -> tuple[Outputs, list[torch.Tensor]]:
        """``images [B, C, H, W]`` -> student outputs and per-teacher projected maps ``[B, K_m, H_m, W_m]``."""
        outputs = Outputs(*self.student(images))
        return outputs, [p(outputs.feature) for p in self.projectors]


def build_trainable(config: ExperimentConfig, num_classes: int, input_shape, teacher_descriptions: list[dict]):
    """The student (seed) and projectors (seed + 1), independent of the caller's RNG state."""
    student = seeded(config.seed, lambda: create_model(config.student, num_classes=num_classes, in_channels=input_shape[0]))
    student.eval()
    with torch.no_grad():
        student_channels = Outputs(*student(torch.zeros(1, *input_shape))).feature.shape[1]
    student.train()
    shapes = [tuple(d["feature_shape"]) for d in teacher_descriptions]
    projectors = seeded(config.seed + 1, lambda: build_projectors(student_channels, shapes))
    return StudentWithProjectors(student, projectors)


def build_strategy(config: ExperimentConfig, teacher_descriptions: list[dict], num_classes: int, agent=None) -> Strategy:
    """The configured strategy; one that ``needs_agent`` gets ``agent`` or a new in-process
    :class:`Agent` (seed + 2)."""
    factory = STRATEGIES.get(config.distill.strategy)
    if not factory.needs_agent:
        return factory()
    if agent is None:
        agent = Agent([int(d["embedding_dim"]) for d in teacher_descriptions], num_classes, **agent_kwargs(config))
    return factory(agent)


def agent_kwargs(config: ExperimentConfig) -> dict:
    """The :class:`Agent` settings of ``config.agent``, seeded with ``config.seed + 2``."""
    a = config.agent
    return {"rule": a.rule, "mixing": a.mixing, "agent_step": a.agent_step, "lr": a.lr,
            "concentration": a.concentration, "seed": config.seed + 2}


def learning_rate(optim: OptimConfig, epoch: int) -> float:
    """Step schedule: ``lr * gamma^(number of milestones <= epoch)``; ``epoch`` counts from 0."""
    return optim.lr * optim.gamma ** sum(1 for m in optim.milestones if epoch >= m)


def make_optimizer(module: nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=optim.lr, momentum=optim.momentum,
                           nesterov=optim.nesterov and optim.momentum > 0, weight_decay=optim.weight_decay)


# ------------------------------------------------------------------------------------ step
@dataclass
class StepResult:
    """Scalars of one step (Python floats) and the per-teacher mean weights."""

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


def _check_finite(parts: dict[str, torch.Tensor], where: str) -> None:
    for name, value in parts.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(f"non-finite loss at {where}: loss part {name!r} = {value.item()}")


# ----------------------------------------------------------------------------------- engine
class Distiller:
    """Trains a student from a teacher pool with a weighting strategy.

    Args:
        config: the experiment.
        pool: a teacher source with ``describe()``, ``submit(batch_index, images)``, ``collect(ticket)``.
        num_classes, input_shape: of the dataset.
        agent: the agent for ``mtkd_rl`` (default: a new in-process :class:`Agent`).
        grad_sync: called on the trainable module after ``backward`` (averages gradients across
            learner workers on Ray; nothing in process).
    """

    def __init__(self, config: ExperimentConfig, pool, num_classes: int, input_shape, *, agent=None,
                 grad_sync: Callable[[nn.Module], None] | None = None):
        self.config = config
        self.pool = pool
        self.descriptions = pool.describe()
        check_pool(self.descriptions, num_classes, input_shape)
        self.teacher_names = [d["name"] for d in self.descriptions]
        self.module = build_trainable(config, num_classes, input_shape, self.descriptions)
        self.optimizer = make_optimizer(self.module, config.optim)
        self.strategy = build_strategy(config, self.descriptions, num_classes, agent)
        if self.strategy.uses_teachers and not self.descriptions:
            raise PoolMismatchError(f"strategy {config.distill.strategy!r} needs at least one teacher; the pool is empty")
        self.grad_sync = grad_sync
        self.epoch = 0  # the next epoch to train
        self.global_step = 0

    @property
    def warmup(self) -> bool:
        return self.epoch < self.config.distill.warmup_epochs

    # ------------------------------------------------------------------ one step
    def step(self, images: torch.Tensor, targets: torch.Tensor, teacher_outputs: list[Outputs] | None) -> StepResult:
        """One optimiser step on a batch ``images [B, C, H, W]``, ``targets [B]``."""
        cfg = self.config.distill
        student_out, projected = self.module(images)
        ce = per_sample_ce(student_out.logits, targets)  # [B]
        where = f"epoch {self.epoch + 1} step {self.global_step + 1}"
        if not self.strategy.uses_teachers:
            loss = ce.mean()
            _check_finite({"ce": loss}, where)
            self._optimise(loss)
            return self._result(loss, ce.mean(), None, None, student_out, targets, None, None, {})
        kl = torch.stack([kd_kl(student_out.logits, t.logits, cfg.temperature) for t in teacher_outputs], 1)  # [B, M]
        mse = torch.stack([feature_mse(p, t.feature) for p, t in zip(projected, teacher_outputs)], 1)  # [B, M]
        state = None
        if self.strategy.needs_state:
            state = agent_state(projected, [t.embedding for t in teacher_outputs], student_out.logits,
                                [t.logits for t in teacher_outputs], targets, cfg.temperature)
        weights = self.strategy.weights(StepInputs([t.logits for t in teacher_outputs], targets, state, self.warmup))
        kd_term = (weights.logit * kl).mean(0).sum()
        feature_term = cfg.beta * (weights.feature * mse).mean(0).sum()
        ce_term = ce.mean()
        _check_finite({"ce": ce_term, "kd": kd_term, "feature": feature_term}, where)
        loss = ce_term + kd_term + feature_term
        reward = raw_reward(ce.detach(), kl.detach(), mse.detach(), weights.logit, weights.feature, cfg.beta)
        self._optimise(loss)
        diagnostics = dict(weights.diagnostics)
        diagnostics.update(self.strategy.observe(StepFeedback(state, reward, weights.logit, weights.feature, self.warmup)))
        return self._result(loss, ce_term, kd_term, feature_term, student_out, targets, weights, reward, diagnostics)

    def _optimise(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.module)
        self.optimizer.step()
        self.global_step += 1

    def _result(self, loss, ce, kd, feature, student_out, targets, weights, reward, diagnostics) -> StepResult:
        correct = int((student_out.logits.argmax(1) == targets).sum())
        return StepResult(
            loss=loss.item(), ce=ce.item(), kd=kd.item() if kd is not None else 0.0,
            feature=feature.item() if feature is not None else 0.0, correct=correct, batch=targets.shape[0],
            weight_logit=weights.logit.mean(0).tolist() if weights is not None else [],
            weight_feature=weights.feature.mean(0).tolist() if weights is not None else [],
            reward=reward.mean().item() if reward is not None else 0.0,
            reward_hat=normalized_reward(reward).mean().item() if reward is not None else 0.0,
            diagnostics=diagnostics,
        )

    # ----------------------------------------------------------------- one epoch
    def batches_with_teachers(self, loader) -> Iterator[tuple[object, list[Outputs] | None]]:
        """Yield ``(batch, teacher_outputs)``; the teachers of the next ``runtime.prefetch``
        batches are requested before the current batch is trained."""
        if not self.strategy.uses_teachers:
            for batch in loader:
                yield batch, None
            return
        pending: deque = deque()
        batches = iter(loader)
        prefetch = max(0, self.config.runtime.prefetch)

        def fill(in_flight: int) -> None:
            while len(pending) < in_flight:
                batch = next(batches, None)
                if batch is None:
                    return
                pending.append((batch, self.pool.submit(batch.index, batch.images)))

        while True:
            fill(1 + prefetch)
            if not pending:
                return
            batch, ticket = pending.popleft()
            teacher_outputs = self.pool.collect(ticket)
            fill(prefetch)  # the next batches are requested before this one is trained
            yield batch, teacher_outputs

    def train_epoch(self, loader, on_step: Callable[[int, object, StepResult], None] | None = None) -> dict:
        """Train one epoch over ``loader`` (a ``BatchLoader``); returns the epoch's metrics."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config.optim, self.epoch)
        loader.set_epoch(self.epoch)
        self.module.train()
        totals = _EpochTotals(len(self.teacher_names))
        start = time.perf_counter()
        for batch, teacher_outputs in self.batches_with_teachers(loader):
            result = self.step(batch.images, batch.labels, teacher_outputs)
            totals.add(result)
            if on_step is not None:
                on_step(self.global_step, batch, result)
        totals.diagnostics.update(self.strategy.end_epoch())
        metrics = totals.summary(self.teacher_names)
        metrics.update({"epoch": self.epoch + 1, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
                        "time/epoch_s": time.perf_counter() - start})
        self.epoch += 1
        return metrics

    def evaluate(self, loader) -> dict:
        """Top-1 accuracy and mean CE of the student on ``loader`` (no augmentation)."""
        return evaluate_model(self.module.student, loader)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimisers, agent, counters, RNG."""
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        torch.set_rng_state(state["torch_rng"])


@torch.no_grad()
def evaluate_model(model: nn.Module, loader) -> dict:
    """``{"test/acc", "test/loss"}`` of ``model`` over ``loader`` in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader:
        logits = Outputs(*model(batch.images)).logits
        loss_sum += per_sample_ce(logits, batch.labels).sum().item()
        correct += int((logits.argmax(1) == batch.labels).sum())
        total += batch.labels.shape[0]
    model.train(was_training)
    return {"test/acc": correct / max(total, 1), "test/loss": loss_sum / max(total, 1)}


class _EpochTotals:
    """Sample-weighted running sums of a step's scalars over an epoch."""

    def __init__(self, num_teachers: int):
        self.samples = self.correct = self.steps = 0
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
        metrics["train/acc"] = self.correct / n
        if self.weighted:  # with ce the teachers take no part: no weights to report
            for name, wl, wf in zip(teacher_names, self.weight_logit, self.weight_feature):
                metrics[f"weights/logit/{name}"] = wl / n
                metrics[f"weights/feature/{name}"] = wf / n
        metrics.update({k: v for k, v in self.diagnostics.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        return metrics
