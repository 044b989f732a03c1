"""Object detection: boxes, data, CenterNet-style detectors, decoding, losses and the COCO metric.

The foundation of the ``detection`` task (issue 22); nothing here is wired into the engine yet.

* :mod:`~mtkd.detection.boxes`: box ops, greedy NMS, the packed ``[B, N, 5]`` target layout;
* :mod:`~mtkd.detection.canvas_boxes`: garment canvases with a box per visible garment;
* :mod:`~mtkd.detection.formats`: COCO ``instances_*.json`` and Pascal VOC ``Annotations/*.xml``;
* :mod:`~mtkd.detection.augment`: scale, crop and flip that move the boxes with the image;
* :mod:`~mtkd.detection.models`: ``DET_MODELS``, CenterNet on the zoo's backbones and ImageNet ResNets;
* :mod:`~mtkd.detection.encode` / :mod:`~mtkd.detection.decode`: boxes <-> heatmap targets / peaks;
* :mod:`~mtkd.detection.losses`, :mod:`~mtkd.detection.regions`: task and distillation losses per image
  and per object;
* :mod:`~mtkd.detection.metrics`: COCO mAP and mAP@0.5 (``faster-coco-eval``).
"""
from mtkd.detection.boxes import batched_nms, box_area, box_iou, nms, pack_targets, target_valid, unpack_targets
from mtkd.detection.decode import Detections, decode_centernet
from mtkd.detection.encode import CenterNetTargets, encode_centernet, location_owner
from mtkd.detection.models import (DET_MODELS, CenterNet, DetectionOutputs, build_detector, create_det_model,
                                   list_det_models, split_logits)
from mtkd.detection.regions import ObjectValues, reduce_by_object

__all__ = [
    "DET_MODELS", "CenterNet", "CenterNetTargets", "DetectionOutputs", "Detections", "ObjectValues", "batched_nms",
    "box_area", "box_iou", "build_detector", "create_det_model", "decode_centernet", "encode_centernet",
    "list_det_models", "location_owner", "nms", "pack_targets", "reduce_by_object", "split_logits", "target_valid",
    "unpack_targets",
]
