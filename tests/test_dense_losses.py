"""Independent checks of the segmentation losses, agent state and mIoU.

Expected values come from literal numbers computed by hand, explicit float64 numpy loops over pixels,
channels and cells written from the definitions, and torchmetrics where it is installed. No expected
value is obtained by calling an ``mtkd`` function.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtkd.dense_metrics import SegmentationMeter
from mtkd.distill.dense_losses import (
    CellValues,
    cell_mean,
    cwd_cells,
    cwd_loss,
    dense_feature_mse,
    dense_feature_mse_cells,
    downsample_labels,
    pixel_ce,
    pixel_ce_cells,
    pixel_kd_kl,
    pixel_kd_kl_cells,
    resize_logits,
    valid_mask,
)
from mtkd.distill.dense_state import dense_agent_state

IGNORE = 255
LN3 = math.log(3.0)
KL_3_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([3/4, 1/4] || [1/2, 1/2]) = 0.1308120


# ----------------------------------------------------------------------------- numpy references
def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def np_kl(zs: np.ndarray, zt: np.ndarray, T: float) -> float:
    """T^2 KL(softmax(zt/T) || softmax(zs/T)) of two 1-D vectors."""
    lt, ls = np_log_softmax(zt / T), np_log_softmax(zs / T)
    return T * T * float((np.exp(lt) * (lt - ls)).sum())


def _bilinear_axis(n_in: int, n_out: int):
    """Half-pixel (align_corners=False) source coordinates along one axis."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def np_bilinear(x: np.ndarray, size) -> np.ndarray:
    """[B, K, h, w] -> [B, K, *size], pixel by pixel."""
    ys0, ys1, ly = _bilinear_axis(x.shape[2], size[0])
    xs0, xs1, lx = _bilinear_axis(x.shape[3], size[1])
    out = np.zeros(x.shape[:2] + tuple(size))
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, :, i, j] = ((1 - ly[i]) * ((1 - lx[j]) * x[:, :, ys0[i], xs0[j]] + lx[j] * x[:, :, ys0[i], xs1[j]])
                               + ly[i] * ((1 - lx[j]) * x[:, :, ys1[i], xs0[j]] + lx[j] * x[:, :, ys1[i], xs1[j]]))
    return out


def np_nearest_labels(labels: np.ndarray, size) -> np.ndarray:
    H, W = labels.shape[1:]
    out = np.zeros((labels.shape[0],) + tuple(size), dtype=labels.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, i, j] = labels[:, int(math.floor(i * H / size[0])), int(math.floor(j * W / size[1]))]
    return out


def np_pixel_kl_map(zs: np.ndarray, zt: np.ndarray, T: float) -> np.ndarray:
    B, _, h, w = zs.shape
    out = np.zeros((B, h, w))
    for b in range(B):
        for y in range(h):
            for x in range(w):
                out[b, y, x] = np_kl(zs[b, :, y, x], zt[b, :, y, x], T)
    return out


def np_ce_map(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-pixel CE at equal sizes; NaN at ignored pixels."""
    B, _, h, w = logits.shape
    out = np.full((B, h, w), np.nan)
    for b in range(B):
        for y in range(h):
            for x in range(w):
                if labels[b, y, x] != IGNORE:
                    out[b, y, x] = -np_log_softmax(logits[b, :, y, x])[labels[b, y, x]]
    return out


def np_image_mean(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(values.shape[0])
    for b in range(values.shape[0]):
        picked = [values[b, y, x] for y in range(values.shape[1]) for x in range(values.shape[2]) if valid[b, y, x]]
        out[b] = np.mean(picked) if picked else 0.0
    return out


def np_cell_bounds(n: int, G: int):
    return [((g * n) // G, ((g + 1) * n) // G) for g in range(G)]


def np_cells(values: np.ndarray, valid: np.ndarray, G: int, reduce=np.mean):
    """values [B, h, w] -> (value, count) [B, G, G] by looping over the cells and their pixels."""
    B, h, w = values.shape
    value, count = np.zeros((B, G, G)), np.zeros((B, G, G), dtype=int)
    for b in range(B):
        for gy, (r0, r1) in enumerate(np_cell_bounds(h, G)):
            for gx, (c0, c1) in enumerate(np_cell_bounds(w, G)):
                picked = [values[b, y, x] for y in range(r0, r1) for x in range(c0, c1) if valid[b, y, x]]
                count[b, gy, gx] = len(picked)
                value[b, gy, gx] = reduce(np.array(picked)) if picked else 0.0
    return value, count


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def random_labels(rng, shape, K: int, ignore_fraction: float = 0.25) -> np.ndarray:
    labels = rng.integers(0, K, size=shape)
    labels[rng.random(shape) < ignore_fraction] = IGNORE
    return labels


# ----------------------------------------------------------------------------- labels and masks
def test_downsample_labels_is_nearest_and_valid_mask():
    rng = np.random.default_rng(0)
    labels = random_labels(rng, (2, 12, 17), 4)
    for size in ((3, 4), (6, 5), (12, 17), (5, 9)):
        expected = np_nearest_labels(labels, size)
        out = downsample_labels(torch.as_tensor(labels), size)
        assert out.dtype == torch.int64
        np.testing.assert_array_equal(out.numpy(), expected)
        # the rule of F.interpolate(mode="nearest")
        ref = F.interpolate(torch.as_tensor(labels, dtype=torch.float64)[:, None], size=size, mode="nearest")
        np.testing.assert_array_equal(out.numpy(), ref[:, 0].long().numpy())
        np.testing.assert_array_equal(valid_mask(torch.as_tensor(labels), size).numpy(), expected != IGNORE)
    with pytest.raises(ValueError):
        valid_mask(torch.zeros(2, 4, 4), (2, 2))  # float labels


# ----------------------------------------------------------------------------- pixel KD
def test_pixel_kd_kl_literal():
    # pixel 0: teacher [ln3, 0] -> [3/4, 1/4], student uniform: KL_3_1; pixel 1: equal -> 0
    student = torch.zeros(1, 2, 1, 2)
    teacher = torch.tensor([[[[LN3, 0.0]], [[0.0, 0.0]]]])
    assert pixel_kd_kl(student, teacher, 1.0).item() == pytest.approx(KL_3_1 / 2, abs=1e-7)
    only_first = torch.tensor([[[True, False]]])
    assert pixel_kd_kl(student, teacher, 1.0, only_first).item() == pytest.approx(KL_3_1, abs=1e-7)
    # T = 2 with the teacher logits doubled softens to [3/4, 1/4] again: 4 * KL_3_1
    assert pixel_kd_kl(student, 2 * teacher, 2.0, only_first).item() == pytest.approx(4 * KL_3_1, abs=1e-6)
    # no valid pixel -> 0, not NaN
    assert pixel_kd_kl(student, teacher, 1.0, torch.zeros(1, 1, 2, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_pixel_kd_kl_against_pixel_loop(T):
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=(3, 5, 4, 6)) * 2, rng.normal(size=(3, 5, 4, 6)) * 2
    valid = rng.random((3, 4, 6)) < 0.7
    valid[2] = False  # an image with nothing valid
    expected = np_image_mean(np_pixel_kl_map(zs, zt, T), valid)
    out = pixel_kd_kl(t64(zs), t64(zt), T, torch.as_tensor(valid))
    assert out.shape == (3,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert out[2].item() == 0.0
    all_valid = np.ones((3, 4, 6), dtype=bool)
    np.testing.assert_allclose(pixel_kd_kl(t64(zs), t64(zt), T).numpy(),
                               np_image_mean(np_pixel_kl_map(zs, zt, T), all_valid), rtol=1e-10)
    # float32 agrees too
    out32 = pixel_kd_kl(t64(zs).float(), t64(zt).float(), T, torch.as_tensor(valid))
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_pixel_kd_kl_temperature_square_scaling():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 5, generator=g,
                                                                                 dtype=torch.float64)
    valid = torch.rand(2, 3, 5, generator=g) < 0.8
    for T in (0.5, 2.0, 4.0):
        torch.testing.assert_close(pixel_kd_kl(T * zs, T * zt, T, valid), T * T * pixel_kd_kl(zs, zt, 1.0, valid),
                                   rtol=1e-10, atol=1e-12)
        cells_T, cells_1 = pixel_kd_kl_cells(T * zs, T * zt, T, 2, valid), pixel_kd_kl_cells(zs, zt, 1.0, 2, valid)
        torch.testing.assert_close(cells_T.value, T * T * cells_1.value, rtol=1e-10, atol=1e-12)


def test_pixel_kd_kl_ignored_pixels_change_nothing():
    rng = np.random.default_rng(3)
    K, h, w = 4, 4, 4
    labels = random_labels(rng, (2, 8, 8), K, 0.4)
    valid = valid_mask(torch.as_tensor(labels), (h, w))
    assert (~valid).any() and valid.any()
    zs, zt = rng.normal(size=(2, K, h, w)), rng.normal(size=(2, K, h, w))
    base = pixel_kd_kl(t64(zs), t64(zt), 4.0, valid)
    base_cells = pixel_kd_kl_cells(t64(zs), t64(zt), 4.0, 2, valid)
    inv = ~valid.numpy()
    zs2, zt2 = zs.copy(), zt.copy()
    zs2.transpose(0, 2, 3, 1)[inv] = rng.normal(size=(inv.sum(), K)) * 50
    zt2.transpose(0, 2, 3, 1)[inv] = rng.normal(size=(inv.sum(), K)) * 50
    torch.testing.assert_close(pixel_kd_kl(t64(zs2), t64(zt2), 4.0, valid), base, rtol=0, atol=0)
    torch.testing.assert_close(pixel_kd_kl_cells(t64(zs2), t64(zt2), 4.0, 2, valid).value, base_cells.value,
                               rtol=0, atol=0)
    # even inf at an ignored pixel does not reach the loss
    zs3 = zs.copy()
    zs3.transpose(0, 2, 3, 1)[inv] = np.inf
    assert torch.isfinite(pixel_kd_kl(t64(zs3), t64(zt), 4.0, valid)).all()
    # and ignored pixels get exactly zero gradient
    student = t64(zs).requires_grad_(True)
    pixel_kd_kl(student, t64(zt), 4.0, valid).sum().backward()
    grad = student.grad.permute(0, 2, 3, 1)
    assert torch.all(grad[~valid] == 0)
    assert torch.all(grad[valid].abs().sum(-1) > 0)


def test_pixel_kd_kl_teacher_at_another_stride_is_resized_bilinear():
    # literal: a 1x2 teacher upsampled to 1x4 has logits [0, .25, .75, 1] * z along the row
    rng = np.random.default_rng(4)
    zs = rng.normal(size=(2, 3, 6, 8))
    for t_size in ((3, 4), (12, 16), (5, 3)):  # coarser, finer, mixed
        zt = rng.normal(size=(2, 3) + t_size) * 2
        zt_resized = np_bilinear(zt, (6, 8))
        valid = rng.random((2, 6, 8)) < 0.8
        expected = np_image_mean(np_pixel_kl_map(zs, zt_resized, 2.0), valid)
        np.testing.assert_allclose(pixel_kd_kl(t64(zs), t64(zt), 2.0, torch.as_tensor(valid)).numpy(), expected,
                                   rtol=1e-10, atol=1e-12)
    teacher = torch.tensor([[[[0.0, 4.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(resize_logits(teacher, (1, 4))[0, 0, 0], t64([0.0, 1.0, 3.0, 4.0]))
    with pytest.raises(ValueError):
        pixel_kd_kl(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4), 1.0)  # class counts differ
    with pytest.raises(ValueError):
        pixel_kd_kl(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), 1.0, torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        pixel_kd_kl(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), 0.0)


# ----------------------------------------------------------------------------- cells
def test_cells_against_loop_and_sum_back():
    rng = np.random.default_rng(5)
    zs, zt = rng.normal(size=(2, 4, 7, 9)), rng.normal(size=(2, 4, 7, 9))
    valid = rng.random((2, 7, 9)) < 0.7
    kl_map = np_pixel_kl_map(zs, zt, 3.0)
    cells = pixel_kd_kl_cells(t64(zs), t64(zt), 3.0, 3, torch.as_tensor(valid))
    assert isinstance(cells, CellValues) and cells.value.shape == (2, 3, 3)
    value, count = np_cells(kl_map, valid, 3)
    np.testing.assert_allclose(cells.value.numpy(), value, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(cells.count.numpy(), count)
    np.testing.assert_array_equal(cells.valid.numpy(), count > 0)
    # unequal cells, partial validity: the count-weighted mean of the cells is the image value
    image = pixel_kd_kl(t64(zs), t64(zt), 3.0, torch.as_tensor(valid))
    weighted = (cells.value * cells.count).flatten(1).sum(1) / cells.count.flatten(1).sum(1)
    torch.testing.assert_close(weighted, image, rtol=1e-10, atol=1e-12)
    # equal-sized, fully valid cells: the plain mean of the cells is the image value
    zs8, zt8 = rng.normal(size=(2, 4, 8, 8)), rng.normal(size=(2, 4, 8, 8))
    cells8 = pixel_kd_kl_cells(t64(zs8), t64(zt8), 3.0, 4)
    assert torch.all(cells8.count == 4)
    torch.testing.assert_close(cells8.value.flatten(1).mean(1), pixel_kd_kl(t64(zs8), t64(zt8), 3.0),
                               rtol=1e-10, atol=1e-12)


def test_cells_empty_and_ignored_are_zero_and_invalid():
    values = t64(np.arange(2 * 2 * 3).reshape(2, 2, 3))
    cells = cell_mean(values, 3)  # 2 rows for 3 cell rows: cell row 0 is empty
    assert not cells.valid[:, 0].any() and torch.all(cells.value[:, 0] == 0) and torch.all(cells.count[:, 0] == 0)
    torch.testing.assert_close(cells.value[0, 1], t64([0.0, 1.0, 2.0]))
    torch.testing.assert_close(cells.value[1, 2], t64([9.0, 10.0, 11.0]))
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[1, :, 0] = False
    masked = cell_mean(values, 3, valid)
    assert not masked.valid[1, :, 0].any() and torch.all(masked.value[1, :, 0] == 0)
    # row-major flattening: cell gy*G + gx
    assert masked.value.flatten(1)[0, 1 * 3 + 2].item() == 2.0
    # gradient flows through the cells, and not into excluded pixels
    leaf = values.clone().requires_grad_(True)
    cell_mean(leaf, 3, valid).value.sum().backward()
    assert torch.all(leaf.grad[1, :, 0] == 0) and torch.all(leaf.grad[valid] > 0)
    with pytest.raises(ValueError):
        cell_mean(values, 0)


# ----------------------------------------------------------------------------- CWD
def np_cwd(zs: np.ndarray, zt: np.ndarray, T: float) -> np.ndarray:
    B, C = zs.shape[:2]
    out = np.zeros(B)
    for b in range(B):
        per_channel = []
        for c in range(C):
            lt, ls = np_log_softmax(zt[b, c].ravel() / T), np_log_softmax(zs[b, c].ravel() / T)
            per_channel.append(T * T * float((np.exp(lt) * (lt - ls)).sum()))
        out[b] = np.mean(per_channel)
    return out


def test_cwd_literal_and_against_channel_loop():
    # one channel over two positions: teacher [ln3, 0] -> [3/4, 1/4] over space, student uniform;
    # second channel equal -> 0. Mean over channels: KL_3_1 / 2.
    student = torch.zeros(1, 2, 1, 2)
    teacher = torch.tensor([[[[LN3, 0.0]], [[1.0, 2.0]]]])
    student[0, 1] = teacher[0, 1] + 5.0  # a constant shift per channel changes nothing
    assert cwd_loss(student, teacher, 1.0).item() == pytest.approx(KL_3_1 / 2, abs=1e-6)
    rng = np.random.default_rng(6)
    zs, zt = rng.normal(size=(3, 4, 5, 6)) * 2, rng.normal(size=(3, 4, 5, 6)) * 2
    for T in (1.0, 4.0):
        out = cwd_loss(t64(zs), t64(zt), T)
        assert out.shape == (3,)
        np.testing.assert_allclose(out.numpy(), np_cwd(zs, zt, T), rtol=1e-10, atol=1e-12)
        # CIRKD / mmrazor: T^2 * sum over everything / (B * C) == batch mean of ours
        lt = np.stack([np.stack([np_log_softmax(zt[b, c].ravel() / T) for c in range(4)]) for b in range(3)])
        ls = np.stack([np.stack([np_log_softmax(zs[b, c].ravel() / T) for c in range(4)]) for b in range(3)])
        cirkd = T * T * (np.exp(lt) * (lt - ls)).sum() / (3 * 4)
        assert out.mean().item() == pytest.approx(cirkd, rel=1e-10)
    for T in (0.5, 3.0):
        torch.testing.assert_close(cwd_loss(T * t64(zs), T * t64(zt), T), T * T * cwd_loss(t64(zs), t64(zt), 1.0),
                                   rtol=1e-10, atol=1e-12)
    # a teacher at another stride is resized to the student's size
    zt_coarse = rng.normal(size=(3, 4, 3, 3))
    np.testing.assert_allclose(cwd_loss(t64(zs), t64(zt_coarse), 2.0).numpy(),
                               np_cwd(zs, np_bilinear(zt_coarse, (5, 6)), 2.0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        cwd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4), 1.0)


def test_cwd_per_cell_against_a_loop_over_cell_slices():
    """Per cell: numpy CWD of the cell's slice (rows floor(g*h/G)..), the cell's position count; one cell
    is the whole-map CWD; a grid finer than the map is refused."""
    rng = np.random.default_rng(8)
    zs, zt = rng.normal(size=(2, 3, 5, 7)) * 2, rng.normal(size=(2, 3, 5, 7)) * 2
    cells = cwd_cells(t64(zs), t64(zt), 2.0, 2)
    assert cells.value.shape == (2, 2, 2)
    for gy in range(2):
        for gx in range(2):
            rows, cols = slice(gy * 5 // 2, (gy + 1) * 5 // 2), slice(gx * 7 // 2, (gx + 1) * 7 // 2)
            want = np_cwd(zs[:, :, rows, cols], zt[:, :, rows, cols], 2.0)
            np.testing.assert_allclose(cells.value[:, gy, gx].numpy(), want, rtol=1e-10, atol=1e-12)
            assert cells.count[0, gy, gx] == (rows.stop - rows.start) * (cols.stop - cols.start)
    np.testing.assert_allclose(cwd_cells(t64(zs), t64(zt), 2.0, 1).value[:, 0, 0].numpy(), np_cwd(zs, zt, 2.0),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="region_grid"):
        cwd_cells(t64(zs), t64(zt), 1.0, 6)


# ----------------------------------------------------------------------------- feature MSE
def test_dense_feature_mse_against_loop_and_cells():
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(2, 3, 4, 6)), rng.normal(size=(2, 3, 4, 6))
    expected = np.zeros(2)
    for b in range(2):
        expected[b] = sum((s[b, c, y, x] - t[b, c, y, x]) ** 2
                          for c in range(3) for y in range(4) for x in range(6)) / (3 * 4 * 6)
    out = dense_feature_mse(t64(s), t64(t))
    assert out.shape == (2,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    sq = ((s - t) ** 2).mean(axis=1)
    cells = dense_feature_mse_cells(t64(s), t64(t), 2)
    value, count = np_cells(sq, np.ones((2, 4, 6), dtype=bool), 2)
    np.testing.assert_allclose(cells.value.numpy(), value, rtol=1e-12)
    assert torch.all(cells.count == 6)
    torch.testing.assert_close(cells.value.flatten(1).mean(1), out, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="does not match"):
        dense_feature_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError):
        dense_feature_mse_cells(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4), 2)


# ----------------------------------------------------------------------------- pixel CE
def test_pixel_ce_literal():
    # two pixels, logits [ln3, 0] -> p = [3/4, 1/4]: label 0 -> ln(4/3), label 1 -> ln 4; third ignored
    logits = torch.tensor([[[[LN3, LN3, -50.0]], [[0.0, 0.0, 50.0]]]])
    labels = torch.tensor([[[0, 1, IGNORE]]])
    expected = (math.log(4 / 3) + math.log(4)) / 2
    assert pixel_ce(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert pixel_ce(logits, torch.full((1, 1, 3), IGNORE)).item() == 0.0


def test_pixel_ce_upsampled_against_loop_and_cells():
    rng = np.random.default_rng(8)
    K = 5
    logits = rng.normal(size=(2, K, 3, 4)) * 2
    labels = random_labels(rng, (2, 12, 16), K, 0.3)
    ce_map = np_ce_map(np_bilinear(logits, (12, 16)), labels)
    valid = labels != IGNORE
    expected = np_image_mean(np.nan_to_num(ce_map), valid)
    out = pixel_ce(t64(logits), torch.as_tensor(labels))
    assert out.shape == (2,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    # per image, the same as torch's own mean over non-ignored pixels
    up = F.interpolate(t64(logits), size=(12, 16), mode="bilinear", align_corners=False)
    for b in range(2):
        ref = F.cross_entropy(up[b : b + 1], torch.as_tensor(labels[b : b + 1]), ignore_index=IGNORE)
        assert out[b].item() == pytest.approx(ref.item(), rel=1e-10)
    cells = pixel_ce_cells(t64(logits), torch.as_tensor(labels), 4)
    value, count = np_cells(np.nan_to_num(ce_map), valid, 4)
    np.testing.assert_allclose(cells.value.numpy(), value, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(cells.count.numpy(), count)
    weighted = (cells.value * cells.count).flatten(1).sum(1) / cells.count.flatten(1).sum(1)
    torch.testing.assert_close(weighted, out, rtol=1e-10, atol=1e-12)
    # fully valid labels, equal cells: plain mean of cells == image value
    full = rng.integers(0, K, size=(2, 12, 16))
    cells_full = pixel_ce_cells(t64(logits), torch.as_tensor(full), 4)
    torch.testing.assert_close(cells_full.value.flatten(1).mean(1), pixel_ce(t64(logits), torch.as_tensor(full)),
                               rtol=1e-10, atol=1e-12)


def test_pixel_ce_ignored_pixels_change_nothing():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(2, 3, 4, 4))
    labels = random_labels(rng, (2, 4, 4), 3, 0.4)
    base = pixel_ce(t64(logits), torch.as_tensor(labels))
    changed = logits.copy()
    inv = labels == IGNORE
    changed.transpose(0, 2, 3, 1)[inv] = rng.normal(size=(inv.sum(), 3)) * 100
    torch.testing.assert_close(pixel_ce(t64(changed), torch.as_tensor(labels)), base, rtol=0, atol=0)
    with pytest.raises(ValueError):
        pixel_ce(t64(logits), torch.as_tensor(labels[:1]))  # batch mismatch


# ----------------------------------------------------------------------------- agent state
def test_dense_agent_state_against_loops():
    rng = np.random.default_rng(10)
    B, K, h, w, G, T, q = 2, 4, 4, 6, 2, 3.0, 0.9
    labels = random_labels(rng, (B, 8, 12), K, 0.3)
    labels[1, :4, :6] = IGNORE  # student-grid cell (0, 0) of image 1 fully ignored
    zs = rng.normal(size=(B, K, h, w)) * 2
    teacher_logits = [rng.normal(size=(B, K, h, w)) * 2, rng.normal(size=(B, K, 2, 3)) * 2]  # strides 1x and 2x
    proj = [rng.normal(size=(B, 3, 4, 6)), rng.normal(size=(B, 5, 2, 2))]
    feats = [rng.normal(size=(B, 3, 4, 6)), rng.normal(size=(B, 5, 4, 4))]
    state = dense_agent_state([t64(p) for p in proj], [t64(f) for f in feats], t64(zs),
                              [t64(z) for z in teacher_logits], torch.as_tensor(labels), T, grid=G, tail_quantile=q)
    small = np_nearest_labels(labels, (h, w))
    valid = small != IGNORE
    assert state.teacher_ce_mean.shape == (B, 2) and state.cells.teacher_ce_mean.shape == (B, G * G, 2)
    for m, zt in enumerate(teacher_logits):
        zt = np_bilinear(zt, (h, w))
        ce = np_ce_map(zt, small)
        kl = np_pixel_kl_map(zs, zt, T)
        for b in range(B):
            picked = ce[b][valid[b]]
            assert state.teacher_ce_mean[b, m].item() == pytest.approx(picked.mean(), rel=1e-10)
            assert state.teacher_ce_tail[b, m].item() == pytest.approx(np.quantile(picked, q), rel=1e-10)
            assert state.feature_gap[b, m].item() == pytest.approx(
                np_cos(proj[m][b].mean(axis=(1, 2)), feats[m][b].mean(axis=(1, 2))), rel=1e-10)
        np.testing.assert_allclose(state.logit_gap[:, m].numpy(), np_image_mean(kl, valid), rtol=1e-10)
        # per cell
        ce_cells, count = np_cells(np.nan_to_num(ce), valid, G)
        tail_cells, _ = np_cells(np.nan_to_num(ce), valid, G, reduce=lambda v: np.quantile(v, q))
        kl_cells, _ = np_cells(kl, valid, G)
        np.testing.assert_allclose(state.cells.teacher_ce_mean[:, :, m].numpy(), ce_cells.reshape(B, -1), rtol=1e-10)
        np.testing.assert_allclose(state.cells.teacher_ce_tail[:, :, m].numpy(), tail_cells.reshape(B, -1),
                                   rtol=1e-10)
        np.testing.assert_allclose(state.cells.logit_gap[:, :, m].numpy(), kl_cells.reshape(B, -1), rtol=1e-10)
        np.testing.assert_array_equal(state.cells.count.numpy(), count.reshape(B, -1))
        for b in range(B):
            for gy, (r0, r1) in enumerate(np_cell_bounds(proj[m].shape[2], G)):
                for gx, (c0, c1) in enumerate(np_cell_bounds(proj[m].shape[3], G)):
                    s_cell = proj[m][b, :, r0:r1, c0:c1].mean(axis=(1, 2))
                    t0, t1 = np_cell_bounds(feats[m].shape[2], G)[gy]
                    u0, u1 = np_cell_bounds(feats[m].shape[3], G)[gx]
                    t_cell = feats[m][b, :, t0:t1, u0:u1].mean(axis=(1, 2))
                    assert state.cells.feature_gap[b, gy * G + gx, m].item() == pytest.approx(
                        np_cos(s_cell, t_cell), rel=1e-9)
    assert not state.cells.valid[1, 0] and state.cells.valid[0].all()
    assert torch.all(state.cells.teacher_ce_mean[1, 0] == 0) and torch.all(state.cells.logit_gap[1, 0] == 0)
    assert state.vector.shape == (B, 8) and state.cells.vector.shape == (B, G * G, 8)
    torch.testing.assert_close(state.vector[:, 4:8], torch.stack(
        [state.feature_gap[:, 1], state.logit_gap[:, 1], state.teacher_ce_mean[:, 1], state.teacher_ce_tail[:, 1]], 1))
    # without a grid: same image-level state, no cells
    plain = dense_agent_state([t64(p) for p in proj], [t64(f) for f in feats], t64(zs),
                              [t64(z) for z in teacher_logits], torch.as_tensor(labels), T, tail_quantile=q)
    assert plain.cells is None
    torch.testing.assert_close(plain.logit_gap, state.logit_gap, rtol=0, atol=0)


def test_dense_agent_state_is_detached_and_checks_inputs():
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    proj = torch.randn(2, 5, 4, 4, generator=g, requires_grad=True)
    feat, zt = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    state = dense_agent_state([proj * 1.0], [feat], zs * 1.0, [zt], labels, 4.0, grid=2)
    for tensor in (state.teacher_ce_mean, state.teacher_ce_tail, state.logit_gap, state.feature_gap,
                   state.cells.teacher_ce_tail, state.cells.feature_gap):
        assert not tensor.requires_grad
    with pytest.raises(ValueError):
        dense_agent_state([proj, proj], [feat], zs, [zt], labels, 4.0)
    with pytest.raises(ValueError):
        dense_agent_state([proj], [feat[:, :3]], zs, [zt], labels, 4.0)
    with pytest.raises(ValueError):
        dense_agent_state([proj], [feat], zs, [zt], labels, 4.0, tail_quantile=1.5)


# ----------------------------------------------------------------------------- mIoU
# Hand-made case, K = 3 (classes 3 and 4 added below never appear):
#   image 1 gt [[0, 0, 1], [1, 255, 2]]  pred [[0, 1, 1], [1, 0, 2]]  -> 0>0, 0>1, 1>1, 1>1, 2>2
#   image 2 gt [[0, 0, 0], [2, 2, 255]]  pred [[0, 0, 2], [2, 1, 1]]  -> 0>0, 0>0, 0>2, 2>2, 2>1
#   confusion (rows gt): [[3, 1, 1], [0, 2, 0], [0, 1, 2]]; 10 pixels, 7 right -> pixel acc 0.7
#   IoU0 = 3 / (5 + 3 - 3) = 0.6, IoU1 = 2 / (2 + 4 - 2) = 0.5, IoU2 = 2 / (3 + 3 - 2) = 0.5 -> mIoU 1.6 / 3
#   class acc = [3/5, 2/2, 2/3] -> mAcc 0.755555...
GT = torch.tensor([[[0, 0, 1], [1, IGNORE, 2]], [[0, 0, 0], [2, 2, IGNORE]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]], [[0, 0, 2], [2, 1, 1]]])
MIOU = 1.6 / 3


def test_meter_hand_made_case():
    meter = SegmentationMeter(3)
    meter.update(PRED[:1], GT[:1])
    meter.update(PRED[1:], GT[1:])
    torch.testing.assert_close(meter.confusion, torch.tensor([[3, 1, 1], [0, 2, 0], [0, 1, 2]]))
    out = meter.compute()
    assert out["miou"] == pytest.approx(MIOU, abs=1e-12)
    assert out["pixel_acc"] == pytest.approx(0.7, abs=1e-12)
    assert out["macc"] == pytest.approx((0.6 + 1.0 + 2 / 3) / 3, abs=1e-12)
    np.testing.assert_allclose(out["iou"], [0.6, 0.5, 0.5])
    assert out["pixels"] == 10
    # one batch of two == two batches of one
    both = SegmentationMeter(3)
    both.update(PRED, GT)
    torch.testing.assert_close(both.confusion, meter.confusion)
    meter.reset()
    assert math.isnan(meter.compute()["miou"])


def test_meter_ignore_and_absent_classes_excluded():
    meter = SegmentationMeter(5)
    changed = PRED.clone()
    changed[GT == IGNORE] = 4  # predictions at ignored pixels count for nothing
    meter.update(changed, GT)
    out = meter.compute()
    assert out["miou"] == pytest.approx(MIOU, abs=1e-12)  # classes 3 and 4: in neither -> left out
    assert math.isnan(out["iou"][3]) and math.isnan(out["iou"][4])
    assert out["pixels"] == 10
    # a class predicted but absent from the ground truth has IoU 0 and counts
    wrong = PRED.clone()
    wrong[0, 0, 0] = 4  # was a correct 0
    meter = SegmentationMeter(5)
    meter.update(wrong, GT)
    out = meter.compute()
    # IoU0 = 2 / (5 + 2 - 2) = 0.4, IoU4 = 0 / 1 = 0 -> (0.4 + 0.5 + 0.5 + 0) / 4
    assert out["iou"][4] == 0.0 and out["iou"][0] == pytest.approx(0.4)
    assert out["miou"] == pytest.approx(1.4 / 4, abs=1e-12)


def test_meter_from_logits_upsampled():
    # one-hot logits at half resolution: the bilinear upsample keeps each 2x2 block's class
    rng = np.random.default_rng(12)
    coarse = torch.as_tensor(rng.integers(0, 4, size=(2, 3, 4)))
    logits = F.one_hot(coarse, 4).permute(0, 3, 1, 2).double() * 5
    fine_pred = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    labels = torch.as_tensor(random_labels(rng, (2, 6, 8), 4, 0.2))
    from_logits, from_labels = SegmentationMeter(4), SegmentationMeter(4)
    from_logits.update(logits, labels)
    from_labels.update(fine_pred, labels)
    torch.testing.assert_close(from_logits.confusion, from_labels.confusion)
    with pytest.raises(ValueError):
        from_logits.update(torch.zeros(2, 3, 6, 8), labels)  # wrong class count
    with pytest.raises(ValueError):
        from_logits.update(fine_pred, torch.full((2, 6, 8), 7))  # label out of range, not ignore


def np_miou(preds: np.ndarray, labels: np.ndarray, K: int):
    conf = np.zeros((K, K))
    for g, p in zip(labels.ravel(), preds.ravel()):
        if g != IGNORE:
            conf[g, p] += 1
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return np.nanmean(iou), tp.sum() / conf.sum()


def test_meter_random_against_numpy_and_torchmetrics():
    rng = np.random.default_rng(13)
    K = 6
    batches = []
    for _ in range(3):
        labels = random_labels(rng, (2, 5, 7), 4, 0.2)  # classes 4, 5 never in the ground truth
        preds = rng.integers(0, 5, size=(2, 5, 7))      # class 5 never predicted either
        batches.append((torch.as_tensor(preds), torch.as_tensor(labels)))
    meter = SegmentationMeter(K)
    for preds, labels in batches:
        meter.update(preds, labels)
    out = meter.compute()
    all_preds = np.concatenate([p.numpy() for p, _ in batches])
    all_labels = np.concatenate([lab.numpy() for _, lab in batches])
    miou, acc = np_miou(all_preds, all_labels, K)
    assert out["miou"] == pytest.approx(miou, abs=1e-12)
    assert out["pixel_acc"] == pytest.approx(acc, abs=1e-12)
    assert math.isnan(out["iou"][5]) and out["iou"][4] == 0.0
    tm = pytest.importorskip("torchmetrics.classification")
    jaccard = tm.MulticlassJaccardIndex(num_classes=K, average="macro", ignore_index=IGNORE)
    per_class = tm.MulticlassJaccardIndex(num_classes=K, average="none", ignore_index=IGNORE)
    accuracy = tm.MulticlassAccuracy(num_classes=K, average="micro", ignore_index=IGNORE)
    for preds, labels in batches:
        for metric in (jaccard, per_class, accuracy):
            metric.update(preds, labels)
    assert out["miou"] == pytest.approx(jaccard.compute().item(), abs=1e-6)
    assert out["pixel_acc"] == pytest.approx(accuracy.compute().item(), abs=1e-6)
    present = [k for k in range(K) if not math.isnan(out["iou"][k])]
    np.testing.assert_allclose(np.array(out["iou"])[present], per_class.compute().numpy()[present], atol=1e-6)
    # the hand-made case too
    jaccard.reset()
    assert jaccard(PRED, GT).item() == pytest.approx(MIOU, abs=1e-6)


def test_meter_reduce_without_and_with_distributed(tmp_path):
    import torch.distributed as dist

    meter = SegmentationMeter(3)
    meter.update(PRED, GT)
    before = meter.confusion.clone()
    assert meter.reduce() is meter  # not initialised: nothing happens
    torch.testing.assert_close(meter.confusion, before)
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already in use")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        meter.reduce()
        torch.testing.assert_close(meter.confusion, before)  # one process: the sum is itself
        empty = SegmentationMeter(3).reduce()                  # a rank with no batch joins with zeros
        assert empty.confusion is not None and int(empty.confusion.sum()) == 0
    finally:
        dist.destroy_process_group()
