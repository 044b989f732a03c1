"""COCO mAP from the evaluation library against hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from mtkd.detection.decode import Detections
from mtkd.detection.metrics import DetectionMeter, coco_map


def dets(rows):
    """rows of (label, score, x0, y0, x1, y1) for one image -> Detections of batch 1."""
    return Detections(torch.tensor([[r[2:] for r in rows]], dtype=torch.float32),
                      torch.tensor([[r[1] for r in rows]]), torch.tensor([[r[0] for r in rows]]))


TARGETS = torch.tensor([[[0, 0, 0, 10, 10], [0, 20, 20, 30, 30], [1, 30, 0, 40, 10]]], dtype=torch.float32)
# class 0: two boxes; a perfect detection (0.9), then a false positive (0.8), the second box missed:
#   precision 1 up to recall 0.5, nothing beyond -> 101-point AP = 51 / 101 at every IoU threshold.
# class 1: one box, one detection of IoU 72 / 100 = 0.72: a hit at IoU 0.50..0.70 (5 of the 10
#   thresholds), a miss above -> AP 1 at 0.5, 0 at 0.75, 0.5 over 0.50:0.95.
DETECTIONS = dets([(0, 0.9, 0, 0, 10, 10), (0, 0.8, 50, 50, 60, 60), (1, 0.7, 30, 0, 40, 7.2)])


def test_hand_computed_map():
    scores = coco_map(DETECTIONS, TARGETS, num_classes=3)  # class 2: no ground truth, left out
    assert scores["map50"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-9)
    assert scores["map75"] == pytest.approx((51 / 101 + 0) / 2, abs=1e-9)
    assert scores["map"] == pytest.approx((51 / 101 + 0.5) / 2, abs=1e-9)


def test_perfect_empty_and_split_batches():
    perfect = dets([(0, 0.9, 0, 0, 10, 10), (0, 0.8, 20, 20, 30, 30), (1, 0.7, 30, 0, 40, 10)])
    assert coco_map(perfect, TARGETS, 2)["map"] == pytest.approx(1.0)
    nothing = Detections(torch.zeros(1, 3, 4), torch.zeros(1, 3), torch.full((1, 3), -1))
    assert coco_map(nothing, TARGETS, 2)["map"] == 0.0
    # two images in two updates score like one batch of two
    meter = DetectionMeter(2)
    meter.update(DETECTIONS, TARGETS)
    meter.update(perfect, TARGETS)
    both = DetectionMeter(2)
    both.update(Detections(*(torch.cat([a, b]) for a, b in zip(DETECTIONS, perfect))), torch.cat([TARGETS, TARGETS]))
    assert meter.compute() == both.compute() and meter.compute()["images"] == 2


def test_detection_on_an_ignored_box_counts_neither_way():
    targets = torch.tensor([[[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]]], dtype=torch.float32)
    found = dets([(0, 0.9, 20, 20, 30, 30), (0, 0.8, 0, 0, 10, 10)])
    # without ignoring: both found, AP 1; the top detection sits on a crowd box: still AP 1 (not a FP)
    assert coco_map(found, targets, 1)["map"] == pytest.approx(1.0)
    assert coco_map(found, targets, 1, ignore=torch.tensor([[False, True]]))["map"] == pytest.approx(1.0)
    # the same detection with no box there is a false positive ranked first: precision 1/2 at recall 1
    assert coco_map(found, targets[:, :1], 1)["map50"] == pytest.approx(0.5)
