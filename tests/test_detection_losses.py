"""Detection targets and losses against hand-computed values and numpy loops over cells and objects.

No expected value comes from an ``mtkd`` function.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkd.detection.boxes import pack_targets
from mtkd.detection.encode import encode_centernet, location_owner
from mtkd.detection.losses import (binary_kd_map, centernet_loss, centre_iou, focal_map, heatmap_kd, pkd_loss,
                                   regression_kd)
from mtkd.detection.regions import pool_by_object, reduce_by_object


def sig(z):
    return 1 / (1 + np.exp(-z))


def hand_targets() -> torch.Tensor:
    """Two images of a 24 x 32 input (stride 4: a 6 x 8 map), classes 0-2."""
    return pack_targets(
        [torch.tensor([[4.0, 8, 20, 16], [1, 1, 6, 4], [0, 0, 32, 24]]), torch.tensor([[10.0, 2, 30, 22]])],
        [torch.tensor([1, 0, 1]), torch.tensor([2])])


def np_owner(targets: np.ndarray, stride: int, h: int, w: int) -> np.ndarray:
    B, N, _ = targets.shape
    owner = np.full((B, h, w), -1)
    for b in range(B):
        for y in range(h):
            for x in range(w):
                best = None
                for n in range(N):
                    c, x0, y0, x1, y1 = targets[b, n]
                    if c < 0:
                        continue
                    cx, cy = min(int((x0 + x1) / 2 / stride), w - 1), min(int((y0 + y1) / 2 / stride), h - 1)
                    inside = x0 <= (x + 0.5) * stride < x1 and y0 <= (y + 0.5) * stride < y1
                    if inside or (x, y) == (cx, cy):
                        area = (x1 - x0) * (y1 - y0)
                        if best is None or area < best[0]:
                            best = (area, n)
                if best is not None:
                    owner[b, y, x] = best[1]
    return owner


def test_encode_hand_computed():
    enc = encode_centernet(hand_targets(), 3, 4, (6, 8))
    # box (4, 8, 20, 16): centre (12, 12) px = (3, 3) cells, offset 0, size (16, 8) / 4
    # box (1, 1, 6, 4): centre (3.5, 2.5) px = (0.875, 0.625) cells -> cell (0, 0)
    # box (0, 0, 32, 24): centre (16, 12) px = (4, 3) cells
    assert enc.centre[0].tolist() == [3 * 8 + 3, 0, 3 * 8 + 4]
    np.testing.assert_allclose(enc.offset[0].numpy(), [[0, 0], [0.875, 0.625], [0, 0]])
    np.testing.assert_allclose(enc.size[0].numpy(), [[4, 2], [1.25, 0.75], [8, 6]])
    assert enc.valid.tolist() == [[True, True, True], [True, False, False]]
    assert enc.heatmap[0, 1, 3, 3] == 1 and enc.heatmap[0, 1, 3, 4] == 1 and enc.heatmap[0, 0, 0, 0] == 1
    assert int((enc.heatmap == 1).sum()) == 4
    # class 1 at cell (y=3, x=5): max of the two Gaussians; sigma = max(0.54 * size / 6, 0.5)
    g1 = math.exp(-(5 - 3) ** 2 / (2 * max(0.54 * 4 / 6, 0.5) ** 2))
    g3 = math.exp(-(5 - 4) ** 2 / (2 * (0.54 * 8 / 6) ** 2))
    assert float(enc.heatmap[0, 1, 3, 5]) == pytest.approx(max(g1, g3), rel=1e-6)
    assert float(enc.heatmap[0, 2].sum()) == 0 and float(enc.heatmap[1, :2].sum()) == 0


def test_location_owner_matches_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (3, 6, 2))
    wh = rng.uniform(2, 30, (3, 6, 2))
    rows = np.concatenate([rng.integers(-1, 4, (3, 6, 1)), xy, np.minimum(xy + wh, 48)], 2)
    targets = torch.tensor(rows, dtype=torch.float32)
    expected = np_owner(targets.numpy(), 4, 12, 12)
    assert torch.equal(location_owner(targets, 4, (12, 12)), torch.tensor(expected))
    assert (expected >= 0).any() and (expected < 0).any()


def test_focal_map_matches_loop():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 3, 4, 5))
    target = rng.uniform(0, 0.99, (2, 3, 4, 5))
    target[0, 1, 2, 3] = target[1, 0, 0, 0] = target[1, 2, 3, 4] = 1.0
    expected = np.zeros((2, 4, 5))
    for b, k, y, x in np.ndindex(*logits.shape):
        p, t = sig(logits[b, k, y, x]), target[b, k, y, x]
        expected[b, y, x] += -(1 - p) ** 2 * math.log(p) if t == 1 else -((1 - t) ** 4) * p**2 * math.log(1 - p)
    out = focal_map(torch.tensor(logits), torch.tensor(target))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    extreme = focal_map(torch.tensor([[[[80.0, -80.0]]]]), torch.tensor([[[[0.0, 1.0]]]]))
    assert torch.isfinite(extreme).all() and float(extreme[0, 0, 1]) == pytest.approx(80.0, rel=1e-4)


def test_centernet_loss_matches_loop():
    targets = hand_targets()
    enc = encode_centernet(targets, 3, 4, (6, 8))
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(0, 1, (2, 3 + 4, 6, 8)), dtype=torch.float32)
    out = centernet_loss(logits, enc, size_weight=0.1, offset_weight=1.0)
    z, heat = logits.double().numpy(), enc.heatmap.double().numpy()
    owner = np_owner(targets.numpy(), 4, 6, 8)
    for b in range(2):
        focal = np.zeros((6, 8))
        for k, y, x in np.ndindex(3, 6, 8):
            p, t = sig(z[b, k, y, x]), heat[b, k, y, x]
            focal[y, x] += -(1 - p) ** 2 * math.log(p) if t == 1 else -((1 - t) ** 4) * p**2 * math.log(1 - p)
        positives = int((heat[b] == 1).sum())
        objects = [n for n in range(3) if targets[b, n, 0] >= 0]
        size_l1, offset_l1 = {}, {}
        for n in objects:
            x0, y0, x1, y1 = targets[b, n, 1:].tolist()
            cx, cy = (x0 + x1) / 8, (y0 + y1) / 8
            gx, gy = int(cx), int(cy)
            size_l1[n] = (abs(z[b, 3, gy, gx] - (x1 - x0) / 4) + abs(z[b, 4, gy, gx] - (y1 - y0) / 4)) / 2
            offset_l1[n] = (abs(z[b, 5, gy, gx] - (cx - gx)) + abs(z[b, 6, gy, gx] - (cy - gy))) / 2
        size = np.mean([size_l1[n] for n in objects])
        offset = np.mean([offset_l1[n] for n in objects])
        assert float(out.heatmap[b]) == pytest.approx(focal.sum() / positives, rel=1e-5)
        assert float(out.size[b]) == pytest.approx(size, rel=1e-5)
        assert float(out.offset[b]) == pytest.approx(offset, rel=1e-5)
        assert float(out.per_image[b]) == pytest.approx(focal.sum() / positives + 0.1 * size + offset, rel=1e-5)
        for n in objects:
            own = focal[owner[b] == n].sum() + 0.1 * size_l1[n] + offset_l1[n]
            assert float(out.per_object[b, n]) == pytest.approx(own, rel=1e-5)
        assert float(out.background[b]) == pytest.approx(focal[owner[b] == -1].sum(), rel=1e-5)
    assert out.per_object[1, 1:].abs().sum() == 0


def test_centre_iou_hand_computed():
    targets = pack_targets([torch.tensor([[4.0, 8, 20, 16]])], [torch.tensor([0])])
    enc = encode_centernet(targets, 1, 4, (6, 8))
    logits = torch.zeros(1, 5, 6, 8)
    logits[0, 1, 3, 3], logits[0, 2, 3, 3] = 4.0, 1.0  # size (16, 4) px at the centre cell (3, 3)
    # predicted (4, 10, 20, 14) inside the truth (4, 8, 20, 16): IoU 64 / 128
    assert centre_iou(logits, enc, targets[..., 1:], 4).tolist() == [[pytest.approx(0.5)]]


def test_reduce_by_object_matches_loop_and_equal_weights_give_the_image_value():
    rng = np.random.default_rng(3)
    values = rng.uniform(0, 2, (3, 5, 6))
    owner = rng.integers(-1, 3, (3, 5, 6))
    owner[1] = np.where(owner[1] == 1, 0, owner[1])  # image 1: object 1 owns nothing
    owner[2] = np.maximum(owner[2], 0)  # image 2: no background
    for share in (0.5, 0.8, None):
        out = reduce_by_object(torch.tensor(values), torch.tensor(owner), 4, share)
        for b in range(3):
            units = [values[b][owner[b] == u] for u in range(4)] + [values[b][owner[b] == -1]]
            means = np.array([u.mean() if u.size else 0.0 for u in units])
            np.testing.assert_allclose(out.units[b].numpy(), means, rtol=1e-12)
            filled = [u for u in range(4) if units[u].size]
            if share is None:
                expected = values[b].mean()
            elif not units[4].size:
                expected = np.mean([means[u] for u in filled])
            else:
                expected = share * np.mean([means[u] for u in filled]) + (1 - share) * means[4]
            assert float(out.per_image[b]) == pytest.approx(expected, rel=1e-12)
            assert float(out.mass[b].sum()) == pytest.approx(1.0)
    # per-unit weights all equal to w scale the image value by w
    weights = torch.full_like(out.units, 0.3)
    assert torch.allclose((out.mass * weights * out.units).sum(1), 0.3 * out.per_image)


def test_binary_kd_matches_loop_and_vanishes_on_equal_logits():
    rng = np.random.default_rng(4)
    zs, zt = rng.normal(0, 2, (2, 3, 4, 4)), rng.normal(0, 2, (2, 3, 4, 4))
    for T in (1.0, 2.5):
        expected = np.zeros((2, 4, 4))
        for b, k, y, x in np.ndindex(*zs.shape):
            p, q = sig(zs[b, k, y, x] / T), sig(zt[b, k, y, x] / T)
            expected[b, y, x] += T * T * (q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
        out = binary_kd_map(torch.tensor(zs), torch.tensor(zt), T)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert binary_kd_map(torch.tensor(zs), torch.tensor(zs), 2.0).abs().max() < 1e-6


def test_heatmap_kd_weights_the_foreground():
    targets = hand_targets()
    enc = encode_centernet(targets, 3, 4, (6, 8))
    rng = np.random.default_rng(5)
    student, teacher = (torch.tensor(rng.normal(0, 1, (2, 7, 6, 8))) for _ in range(2))
    out = heatmap_kd(student, teacher, 2.0, enc.owner, 3, fg_share=0.75)
    kd = np.zeros((2, 6, 8))
    zs, zt = student.numpy()[:, :3] / 2, teacher.numpy()[:, :3] / 2
    for b, k, y, x in np.ndindex(2, 3, 6, 8):
        p, q = sig(zs[b, k, y, x]), sig(zt[b, k, y, x])
        kd[b, y, x] += 4 * (q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))
    owner = np_owner(targets.numpy(), 4, 6, 8)
    for b in range(2):
        objects = [kd[b][owner[b] == n].mean() for n in range(3) if (owner[b] == n).any()]
        background = kd[b][owner[b] == -1]
        # image 0: its third box covers the whole image, so everything goes to the objects
        expected = 0.75 * np.mean(objects) + 0.25 * background.mean() if background.size else np.mean(objects)
        assert background.size == (0 if b == 0 else 48 - 5 * 5)  # 5 x 5 cell centres inside (10, 2, 30, 22)
        assert float(out.per_image[b]) == pytest.approx(expected, rel=1e-6)
    # the box channels take no part in the heatmap term
    shifted = student.clone()
    shifted[:, 3:] += 5
    assert torch.allclose(heatmap_kd(shifted, teacher, 2.0, enc.owner, 3).per_image,
                          heatmap_kd(student, teacher, 2.0, enc.owner, 3).per_image)


def test_regression_kd_matches_loop():
    targets = hand_targets()
    enc = encode_centernet(targets, 3, 4, (6, 8))
    rng = np.random.default_rng(6)
    s, t = rng.normal(0, 1, (2, 7, 6, 8)), rng.normal(0, 1, (2, 7, 6, 8))
    per_image, per_object = regression_kd(torch.tensor(s), torch.tensor(t), enc)
    cells = {(0, 0): (3, 3), (0, 1): (0, 0), (0, 2): (3, 4), (1, 0): (3, 5)}  # (y, x) of each centre: by hand
    for (b, n), (y, x) in cells.items():
        assert float(per_object[b, n]) == pytest.approx(np.abs(s[b, 3:, y, x] - t[b, 3:, y, x]).mean(), rel=1e-6)
    assert float(per_image[0]) == pytest.approx(float(per_object[0].mean()), rel=1e-6)
    assert float(per_image[1]) == pytest.approx(float(per_object[1, 0]), rel=1e-6) and per_object[1, 1:].sum() == 0
    with pytest.raises(ValueError, match="same"):
        regression_kd(torch.tensor(s), torch.tensor(t[:, :, :3]), enc)


def test_pkd_matches_loop_and_ignores_channel_scale_and_shift():
    rng = np.random.default_rng(7)
    s, t = rng.normal(0, 1, (2, 4, 3, 5)), rng.normal(2, 3, (2, 4, 3, 5))
    expected = np.zeros(2)
    for b in range(2):
        total = 0.0
        for c in range(4):
            zs = (s[b, c] - s[b, c].mean()) / (s[b, c].std() + 1e-6)
            zt = (t[b, c] - t[b, c].mean()) / (t[b, c].std() + 1e-6)
            total += 0.5 * ((zs - zt) ** 2).mean()
        expected[b] = total / 4
    out = pkd_loss(torch.tensor(s), torch.tensor(t))
    np.testing.assert_allclose(out.per_image.numpy(), expected, rtol=1e-5)
    # standardised per channel: a teacher that is an affine copy of the student, channel by channel, costs 0
    scale = torch.tensor([0.5, 2.0, 7.0, 1.5]).view(1, 4, 1, 1)
    copy = torch.tensor(s) * scale + 3.0
    assert pkd_loss(torch.tensor(s), copy).per_image.abs().max() < 1e-6


def test_pool_by_object_matches_loop():
    rng = np.random.default_rng(8)
    feature = rng.normal(0, 1, (2, 3, 4, 5))
    owner = rng.integers(-1, 2, (2, 4, 5))
    owner[1][owner[1] == 1] = 0  # object 1 of image 1 owns nothing
    out = pool_by_object(torch.tensor(feature), torch.tensor(owner), 3).numpy()
    assert out.shape == (2, 4, 3)
    for b in range(2):
        for u, label in enumerate([0, 1, 2, -1]):
            cells = owner[b] == label
            expected = feature[b][:, cells].mean(1) if cells.any() else np.zeros(3)
            np.testing.assert_allclose(out[b, u], expected, rtol=1e-12)
