"""The peak-search decoder against a brute-force one, and encode -> decode giving the boxes back."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import needs_fashion
from mtkd.detection.boxes import target_valid
from mtkd.detection.decode import decode_centernet
from mtkd.detection.encode import encode_centernet


def brute_decode(logits: np.ndarray, stride: int, image_size, top_k: int, threshold: float):
    """Every cell of every class that is >= its 8 neighbours, sorted by score, boxes read at the cell."""
    B, C, h, w = logits.shape
    K = C - 4
    out = []
    for b in range(B):
        found = []
        for k in range(K):
            for y in range(h):
                for x in range(w):
                    s = 1 / (1 + math.exp(-logits[b, k, y, x]))
                    rows, cols = range(max(0, y - 1), min(h, y + 2)), range(max(0, x - 1), min(w, x + 2))
                    neighbours = [1 / (1 + math.exp(-logits[b, k, yy, xx])) for yy in rows for xx in cols]
                    if s < max(neighbours) or s <= threshold:
                        continue
                    sw, sh, dx, dy = logits[b, K:, y, x]
                    cx, cy = (x + dx) * stride, (y + dy) * stride
                    box = [cx - sw * stride / 2, cy - sh * stride / 2, cx + sw * stride / 2, cy + sh * stride / 2]
                    box = [min(max(v, 0.0), lim) for v, lim in zip(box, [image_size[1], image_size[0]] * 2)]
                    found.append((s, k, box))
        found.sort(key=lambda f: -f[0])
        out.append(found[:top_k])
    return out


@pytest.mark.parametrize("top_k, threshold", [(100, 0.0), (5, 0.0), (100, 0.6)])
def test_decode_matches_brute_force(top_k, threshold):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 3 + 4, 6, 7))
    logits[:, 3:5] = rng.uniform(0.5, 4, (2, 2, 6, 7))  # sizes
    logits[:, 5:] = rng.uniform(0, 1, (2, 2, 6, 7))  # offsets
    expected = brute_decode(logits, 4, (24, 28), top_k, threshold)
    det = decode_centernet(torch.tensor(logits), 4, (24, 28), top_k=top_k, threshold=threshold)
    assert det.boxes.shape == (2, min(top_k, 3 * 6 * 7), 4)
    for b, found in enumerate(expected):
        n = len(found)
        assert 0 < n < det.scores.shape[1] or top_k == 5
        np.testing.assert_allclose(det.scores[b, :n].numpy(), [f[0] for f in found], rtol=1e-6)
        assert det.labels[b, :n].tolist() == [f[1] for f in found]
        np.testing.assert_allclose(det.boxes[b, :n].numpy(), [f[2] for f in found], rtol=1e-5, atol=1e-5)
        assert (det.labels[b, n:] == -1).all() and (det.scores[b, n:] == 0).all()


def test_decode_with_nms_drops_overlapping_same_class_peaks():
    logits = torch.full((1, 1 + 4, 5, 5), -5.0)
    logits[0, 0, 1, 1], logits[0, 0, 1, 3] = 3.0, 2.0  # two peaks, 2 cells apart
    logits[0, 1:3] = 4.0  # 16 px boxes, clipped to [0, 0, 14, 14] and [6, 0, 20, 14]: IoU 112 / 280 = 0.4
    logits[0, 3:] = 0.5
    assert (decode_centernet(logits, 4, (20, 20), threshold=0.5).labels[0] == 0).sum() == 2
    assert (decode_centernet(logits, 4, (20, 20), threshold=0.5, nms_iou=0.45).labels[0] == 0).sum() == 2
    det = decode_centernet(logits, 4, (20, 20), threshold=0.5, nms_iou=0.35)
    assert det.labels[0].tolist()[:2] == [0, -1] and det.scores[0, 0] == pytest.approx(1 / (1 + math.exp(-3)))


@needs_fashion
def test_encoded_canvas_boxes_decode_back():
    from mtkd.data.canvases import CanvasParams
    from mtkd.detection.canvas_boxes import DetectionCanvases

    targets = DetectionCanvases("train", num_canvases=24, params=CanvasParams(size=48)).targets
    enc = encode_centernet(targets, 10, 4, (12, 12))
    heat = enc.heatmap.clamp(1e-4, 1 - 1e-6)
    size = torch.zeros(24, 2, 144)
    offset = torch.zeros(24, 2, 144)
    size.scatter_(2, enc.centre[:, None].expand(-1, 2, -1), enc.size.transpose(1, 2))
    offset.scatter_(2, enc.centre[:, None].expand(-1, 2, -1), enc.offset.transpose(1, 2))
    logits = torch.cat([torch.log(heat / (1 - heat)), size.view(24, 2, 12, 12), offset.view(24, 2, 12, 12)], 1)
    det = decode_centernet(logits, 4, (48, 48), threshold=0.9)
    valid = target_valid(targets)
    checked = 0
    for b in range(24):
        keys = [(int(targets[b, i, 0]), int(enc.centre[b, i])) for i in range(targets.shape[1]) if valid[b, i]]
        if len(set(keys)) < len(keys):
            continue  # two boxes of one class on one cell: only one can come back
        truth = sorted(targets[b][valid[b]].tolist())
        found = sorted([[float(l), *bx] for l, bx in zip(det.labels[b].tolist(), det.boxes[b].tolist()) if l >= 0])
        assert len(found) == len(truth)
        np.testing.assert_allclose(found, truth, atol=1e-4)
        checked += 1
    assert checked >= 20
