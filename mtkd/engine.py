"""The in-process distillation engine: one training step, one epoch, evaluation, and the
complete training state (what a step, an epoch and an evaluation report: :mod:`mtkd.metrics`).
The Ray learner drives this same object, with a teacher pool and an agent that live in actors;
nothing here knows about Ray.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from mtkd.config import ConfigError, ExperimentConfig, OptimConfig
from mtkd.devices import autocast, resolve_device
from mtkd.distill import (STRATEGIES, Agent, StepFeedback, Strategy, build_projectors, raw_reward, normalized_reward,
                          state_dim)
from mtkd.distill.meta import MetaAgent
from mtkd.errors import NumericError, UserError
from mtkd.metrics import EpochTotals, StepResult
from mtkd.models import Outputs, create_model
from mtkd.precision_probe import student_setting
from mtkd.tasks import ClassificationTask, Task
from mtkd.teachers import TeacherPool


class NonFiniteLossError(NumericError, RuntimeError):
    """A loss part became NaN or infinite; the message names the epoch, step and part (CLI exit 3)."""


class PoolMismatchError(UserError, ValueError):
    """Teachers, student and dataset disagree (class count, input shape); CLI exit 2."""


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
    """The student (seed) and, when the strategy distils, one projector per teacher (seed + 1);
    independent of the caller's RNG state. (``ce`` gets none: every parameter then has a gradient,
    as DistributedDataParallel requires.)"""
    student = seeded(config.seed, lambda: create_model(config.student, num_classes=num_classes, in_channels=input_shape[0]))
    student.eval()
    with torch.no_grad():
        student_channels = Outputs(*student(torch.zeros(1, *input_shape))).feature.shape[1]
    student.train()
    distils = STRATEGIES.get(config.distill.strategy).uses_teachers
    shapes = [tuple(d["feature_shape"]) for d in teacher_descriptions] if distils else []
    projectors = seeded(config.seed + 1, lambda: build_projectors(student_channels, shapes))
    return StudentWithProjectors(student, projectors)


def build_strategy(config: ExperimentConfig, teacher_descriptions: list[dict], num_classes: int, agent=None,
                   device: torch.device | None = None, task: Task | None = None) -> Strategy:
    """The configured strategy; one that ``needs_agent`` gets ``agent`` or a new in-process
    :class:`Agent` (seed + 2) whose policy lives on ``device``, with ``task``'s state layout
    (default: classification's)."""
    factory = STRATEGIES.get(config.distill.strategy)
    if not factory.needs_agent:
        return factory()
    if agent is None and config.agent.rule == "meta":
        agent = MetaAgent(len(teacher_descriptions), num_classes, **agent_kwargs(config)).to(device or "cpu")
    elif agent is None:
        agent = Agent(*(task or ClassificationTask()).state_layout(teacher_descriptions, num_classes),
                      **agent_kwargs(config))
        agent.policy.to(device or "cpu")  # in place: the agent's optimiser keeps its parameters
    return factory(agent)


def needs_agent_actor(config: ExperimentConfig) -> bool:
    """Whether the Ray runtime hosts the agent in an actor of its own: a strategy with an agent whose
    rule learns from stored experience (``reference``, ``reinforce``). Rules that need the student's own
    step (``meta``) live in the learner, inside the strategy."""
    from mtkd.distill.agent import ACTOR_RULES

    return STRATEGIES.get(config.distill.strategy).needs_agent and config.agent.rule in ACTOR_RULES


def agent_kwargs(config: ExperimentConfig) -> dict:
    """The :class:`Agent` settings of ``config.agent``, seeded with ``config.seed + 2``."""
    a = config.agent
    if a.rule == "meta":
        return {"lr": a.meta_lr, "decay": a.meta_decay, "entropy": a.meta_entropy, "seed": config.seed + 2}
    return {"rule": a.rule, "mixing": a.mixing, "agent_step": a.agent_step, "lr": a.lr,
            "concentration": a.concentration, "seed": config.seed + 2}


ONECYCLE_WARMUP = 0.3  # fraction of the steps spent rising to the peak
ONECYCLE_START, ONECYCLE_END = 1 / 25, 1e-4  # of the peak lr


def agent_buffer_bytes(config: ExperimentConfig, state_width: int, num_teachers: int, batches_per_epoch: int,
                       units_per_image: int | None = None) -> int:
    """The most bytes the agent's buffer holds: ``agent_step`` batches (at most an epoch's, as it
    also updates at every epoch end) of float32 states, rewards and, for reinforce, acted weights;
    0 for a rule without one (``meta`` learns inside the step). ``units_per_image``: what the task
    fixes (detection's objects + background), else from ``distill.region_grid``."""
    if not needs_agent_actor(config):
        return 0
    per_unit = state_width + 1 + (2 * num_teachers if config.agent.rule == "reinforce" else 0)
    batches = min(config.agent.agent_step, max(1, batches_per_epoch))
    per_image = units_per_image or max(1, config.distill.region_grid) ** 2  # per-region: G*G units per image
    units = config.data.batch_size * per_image
    return batches * units * per_unit * 4


def check_agent_buffer(config: ExperimentConfig, descriptions: list[dict], num_classes: int,
                       batches_per_epoch: int, task: Task | None = None) -> None:
    """Refuse a config whose agent buffer could outgrow ``runtime.agent_buffer_mb`` (only strategies
    with an agent have one)."""
    if not needs_agent_actor(config):  # only the reference and reinforce rules store experience
        return
    width = state_dim(*(task or ClassificationTask()).state_layout(descriptions, num_classes))
    need = agent_buffer_bytes(config, width, len(descriptions), batches_per_epoch,
                              task.units_per_image if task is not None else None)
    limit = config.runtime.agent_buffer_mb * 2**20
    if need > limit:
        raise ConfigError(
            f"the agent's buffer could hold {need / 2**20:.0f} MiB ({min(config.agent.agent_step, batches_per_epoch)} "
            f"batches x {config.data.batch_size} samples x {width} state values), over runtime.agent_buffer_mb="
            f"{config.runtime.agent_buffer_mb:g}; lower agent.agent_step or raise runtime.agent_buffer_mb")


def learning_rate(optim: OptimConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The lr of ``step`` (from 0) of ``epoch`` (from 0).

    ``step`` schedule: ``lr * gamma^(number of milestones <= epoch)``. ``onecycle``: linear from
    ``lr/25`` to ``lr`` over the first 30% of all steps, then a cosine to ``lr * 1e-4``.
    """
    if optim.schedule == "step":
        return optim.lr * optim.gamma ** sum(1 for m in optim.milestones if epoch >= m)
    total = max(1, optim.epochs * steps_per_epoch - 1)
    progress = min(1.0, (epoch * steps_per_epoch + step) / total)
    if progress < ONECYCLE_WARMUP:
        return optim.lr * (ONECYCLE_START + (1 - ONECYCLE_START) * progress / ONECYCLE_WARMUP)
    decay = (progress - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP)
    return optim.lr * (ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * decay)))


def make_optimizer(module: nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=optim.lr, momentum=optim.momentum,
                           nesterov=optim.nesterov and optim.momentum > 0, weight_decay=optim.weight_decay)


# ------------------------------------------------------------------------------------ step
LOSS_PARTS = ("ce", "kd", "feature")


@dataclass
class TransformInputs:
    """What a teacher transform sees in a step (B samples, M teachers).

    Attributes:
        sample_index: ``[B]`` indices of the samples in the dataset (None in hand-made batches).
        targets: ``[B]`` labels.
        student: the student's outputs of this step, detached.
        projected: per teacher ``[B, K_m, H_m, W_m]``, the student's projected feature maps, detached.
        teachers: per teacher, its float32 outputs.
    """

    sample_index: torch.Tensor | None
    targets: torch.Tensor
    student: Outputs
    projected: list[torch.Tensor]
    teachers: list[Outputs]


def _check_finite(parts: dict[str, float], where: str, agree: Callable[[bool], bool] | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite part. With ``agree`` (several
    learners: "is it true on every learner?"), every learner raises when any of them saw one."""
    bad = [(name, value) for name, value in parts.items() if not math.isfinite(value)]
    everywhere_finite = agree(not bad) if agree is not None else not bad
    if bad:
        raise NonFiniteLossError(f"non-finite loss at {where}: loss part {bad[0][0]!r} = {bad[0][1]}")
    if not everywhere_finite:
        raise NonFiniteLossError(f"non-finite loss at {where} on another learner")


def teacher_fields(strategy: Strategy) -> tuple[str, ...]:
    """The teacher outputs a strategy's step uses: logits and feature maps, and embeddings for the
    agent state."""
    if not strategy.uses_teachers:
        return ()
    return ("logits", "embedding", "feature") if strategy.needs_state else ("logits", "feature")


def as_float_outputs(outputs: Outputs, device: torch.device) -> Outputs:
    """Teacher outputs on ``device`` in float32 (the losses' precision); absent fields stay None."""
    return Outputs(*(None if t is None else t.to(device, dtype=torch.float32, non_blocking=True) for t in outputs))


# ----------------------------------------------------------------------------------- engine
class Distiller:
    """Trains a student from a teacher pool with a weighting strategy.

    Args:
        config: the experiment.
        pool: the teachers (:class:`mtkd.teachers.TeacherPool`: in process or Ray actors).
        num_classes, input_shape: of the dataset.
        agent: the agent for ``mtkd_rl`` (default: a new in-process :class:`Agent`).
        device: where the student trains (default: ``config.runtime.device``).
        wrap_module: wraps the trainable module for the forward/backward pass (Ray Train's
            ``prepare_model``: DistributedDataParallel); state, evaluation and checkpoints use the
            unwrapped :attr:`module`.
        agree: with several learners, ``agree(flag)`` tells whether ``flag`` holds on every learner;
            a non-finite loss on one then stops all of them at the same step.
        teacher_transform: rewrites the teachers' outputs of each step after the student's forward
            pass (:class:`TransformInputs` -> per teacher :class:`Outputs`): controlled corruptions
            for experiments (benchmarks/weighting.py); None in training.
        task: the task (:mod:`mtkd.tasks`: its losses, agent state and metric per decision unit);
            default classification.
    """

    def __init__(self, config: ExperimentConfig, pool: TeacherPool, num_classes: int, input_shape, *, agent=None,
                 device: str | torch.device | None = None,
                 wrap_module: Callable[[nn.Module], nn.Module] | None = None,
                 agree: Callable[[bool], bool] | None = None,
                 teacher_transform: Callable[["TransformInputs"], list[Outputs]] | None = None,
                 task: Task | None = None):
        self.config = config
        self.task = task or ClassificationTask()
        self.teacher_transform = teacher_transform
        self.pool = pool
        self.device = resolve_device(device if device is not None else config.runtime.device)
        self.descriptions = pool.describe()
        check_pool(self.descriptions, num_classes, input_shape)
        self.task.check_teachers(self.descriptions)
        self.teacher_names = [d["name"] for d in self.descriptions]
        self.module = build_trainable(config, num_classes, input_shape, self.descriptions)
        # runtime.student_precision: fixed, or auto (probed on a copy; the module and the RNG untouched)
        self.student_setting, probe = student_setting(config, self.module, input_shape, self.device)
        self.student_probe = probe.to_dict() if probe is not None else None
        self.precision = self.student_setting.precision
        self.module.to(self.device, memory_format=torch.channels_last if self.student_setting.channels_last
                       else torch.contiguous_format)
        self.forward_module = wrap_module(self.module) if wrap_module is not None else self.module
        self.optimizer = make_optimizer(self.module, config.optim)
        unit_classes = self.task.unit_classes(num_classes)  # the labels units take (detection: + background)
        self.strategy = build_strategy(config, self.descriptions, unit_classes, agent, self.device, self.task)
        if self.strategy.uses_teachers and not self.descriptions:
            raise PoolMismatchError(f"strategy {config.distill.strategy!r} needs at least one teacher; the pool is empty")
        self.agree = agree
        self.num_classes = unit_classes
        self._class_totals: torch.Tensor | None = None  # [C, 2M + 1]: per class, summed wL, wF and a count
        self.epoch = 0  # the next epoch to train
        self.global_step = 0

    @property
    def warmup(self) -> bool:
        return self.epoch < self.config.distill.warmup_epochs

    # ------------------------------------------------------------------ one step
    def step(self, images: torch.Tensor, targets: torch.Tensor, teacher_outputs: list[Outputs] | None,
             sample_index: torch.Tensor | None = None) -> StepResult:
        """One optimiser step on a batch ``images [B, C, H, W]``, ``targets`` (``[B]`` labels or
        ``[B, H, W]`` masks, on :attr:`device`), with the teachers' float32 outputs on the same device;
        ``sample_index [B]`` (the samples' indices in the dataset) is only read by a :attr:`teacher_transform`.
        The task turns the outputs into per-unit losses ``[U, M]``; the strategy weights them.

        The step's scalars are gathered into one tensor and read with a single device sync.
        """
        cfg = self.config.distill
        with autocast(self.device, self.precision):
            student_out, projected = self.forward_module(images)
        student_out = Outputs(*(t.float() for t in student_out))  # losses in fp32 (a no-op in fp32)
        projected = [p.float() for p in projected]
        student = self.task.student_terms(student_out, targets)
        ce, correct = student.unit_loss, student.correct  # [U], scalar
        where = f"epoch {self.epoch + 1} step {self.global_step + 1}"
        if not self.strategy.uses_teachers:
            loss = student.loss
            zero = torch.zeros((), device=self.device)
            values = torch.stack([loss.detach(), loss.detach(), zero, zero, zero, zero, correct.float(),
                                  student.counted.float().to(self.device)]).tolist()
            _check_finite({"ce": values[1]}, where, self.agree)
            self._optimise(loss)
            return StepResult(*values[:4], correct=int(values[6]), batch=images.shape[0], weight_logit=[],
                              weight_feature=[], reward=0.0, reward_hat=0.0, diagnostics={}, counted=int(values[7]))
        if self.teacher_transform is not None:
            teacher_outputs = self.teacher_transform(TransformInputs(
                sample_index, targets, Outputs(*(t.detach() for t in student_out)), [p.detach() for p in projected],
                teacher_outputs))
        terms = self.task.distill_terms(student_out, projected, teacher_outputs, targets, cfg.temperature)
        kl, mse = terms.kl, terms.mse  # [U, M] each
        state = None
        if self.strategy.needs_state:
            state = self.task.agent_state(student_out, projected, teacher_outputs, targets, cfg.temperature)
        inputs = self.task.step_inputs(student_out, teacher_outputs, targets, state, self.warmup, cfg.temperature)
        weights = self.strategy.weights(inputs)
        kd_term = terms.reduce(weights.logit * kl)
        feature_term = cfg.beta * terms.reduce(weights.feature * mse)
        ce_term = student.loss
        loss = ce_term + kd_term + feature_term
        reward = raw_reward(ce.detach(), kl.detach(), mse.detach(), weights.logit, weights.feature, cfg.beta)
        scalars = torch.cat([torch.stack([loss.detach(), ce_term.detach(), kd_term.detach(), feature_term.detach(),
                                          reward.mean(), normalized_reward(reward).mean(), correct.float(),
                                          student.counted.float().to(self.device)]),
                             weights.logit.detach().mean(0), weights.feature.detach().mean(0)])
        values = scalars.tolist()  # the step's one host sync
        _check_finite(dict(zip(LOSS_PARTS, values[1:4])), where, self.agree)
        self._add_class_weights(inputs.unit_labels, weights)
        self._optimise(loss)
        diagnostics = dict(weights.diagnostics)
        diagnostics.update(self.strategy.observe(StepFeedback(state, reward, weights.logit, weights.feature, self.warmup)))
        num_teachers = len(teacher_outputs)
        return StepResult(*values[:4], correct=int(values[6]), batch=images.shape[0],
                          weight_logit=values[8:8 + num_teachers], weight_feature=values[8 + num_teachers:],
                          reward=values[4], reward_hat=values[5], diagnostics=diagnostics, counted=int(values[7]))

    def _add_class_weights(self, targets: torch.Tensor, weights) -> None:
        """Accumulate, on the device, the teacher weights of each class (for ``class_weights/*``)."""
        rows = torch.cat([weights.logit.detach(), weights.feature.detach(),
                          torch.ones_like(targets, dtype=weights.logit.dtype)[:, None]], 1)  # [B, 2M + 1]
        if self._class_totals is None:
            self._class_totals = torch.zeros(self.num_classes, rows.shape[1], dtype=rows.dtype, device=rows.device)
        self._class_totals.index_add_(0, targets, rows)

    def _class_weight_metrics(self) -> dict:
        """``class_weights/logit`` and ``class_weights/feature``: ``[C][M]`` mean weights of the epoch
        (which teacher each class learnt from); {} when the strategy weights no teachers."""
        totals, self._class_totals = self._class_totals, None
        if totals is None:
            return {}
        num_teachers = (totals.shape[1] - 1) // 2
        means = (totals[:, :-1] / totals[:, -1:].clamp(min=1)).tolist()
        return {"class_weights/logit": [row[:num_teachers] for row in means],
                "class_weights/feature": [row[num_teachers:] for row in means]}

    def _optimise(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.global_step += 1

    # ----------------------------------------------------------------- one epoch
    def batches_with_teachers(self, loader) -> Iterator[tuple[object, list[Outputs] | None]]:
        """Yield ``(batch, teacher_outputs)`` with the batch and the float32 outputs on :attr:`device`;
        the teachers of the next ``runtime.prefetch`` batches are requested before the current batch
        is trained. Each batch moves to the device once."""
        if not self.strategy.uses_teachers:
            for batch in loader:
                yield self._to_device(batch), None
            return
        pending: deque = deque()
        batches = iter(loader)
        prefetch = max(0, self.config.runtime.prefetch)
        device_batches = self.pool.accepts_device_batches

        def fill(in_flight: int) -> None:
            while len(pending) < in_flight:
                batch = next(batches, None)
                if batch is None:
                    return
                on_device = self._to_device(batch)
                pending.append((on_device, self.pool.submit(on_device if device_batches else batch)))

        while True:
            fill(1 + prefetch)
            if not pending:
                return
            batch, ticket = pending.popleft()
            teacher_outputs = [as_float_outputs(o, self.device) for o in self.pool.collect(ticket)]
            fill(prefetch)  # the next batches are requested before this one is trained
            yield batch, teacher_outputs

    def _to_device(self, batch):
        return batch._replace(images=batch.images.to(self.device, non_blocking=True),
                              labels=batch.labels.to(self.device, non_blocking=True))

    def train_epoch(self, loader, on_step: Callable[[int, object, StepResult], None] | None = None) -> dict:
        """Train one epoch over ``loader`` (a ``BatchLoader``); returns the epoch's metrics."""
        loader.set_epoch(self.epoch)
        self.module.train()
        totals = EpochTotals(len(self.teacher_names))
        start = time.perf_counter()
        for position, (batch, teacher_outputs) in enumerate(self.batches_with_teachers(loader)):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.config.optim, self.epoch, position, len(loader))
            result = self.step(batch.images, batch.labels, teacher_outputs, batch.sample_index)
            totals.add(result)
            if on_step is not None:
                on_step(self.global_step, batch, result)
        totals.diagnostics.update(self.strategy.end_epoch())
        metrics = totals.summary(self.teacher_names)
        metrics.update(self._class_weight_metrics())
        if self.strategy.uses_teachers:
            metrics.update(self.pool.take_stats())
        metrics.update({"epoch": self.epoch + 1, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
                        "time/epoch_s": time.perf_counter() - start})
        self.epoch += 1
        return metrics

    def evaluate(self, loader) -> dict:
        """The task's test metrics of the student on ``loader`` (no augmentation): top-1 accuracy and
        mean CE; for segmentation also ``test/miou``."""
        return self.task.evaluate(self.module.student, loader, self.device, self.precision)

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
