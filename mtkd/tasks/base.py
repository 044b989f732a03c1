"""The interface every task implements, and how a run finds its task."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtkd.distill.state import AgentState
from mtkd.distill.strategies import StepInputs
from mtkd.models import Outputs


@dataclass
class StudentTerms:
    """The student's own task loss of a step (U units).

    Attributes:
        loss: scalar, what the student minimises besides distillation (with gradient).
        unit_loss: ``[U]`` the same loss per unit (the agent's reward reads it).
        correct: scalar tensor, correct predictions (images or pixels).
        counted: scalar tensor, predictions counted.
    """

    loss: torch.Tensor
    unit_loss: torch.Tensor
    correct: torch.Tensor
    counted: torch.Tensor


@dataclass
class DistillTerms:
    """The distillation losses of a step per unit and teacher.

    Attributes:
        kl: ``[U, M]`` logit distillation (with gradient).
        mse: ``[U, M]`` feature distillation (with gradient).
        mass: ``[U]`` each unit's share of the batch's loss (sums to 1), or None: ``1/U`` each.
    """

    kl: torch.Tensor
    mse: torch.Tensor
    mass: torch.Tensor | None = None

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """``[U, M]`` weighted losses -> the batch's term: the unit-mass mean, summed over teachers."""
        if self.mass is None:
            return values.mean(0).sum()
        return (self.mass[:, None] * values).sum()


class Task:
    """Base class: one task's outputs, losses, agent state and metric (see the package docstring)."""

    name = "task"

    def student_terms(self, student: Outputs, targets: torch.Tensor) -> StudentTerms:
        raise NotImplementedError

    def distill_terms(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                      targets: torch.Tensor, temperature: float) -> DistillTerms:
        raise NotImplementedError

    def agent_state(self, student: Outputs, projected: list[torch.Tensor], teachers: list[Outputs],
                    targets: torch.Tensor, temperature: float) -> AgentState:
        """The agent's state per unit: ``vector [U, dim]``, ``teacher_ce``, ``logit_gap``, ``feature_gap``
        ``[U, M]``; detached."""
        raise NotImplementedError

    def step_inputs(self, student: Outputs, teachers: list[Outputs], targets: torch.Tensor, state: AgentState | None,
                    warmup: bool, temperature: float) -> StepInputs:
        """What a strategy sees (per-unit views; see :class:`StepInputs`)."""
        raise NotImplementedError

    def state_layout(self, descriptions: list[dict], num_classes: int) -> tuple[list[int], int]:
        """``(D_m per teacher, C)`` of the agent state's per-teacher block ``[cos, KL, CE, D_m values,
        C class scores]`` (``dim = sum_m (D_m + C + 3)``)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, device: torch.device, precision: str) -> dict:
        """The test metrics of ``model`` over ``loader`` (``test/acc`` and ``test/loss`` always)."""
        raise NotImplementedError

    def unit_classes(self, num_classes: int) -> int:
        """How many values a unit's label (``StepInputs.unit_labels``) takes: the dataset's C here;
        detection adds a background label."""
        return num_classes

    @property
    def units_per_image(self) -> int | None:
        """Decision units per image when the task fixes it (detection: objects + background), else None."""
        return None

    def check_teachers(self, descriptions: list[dict]) -> None:
        """Refuse teachers whose outputs this task cannot read (``PoolMismatchError``); none here."""


def dataset_task(name: str) -> str:
    """The task of a registered dataset, before loading it: ``"segmentation"`` or ``"detection"`` for a
    loader marked so (``canvases``, ``canvases_det``), else ``"classification"``."""
    from mtkd.data import DATASETS

    return getattr(DATASETS.get(name), "task", "classification") if name in DATASETS else "classification"


def model_registry(dataset_name: str):
    """The model registry a student or teacher for ``dataset_name`` comes from: the segmentation
    networks for a segmentation set, the detectors for a detection set, the classifiers otherwise."""
    from mtkd.detection.models import DET_MODELS
    from mtkd.models import MODELS
    from mtkd.models.segmentation import SEG_MODELS

    task = dataset_task(dataset_name)
    return SEG_MODELS if task == "segmentation" else DET_MODELS if task == "detection" else MODELS


def task_of(dataset) -> str:
    """The task of a loaded dataset: ``"segmentation"`` when its labels are masks, ``"detection"`` for
    packed boxes."""
    return getattr(dataset, "task", "classification")


def task_for_dataset(dataset, region_grid: int = 0, logit_kd: str = "kl", units: str = "image") -> Task:
    """The :class:`Task` that trains on ``dataset`` (``region_grid``: segmentation's per-region units;
    ``logit_kd``: segmentation's logit distillation, ``kl`` or ``cwd``; ``units``: detection's decision
    units, ``image`` or ``object``)."""
    from mtkd.tasks.classification import ClassificationTask
    from mtkd.tasks.detection import DetectionTask
    from mtkd.tasks.segmentation import SegmentationTask

    if task_of(dataset) == "detection":
        return DetectionTask(num_classes=dataset.num_classes, max_objects=dataset.max_objects, units=units)
    if task_of(dataset) == "segmentation":
        return SegmentationTask(num_classes=dataset.num_classes, region_grid=region_grid, logit_kd=logit_kd)
    return ClassificationTask()
