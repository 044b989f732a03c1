"""The task layer: what a decision unit is, and the losses, agent state and metric of a task.

The engine (:mod:`mtkd.engine`) trains every task with the same step; a :class:`Task` turns the
step's outputs into per-unit tensors (``[U]`` and ``[U, M]``: U decision units, M teachers), so
that strategies and agents weight units without knowing the task:

* ``classification``: a unit is an image (the paper's setting, exactly as before the task layer);
* ``segmentation``: a unit is an image, or with ``distill.region_grid = G`` a cell of a ``G x G``
  grid over each image (its weight applied to the cell's pixels);
* ``detection``: a unit is an image, or with ``distill.units = object`` each ground-truth box and each
  image's background (its weight applied to the cells the box owns).

The task follows from the data: a dataset whose labels are masks is a segmentation set, one whose
labels are packed boxes (``task = "detection"``) a detection set.
"""
from mtkd.tasks.base import DistillTerms, StudentTerms, Task, dataset_task, model_registry, task_for_dataset, task_of
from mtkd.tasks.classification import ClassificationTask
from mtkd.tasks.detection import DetectionTask
from mtkd.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "DetectionTask", "DistillTerms", "SegmentationTask", "StudentTerms", "Task",
           "dataset_task", "model_registry", "task_for_dataset", "task_of"]
