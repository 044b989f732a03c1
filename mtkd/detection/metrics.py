"""COCO box mAP through a COCO evaluation library (``faster-coco-eval``, pycocotools' algorithm).

:class:`DetectionMeter` collects each batch's detections and ground truth, then writes them as COCO
dictionaries and runs the library's ``bbox`` evaluation: mAP averaged over IoU 0.50:0.05:0.95
(``map``), at IoU 0.5 (``map50``) and 0.75 (``map75``), 101-point interpolated precision, up to 100
detections per image, classes absent from the ground truth left out of the mean. Boxes are
continuous xyxy pixels, written as COCO ``[x, y, w, h]``; a ground-truth box's ``area`` (which only
picks its small/medium/large range) is its box area. Ignored boxes (crowd, difficult) are written
``iscrowd = 1``: a detection on one counts neither way.
"""
from __future__ import annotations

import contextlib
import io
import math

import torch

from mtkd.detection.boxes import target_valid

__all__ = ["DetectionMeter", "coco_map"]


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.double()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()


class DetectionMeter:
    """Accumulates detections and ground truth; :meth:`compute` scores them.

    Args:
        num_classes: K.

    Usage::

        meter = DetectionMeter(10)
        for images, targets in loader:
            meter.update(decode_centernet(model(images).logits, 4, images.shape[-2:]), targets)
        meter.compute()   # {"map", "map50", "map75", "images"}
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.images: list[dict] = []
        self.truth: list[dict] = []
        self.found: list[dict] = []

    def update(self, detections, targets: torch.Tensor, ignore: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            detections: a :class:`~mtkd.detection.decode.Detections` (``boxes [B, k, 4]``, ``scores [B, k]``,
                ``labels [B, k]``; label -1 is padding).
            targets: ``[B, N, 5]`` packed ground truth.
            ignore: optional ``[B, N]`` bool, ground-truth boxes that are not scored (crowd, difficult).
        """
        valid = target_valid(targets)
        if ignore is None:
            ignore = torch.zeros_like(valid)
        boxes, scores, labels = (t.detach().cpu() for t in detections)
        for b in range(targets.shape[0]):
            image_id = len(self.images) + 1
            self.images.append({"id": image_id})
            gt = targets[b][valid[b]].cpu()
            crowd = ignore[b][valid[b]].cpu()
            for box, cls, area, is_crowd in zip(_xywh(gt[:, 1:]), gt[:, 0].long().tolist(),
                                                ((gt[:, 3] - gt[:, 1]) * (gt[:, 4] - gt[:, 2])).tolist(), crowd.tolist()):
                self.truth.append({"id": len(self.truth) + 1, "image_id": image_id, "category_id": cls + 1,
                                   "bbox": box, "area": area, "iscrowd": int(is_crowd)})
            real = labels[b] >= 0
            for box, cls, score in zip(_xywh(boxes[b][real]), labels[b][real].tolist(), scores[b][real].tolist()):
                self.found.append({"image_id": image_id, "category_id": cls + 1, "bbox": box, "score": score})

    def compute(self) -> dict:
        """``{"map", "map50", "map75", "images"}``; the mAPs are NaN without any ground-truth box."""
        from faster_coco_eval import COCO, COCOeval_faster

        result = {"map": math.nan, "map50": math.nan, "map75": math.nan, "images": len(self.images)}
        if not self.truth:
            return result
        categories = [{"id": k + 1, "name": str(k)} for k in range(self.num_classes)]
        with contextlib.redirect_stdout(io.StringIO()):  # the library prints its summary table
            truth = COCO({"images": self.images, "annotations": self.truth, "categories": categories})
            if not self.found:
                return {**result, "map": 0.0, "map50": 0.0, "map75": 0.0}
            found = truth.loadRes([dict(d) for d in self.found])
            evaluator = COCOeval_faster(truth, found, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats
        return {**result, "map": float(stats[0]), "map50": float(stats[1]), "map75": float(stats[2])}


def coco_map(detections, targets: torch.Tensor, num_classes: int, ignore: torch.Tensor | None = None) -> dict:
    """One-shot :class:`DetectionMeter`: ``detections`` and ``[B, N, 5]`` targets -> its ``compute()``."""
    meter = DetectionMeter(num_classes)
    meter.update(detections, targets, ignore)
    return meter.compute()
