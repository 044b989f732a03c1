"""Box IoU and greedy NMS against brute-force Python, and the packed target layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkd.detection.boxes import batched_nms, box_iou, nms, pack_targets, target_valid, unpack_targets


def random_boxes(rng, n: int, size: float = 50.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def py_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def py_nms(boxes, scores, threshold) -> list[int]:
    """Greedy NMS as the definition reads: take the best remaining box, drop every box above the IoU."""
    remaining = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    while remaining:
        best = remaining.pop(0)
        keep.append(best)
        remaining = [i for i in remaining if py_iou(boxes[best], boxes[i]) <= threshold]
    return keep


def test_box_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    b[0] = a[0]  # an identical pair: IoU 1
    b[1] = [200, 200, 210, 210]  # disjoint from everything: IoU 0
    expected = np.array([[py_iou(x, y) for y in b] for x in a])
    out = box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert out[0, 0] == pytest.approx(1.0) and (out[:, 1] == 0).all()


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7])
def test_nms_matches_brute_force(threshold):
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 60, size=30.0)  # crowded: much overlap
    scores = rng.permutation(60) / 60.0
    expected = py_nms(boxes.tolist(), scores.tolist(), threshold)
    out = nms(torch.tensor(boxes), torch.tensor(scores), threshold).tolist()
    assert out == expected
    assert 1 < len(out) < 60


def test_batched_nms_never_suppresses_across_classes():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 40, size=30.0)
    scores = rng.permutation(40) / 40.0
    classes = rng.integers(0, 3, 40)
    expected = []
    for c in range(3):
        idx = np.nonzero(classes == c)[0]
        expected += [int(idx[i]) for i in py_nms(boxes[idx].tolist(), scores[idx].tolist(), 0.4)]
    expected.sort(key=lambda i: -scores[i])
    out = batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes), 0.4).tolist()
    assert out == expected
    # the same boxes as one class lose more
    assert len(nms(torch.tensor(boxes), torch.tensor(scores), 0.4)) < len(out)


def test_pack_and_unpack_targets():
    boxes = [torch.tensor([[0.0, 1, 5, 6], [2, 2, 4, 9]]), torch.zeros(0, 4), torch.tensor([[1.0, 1, 3, 3]])]
    labels = [torch.tensor([3, 0]), torch.zeros(0, dtype=torch.int64), torch.tensor([7])]
    packed = pack_targets(boxes, labels, min_rows=4)
    assert packed.shape == (3, 4, 5)
    assert target_valid(packed).sum(1).tolist() == [2, 0, 1]
    assert packed[0, 1].tolist() == [0.0, 2, 2, 4, 9] and packed[1, 0, 0] == -1
    for (b, l), b0, l0 in zip(unpack_targets(packed), boxes, labels):
        assert torch.equal(b, b0) and torch.equal(l, l0)
    with pytest.raises(ValueError, match=r"\[B, N, 5\]"):
        target_valid(torch.zeros(2, 3, 4))
