"""The ``meta`` agent rule: teacher weights learnt from what the student's update did to its loss on
data that update did not use (docs/method.md, "The meta rule").

Read top to bottom, one student step ``t`` (B samples, M teachers, C classes, D embedding width):

* **state** ``phi[i, m]`` ``[B, M, F]``: per sample and teacher, the teacher's probability of the label,
  ``exp(-KL_T / T^2)`` (1 where the teacher agrees with the student), the teacher's top probability and
  the feature cosine (all from the agent state of the step, detached). Every feature is bounded
  (``[0, 1]`` or ``[-1, 1]``): with the cross-entropy itself (unbounded, 10 or more on a wrong
  teacher) one early policy step on a noisy hypergradient could set ``theta`` so that the softmax
  saturated on the wrong teachers and its gradient vanished; measured, the specialists regime then
  gave wrong teachers 0.64 of the weight for 6 to 10 of 15 epochs on 2 of 10 seeds.
* **action** ``w[i, m] = softmax_m(phi[i, m] . theta + b[m] + b_class[y_i, m])``, used for both the
  logit and the feature term (``wL = wF = w``). Every parameter starts at 0: the first weights are
  exactly ``aver``'s ``1/M``.
* **signal**: the student's update ``t`` moves its classifier ``z = W e + c`` by
  ``-lr * d(loss_t)/d(W, c)``, in which sample ``i``, teacher ``m`` takes part through
  ``(w[i, m] / B) * delta[i, m] [e_i, 1]`` with ``delta[i, m] = dKL_T[i, m]/dz_i = T (softmax(z_i / T) -
  softmax(z^m_i / T))`` ``[B, M, C]``. The *meta batch* is the next batch: ``N`` samples the update did
  not train on, whose outputs the student computes at step ``t + 1`` anyway (no extra forward or
  backward pass). The *meta loss* there is distillation from the teachers that are right:
  ``L_meta = mean_j T^2 KL(q_j || softmax(z_j / T))`` with ``q_j`` the mean of ``softmax(z^m_j / T)`` over
  the teachers whose top class is the label ``y_j`` (no term when none is). Its gradient on the
  classifier, read along ``e_i``, is ``v_i = (1/N) sum_j g_j (e_j . e_i + 1)`` ``[B, C]`` with
  ``g_j = T (softmax(z_j / T) - q_j)``, and the effect of the weight on the meta loss, through the
  update, is exactly ``dL_meta/dw[i, m] = -(lr / B) delta[i, m] . v_i`` (the update's own first-order
  term; the backbone's share is left out).
  Why not the meta batch's cross-entropy (the obvious choice, measured first): over one step,
  distillation lowers the student's confidence on the label, so the cross-entropy of the next batch
  rises with every teacher's weight. A teacher that returns the student's own outputs (no push at all)
  then wins every comparison, and in a pool with such a teacher it took 0.6 to 0.8 of the weight.
* **update** at step ``t + 1``: ``h[i, m] = -delta[i, m] . v_i`` (the hypergradient without its
  positive factor ``lr / B``), divided by a running mean of ``|h|`` so that ``agent.meta_lr`` does not
  depend on the scale of the student's embedding; one SGD step (``agent.meta_lr``, weight decay
  ``agent.meta_decay``, a pull towards ``aver``) on ``sum_m h[i, m] w[i, m]`` averaged over the batch
  (plus ``agent.meta_entropy * KL(w || uniform)``: the first-order objective is linear in ``w``),
  with gradients through ``w`` into ``theta, b, b_class``. Weight moves away from a teacher whose
  distillation pushed the classifier against the right teachers on held-out samples, and towards one
  whose distillation agreed with them.

Dense tasks (segmentation, :mod:`mtkd.tasks`) weight *units* (images or grid cells) scored in many
*rows* (pixels): ``phi``'s label and top probabilities are each unit's mean over its rows, the class
bias reads the unit's most frequent label, ``delta``, ``v`` and ``h`` are computed per row (``e`` the
student's backbone feature at the pixel) and ``h`` is averaged over each unit's rows. With one row
per unit (classification) this is the computation above, unchanged.

With several learners (DistributedDataParallel) each computes ``h`` on its own batches; the policy's
gradient and the running scale are averaged over learners before the step, so every learner keeps
the same policy. The pending step is part of the agent's state: a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .strategies import per_unit_mean

NUM_FEATURES = 4
"""Per (sample, teacher): teacher probability of the label, ``exp(-KL gap / T^2)``, teacher top
probability, feature cosine."""
SCALE_MOMENTUM = 0.9
"""Of the running mean of ``|h|`` that normalises the hypergradient."""
_PAIRWISE_LIMIT = 1 << 20
"""Above this many (row, meta row) pairs, :func:`meta_direction` sums in an order without the pairwise matrix."""


def teacher_features(teacher_logits: list[torch.Tensor], targets: torch.Tensor, logit_gap: torch.Tensor,
                     feature_gap: torch.Tensor, temperature: float,
                     per_unit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``phi`` ``[U, M, 4]``: the teacher's probability of the label, ``exp(-KL_T / T^2)``, its top
    probability and the feature cosine, each in ``[0, 1]`` (the cosine in ``[-1, 1]``).

    Args:
        teacher_logits: per teacher ``[R, C]`` (a row per prediction). targets: ``[R]``.
        logit_gap: ``[U, M]`` ``KL_T(teacher || student)`` (``T^2`` included).
        feature_gap: ``[U, M]`` cosine of the projected student feature and the teacher embedding.
        per_unit: ``[R, M]`` -> ``[U, M]`` mean over each unit's rows (None: the rows are the units).
    """
    probs = torch.stack([F.softmax(z, 1) for z in teacher_logits], 1)  # [R, M, C]
    label = probs.gather(2, targets[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(2)  # [R, M]
    top = probs.amax(2)  # [R, M]
    if per_unit is not None:
        label, top = per_unit(label), per_unit(top)
    agreement = torch.exp(-logit_gap / temperature**2)  # [U, M]
    return torch.stack([label, agreement, top, feature_gap], 2).detach()


def kd_logit_gradient(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """``delta`` ``[B, M, C]``: the gradient of each ``KL_T(teacher m || student)`` with respect to the
    student's logits, ``T (softmax(z / T) - softmax(z^m / T))``."""
    p_student = F.softmax(student_logits / temperature, 1)  # [B, C]
    p_teachers = torch.stack([F.softmax(z / temperature, 1) for z in teacher_logits], 1)  # [B, M, C]
    return temperature * (p_student[:, None, :] - p_teachers)


def consensus_gradient(meta_logits: torch.Tensor, meta_targets: torch.Tensor, meta_teacher_logits: list[torch.Tensor],
                       temperature: float) -> torch.Tensor:
    """``g`` ``[N, C]``: the gradient, with respect to each meta sample's logits ``z_j``, of the meta loss
    ``T^2 KL(q_j || softmax(z_j / T))``, where ``q_j`` is the mean of ``softmax(z^m_j / T)`` over the
    teachers whose top class is the label ``y_j``: ``g_j = T (softmax(z_j / T) - q_j)``, and 0 for a
    sample that no teacher gets right.

    Args:
        meta_logits: ``[N, C]`` the student's logits of the meta batch. meta_targets: ``[N]``.
        meta_teacher_logits: per teacher ``[N, C]``. temperature: T.
    """
    right = torch.stack([z.argmax(1) == meta_targets for z in meta_teacher_logits], 1).to(meta_logits.dtype)  # [N, M]
    soft = torch.stack([F.softmax(z / temperature, 1) for z in meta_teacher_logits], 1)  # [N, M, C]
    count = right.sum(1, keepdim=True)  # [N, 1]
    consensus = (right[:, :, None] * soft).sum(1) / count.clamp(min=1)  # [N, C]
    return temperature * (count > 0) * (F.softmax(meta_logits / temperature, 1) - consensus)


def meta_direction(embedding: torch.Tensor, meta_embedding: torch.Tensor, meta_gradient: torch.Tensor) -> torch.Tensor:
    """``v`` ``[B, C]``: the gradient of the meta batch's mean loss with respect to the classifier
    (``W [C, D]``, bias ``[C]``), applied to each sample's embedding:
    ``v_i = (1/N) sum_j g_j (e_j . e_i + 1)``.

    Args:
        embedding: ``[B, D]`` the embeddings of the step being judged.
        meta_embedding: ``[N, D]`` the meta batch's embeddings.
        meta_gradient: ``[N, C]`` the meta loss's gradient with respect to each meta sample's logits.
    """
    if embedding.shape[0] * meta_embedding.shape[0] <= _PAIRWISE_LIMIT:
        similarity = embedding @ meta_embedding.T + 1.0  # [B, N]
        return similarity @ meta_gradient / meta_gradient.shape[0]
    # many rows (pixels): the same sum in the other order, without the [B, N] matrix
    return (embedding @ (meta_embedding.T @ meta_gradient) + meta_gradient.sum(0)) / meta_gradient.shape[0]


def hypergradient(delta: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``h`` ``[B, M]`` ``= -delta[i, m] . v_i``: the meta loss's derivative with respect to each weight,
    without its positive factor ``lr / B``. ``delta [B, M, C]``, ``direction [B, C]``."""
    return -(delta * direction[:, None, :]).sum(2)


class TeacherScore(nn.Module):
    """``score[i, m] = phi[i, m] . theta + b[m] + b_class[y_i, m]``; ``w = softmax_m(score)``.

    Starts at zero (``w = 1/M``). Args: num_teachers M, num_classes C.
    """

    def __init__(self, num_teachers: int, num_classes: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(NUM_FEATURES))
        self.teacher_bias = nn.Parameter(torch.zeros(num_teachers))
        self.class_bias = nn.Parameter(torch.zeros(num_classes, num_teachers))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``features [B, M, F]``, ``targets [B]`` -> weights ``[B, M]`` (rows sum to 1)."""
        score = features @ self.theta + self.teacher_bias + self.class_bias[targets]
        return torch.softmax(score, 1)


class MetaAgent:
    """The ``meta`` rule's agent: acts and learns inside the student's step (see the module docstring).

    Args:
        num_teachers: M. num_classes: C.
        lr: SGD learning rate of the policy (``agent.meta_lr``). decay: its weight decay (``agent.meta_decay``,
            a pull towards ``aver``). entropy: weight of ``KL(w || uniform)`` in the policy's loss
            (``agent.meta_entropy``).
        seed: unused (the policy starts at zero); kept for the common agent signature.
    """

    rule = "meta"

    def __init__(self, num_teachers: int, num_classes: int, *, lr: float = 0.1, decay: float = 0.0,
                 entropy: float = 0.0, seed: int = 0, **_ignored):
        self.policy = TeacherScore(num_teachers, num_classes)
        self.optimizer = torch.optim.SGD(self.policy.parameters(), lr=lr, momentum=0.0, weight_decay=decay)
        self.entropy = entropy
        self.pending: dict[str, torch.Tensor] | None = None  # step t's features, targets, delta, embedding
        self.scale = torch.zeros(())  # running mean of |h|
        self.version = 0
        self.last_update: dict[str, float] = {}

    def to(self, device: torch.device | str) -> "MetaAgent":
        self.policy.to(device)
        self.scale = self.scale.to(device)
        return self

    # ------------------------------------------------------------------ one step
    def step(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Learn from the previous step with this batch as its meta batch, then act on this batch.

        Args:
            inputs: the step's :class:`~mtkd.distill.strategies.StepInputs` (needs ``state``,
                ``student_logits``, ``student_embedding`` and ``temperature``).

        Returns:
            ``(wL, wF)`` ``[B, M]`` each (the same tensor), without gradient.
        """
        if self.pending is not None:  # this batch is the meta batch of the previous step
            gradient = consensus_gradient(inputs.student_logits, inputs.targets, inputs.teacher_logits,
                                          inputs.temperature)  # [N, C]
            self.update(inputs.student_embedding, gradient)
        per_unit = None if inputs.unit_of_row is None else inputs.per_unit
        features = teacher_features(inputs.teacher_logits, inputs.targets, inputs.state.logit_gap,
                                    inputs.state.feature_gap, inputs.temperature, per_unit)  # [U, M, F]
        with torch.no_grad():
            weights = self.policy(features, inputs.unit_labels)  # [U, M]
        self.pending = {"features": features, "targets": inputs.unit_labels.detach(),
                        "delta": kd_logit_gradient(inputs.student_logits, inputs.teacher_logits, inputs.temperature),
                        "embedding": inputs.student_embedding.detach()}
        if inputs.unit_of_row is not None:  # rows are pixels: the hypergradient is averaged per unit
            self.pending["unit_of_row"] = inputs.unit_of_row.detach()
        return weights, weights

    def update(self, meta_embedding: torch.Tensor, meta_gradient: torch.Tensor) -> None:
        """One policy step on the pending step, judged by the meta batch: its embeddings ``[N, D]`` and
        the meta loss's gradient on its logits ``[N, C]``."""
        p = self.pending
        b_direction = meta_direction(p["embedding"], meta_embedding.detach(), meta_gradient.detach())  # [B, C]
        b_h = hypergradient(p["delta"], b_direction)  # [R, M]
        if "unit_of_row" in p:
            b_h = per_unit_mean(b_h, p["unit_of_row"], p["features"].shape[0])  # [U, M]
        magnitude = _mean_over_learners(b_h.abs().mean())
        self.scale = magnitude if self.version == 0 else SCALE_MOMENTUM * self.scale + (1 - SCALE_MOMENTUM) * magnitude
        b_h = b_h / self.scale.clamp(min=1e-12)
        b_weights = self.policy(p["features"], p["targets"])  # [B, M], with gradient
        loss = (b_h * b_weights).sum(1).mean()
        if self.entropy:  # KL(w || uniform): the first-order objective alone is linear in w
            loss = loss + self.entropy * (b_weights * torch.log(b_weights * b_weights.shape[1])).sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_over_learners(self.policy)
        self.optimizer.step()
        self.version += 1
        self.pending = None
        self.last_update = {"agent/meta_signal": float(magnitude), "agent/theta_label": float(self.policy.theta.detach()[0])}

    def end_epoch(self) -> bool:
        return False

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Policy, optimiser, version, the running scale and the pending step (tensors and plain values)."""
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(), "version": self.version,
                "scale": self.scale.clone(), "pending": dict(self.pending) if self.pending is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        device = self.scale.device
        self.scale = state["scale"].to(device)
        self.pending = {k: v.to(device) for k, v in state["pending"].items()} or None


def _several_learners() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_learners(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the learners (itself with one learner)."""
    if not _several_learners():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _average_over_learners(module: nn.Module) -> None:
    """With several learners (torch.distributed), average the gradients so that every policy stays equal."""
    if not _several_learners():
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()
