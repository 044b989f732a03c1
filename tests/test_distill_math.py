"""Independent checks of the MTKD-RL mathematics (docs/method.md §2 and §4, interface of section 7).

Every expected value here comes from the text of docs/method.md alone: literal numbers computed by hand,
float64 numpy re-implementations written from the formulas, finite differences and invariants.
No expected value is obtained by calling an ``mtkd`` function.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkd.distill import (
    AgentState,
    FeatureProjector,
    PolicyNet,
    agent_state,
    build_projectors,
    feature_mse,
    heuristic_terms,
    kd_kl,
    normalized_reward,
    reference_agent_loss,
    resize_feature_map,
)


# ----------------------------------------------------------------------------- numpy references
def np_log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(np_log_softmax(z, axis))


def np_kd_kl(student: np.ndarray, teacher: np.ndarray, T: float) -> np.ndarray:
    """docs/method.md §2: T^2 * sum_c p_t (log p_t - log p_s), p = softmax(z / T); one value per sample."""
    log_pt, log_ps = np_log_softmax(teacher / T), np_log_softmax(student / T)
    return T * T * (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)


def np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -np_log_softmax(logits)[np.arange(len(targets)), targets]


def np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def np_adaptive_avg_pool(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Adaptive average pooling: output cell i averages input rows floor(i*H/h) .. ceil((i+1)*H/h)-1."""
    B, K, H, W = x.shape
    h, w = size
    out = np.zeros((B, K, h, w))
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel (align_corners=False) source coordinates along one axis."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def np_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    y0, y1, ly = _bilinear_axis(x.shape[2], size[0])
    x0, x1, lx = _bilinear_axis(x.shape[3], size[1])
    top = x[:, :, y0][:, :, :, x0] * (1 - lx) + x[:, :, y0][:, :, :, x1] * lx
    bottom = x[:, :, y1][:, :, :, x0] * (1 - lx) + x[:, :, y1][:, :, :, x1] * lx
    return top * (1 - ly)[:, None] + bottom * ly[:, None]


def np_inverted_softmax(scores: np.ndarray) -> np.ndarray:
    M = scores.shape[1]
    return (1.0 - np_softmax(scores, axis=1)) / (M - 1)


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def t32(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


# ----------------------------------------------------------------------------- kd_kl
def test_kd_kl_two_class_literal():
    # teacher softmax = [3/4, 1/4], student softmax = [1/2, 1/2] at T = 1:
    # KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120...
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert abs(expected - 0.13081203) < 1e-7
    assert kd_kl(student, teacher, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_kd_kl_three_class_literal():
    # teacher [ln2, 0, 0] -> [1/2, 1/4, 1/4]; student [0, ln2, 0] -> [1/4, 1/2, 1/4]
    # KL = 1/2 ln 2 + 1/4 ln 1/2 + 1/4 ln 1 = 1/4 ln 2 = 0.1732868
    # second row: student uniform: KL = 1/2 ln 1.5 + 1/2 ln 0.75 = 0.0588915
    ln2 = math.log(2.0)
    student = torch.tensor([[0.0, ln2, 0.0], [5.0, 5.0, 5.0]])
    teacher = torch.tensor([[ln2, 0.0, 0.0], [ln2, 0.0, 0.0]])
    out = kd_kl(student, teacher, 1.0)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(0.25 * ln2, abs=1e-6)
    assert out[1].item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75), abs=1e-6)
    assert out[1].item() == pytest.approx(0.0588915, abs=1e-6)


def test_kd_kl_temperature_square_factor_literal():
    # At T = 2 the teacher [2 ln3, 0] softens to [3/4, 1/4] again: kd_kl = 4 * 0.1308120 = 0.5232481
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2.0 * math.log(3.0), 0.0]])
    assert kd_kl(student, teacher, 2.0).item() == pytest.approx(4 * 0.13081203, abs=1e-5)
    # general scaling law: KL_T(T z_t || T z_s) = T^2 KL_1(z_t || z_s)
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    for T in (0.5, 3.0, 4.0):
        torch.testing.assert_close(kd_kl(T * zs, T * zt, T), T * T * kd_kl(zs, zt, 1.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_kl_against_numpy(T):
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=(6, 10)) * 3, rng.normal(size=(6, 10)) * 3
    np.testing.assert_allclose(kd_kl(t64(zs), t64(zt), T).numpy(), np_kd_kl(zs, zt, T), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kd_kl(t32(zs), t32(zt), T).numpy(), np_kd_kl(zs, zt, T), rtol=1e-4, atol=1e-5)


def test_kd_kl_zero_when_equal_and_shift_invariant():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4, 5))
    assert np.abs(kd_kl(t64(z), t64(z), 4.0).numpy()).max() < 1e-12
    # adding a (per-sample) constant to either side's logits changes nothing
    zs, zt = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    shift_s, shift_t = rng.normal(size=(4, 1)) * 10, rng.normal(size=(4, 1)) * 10
    base = kd_kl(t64(zs), t64(zt), 4.0)
    torch.testing.assert_close(kd_kl(t64(zs + shift_s), t64(zt + shift_t), 4.0), base, rtol=1e-9, atol=1e-12)
    assert (base > 0).all()


def test_kd_kl_is_per_sample_not_batchmean():
    rng = np.random.default_rng(3)
    zs, zt = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    per_sample = np_kd_kl(zs, zt, 4.0)
    student = t64(zs).requires_grad_(True)
    out = kd_kl(student, t64(zt), 4.0)
    assert out.shape == (3,)
    # each entry is that sample's own KL, independent of the others in the batch
    for i in range(3):
        assert kd_kl(t64(zs[i : i + 1]), t64(zt[i : i + 1]), 4.0).item() == pytest.approx(per_sample[i], rel=1e-10)
    # weighting one sample changes only its contribution
    w_plain, w_heavy = t64([1.0, 1.0, 1.0]), t64([1.0, 3.0, 1.0])
    delta = (w_heavy * out).sum() - (w_plain * out).sum()
    assert delta.item() == pytest.approx(2.0 * per_sample[1], rel=1e-10)
    # a zero weight gives exactly zero gradient to that sample's logits
    (t64([0.0, 1.0, 1.0]) * out).sum().backward()
    assert torch.all(student.grad[0] == 0)
    assert torch.all(student.grad[1:].abs().sum(1) > 0)


def test_kd_kl_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    zs, zt = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    student = t64(zs).requires_grad_(True)
    kd_kl(student, t64(zt), 4.0).sum().backward()
    eps, numeric = 1e-6, np.zeros_like(zs)
    for idx in np.ndindex(*zs.shape):
        up, down = zs.copy(), zs.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (np_kd_kl(up, zt, 4.0).sum() - np_kd_kl(down, zt, 4.0).sum()) / (2 * eps)
    np.testing.assert_allclose(student.grad.numpy(), numeric, rtol=1e-6, atol=1e-8)


def test_kd_kl_shape_mismatch_raises():
    with pytest.raises(ValueError):
        kd_kl(torch.zeros(2, 3), torch.zeros(2, 4), 4.0)
    with pytest.raises(ValueError):
        kd_kl(torch.zeros(2, 3), torch.zeros(3, 3), 4.0)


# ----------------------------------------------------------------------------- feature_mse
def test_feature_mse_literal():
    # sample 0: K=2, H=W=2; differences 1,2,3,4 and 0,0,0,-2 -> (1+4+9+16+4)/8 = 34/8 = 4.25
    # sample 1: all differences 3 -> 9
    student = torch.tensor(
        [[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 5.0], [5.0, 3.0]]], [[[3.0, 3.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]]]
    )
    teacher = torch.tensor(
        [[[[0.0, 0.0], [0.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]]], [[[0.0, 0.0], [0.0, 0.0]], [[-3.0, -3.0], [-3.0, -3.0]]]]
    )
    out = feature_mse(student, teacher)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([4.25, 9.0]))


def test_feature_mse_mean_over_khw_per_sample():
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(3, 4, 5, 6)), rng.normal(size=(3, 4, 5, 6))
    expected = ((s - t) ** 2).reshape(3, -1).sum(1) / (4 * 5 * 6)
    np.testing.assert_allclose(feature_mse(t64(s), t64(t)).numpy(), expected, rtol=1e-12)
    # per sample: changing sample 2 leaves samples 0 and 1 untouched
    s2 = s.copy()
    s2[2] += 10.0
    np.testing.assert_allclose(feature_mse(t64(s2), t64(t)).numpy()[:2], expected[:2], rtol=1e-12)
    with pytest.raises(ValueError):
        feature_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


# ----------------------------------------------------------------------------- projector / resize
def test_resize_exact_2x_downscale_is_block_average():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 8, 6))
    expected = x.reshape(2, 3, 4, 2, 3, 2).mean(axis=(3, 5))  # 2x2 blocks
    np.testing.assert_allclose(resize_feature_map(t64(x), (4, 3)).numpy(), expected, rtol=1e-12, atol=1e-14)


def test_resize_non_integer_downscale_is_adaptive_average():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 2, 8, 7))
    np.testing.assert_allclose(
        resize_feature_map(t64(x), (3, 5)).numpy(), np_adaptive_avg_pool(x, (3, 5)), rtol=1e-12, atol=1e-14
    )


def test_resize_upscale_is_bilinear_literal_and_numpy():
    # [0, 1] -> 4 columns with half-pixel centres: [0, 0.25, 0.75, 1]
    x = torch.tensor([[[[0.0, 1.0]]]])
    torch.testing.assert_close(resize_feature_map(x, (1, 4)), torch.tensor([[[[0.0, 0.25, 0.75, 1.0]]]]))
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 3, 3, 4))
    np.testing.assert_allclose(resize_feature_map(t64(x), (7, 8)).numpy(), np_bilinear(x, (7, 8)), rtol=1e-12,
                               atol=1e-12)
    # smaller in one dimension only: "at least as large" fails, so bilinear
    y = rng.normal(size=(1, 2, 8, 2))
    np.testing.assert_allclose(resize_feature_map(t64(y), (4, 4)).numpy(), np_bilinear(y, (4, 4)), rtol=1e-12,
                               atol=1e-12)


def test_resize_same_size_is_identity():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(resize_feature_map(x, (4, 4)), x)


def _make_identity_projector(channels: int, size: tuple[int, int]) -> FeatureProjector:
    """A projector whose conv is the identity (zero bias) and whose BN is the identity in eval mode
    (up to 1/sqrt(1 + eps)), so its output exposes the resize."""
    proj = FeatureProjector(channels, channels, size).double()
    with torch.no_grad():
        proj.conv.weight.copy_(torch.eye(channels, dtype=torch.float64)[:, :, None, None])
        proj.conv.bias.zero_()
    return proj.eval()


def test_projectors_of_several_teachers_resize_from_original_map():
    rng = np.random.default_rng(9)
    student = np.abs(rng.normal(size=(2, 3, 8, 8)))  # >= 0 so that ReLU is transparent
    sizes = [(4, 4), (3, 3), (16, 16), (2, 2), (8, 8)]
    projectors = [_make_identity_projector(3, s) for s in sizes]
    expected = {
        (4, 4): student.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5)),
        (3, 3): np_adaptive_avg_pool(student, (3, 3)),
        (16, 16): np_bilinear(student, (16, 16)),
        (2, 2): student.reshape(2, 3, 2, 4, 2, 4).mean(axis=(3, 5)),
        (8, 8): student,
    }
    bn_scale = 1.0 / math.sqrt(1.0 + 1e-5)
    for proj, size in zip(projectors, sizes):
        out = proj(t64(student)).detach().numpy()
        np.testing.assert_allclose(out, expected[size] * bn_scale, rtol=1e-10, atol=1e-12)
    # a cascade (8x8 -> 3x3 -> 16x16) would differ from resizing the original: make sure the test can tell
    assert not np.allclose(np_bilinear(np_adaptive_avg_pool(student, (3, 3)), (16, 16)), expected[(16, 16)])


def test_build_projectors_shapes_and_nonnegative():
    projectors = build_projectors(5, [(7, 4, 4), (3, 2, 2), (6, 8, 8)])
    assert len(projectors) == 3
    x = torch.randn(4, 5, 4, 4)
    for proj, (k, h, w) in zip(projectors, [(7, 4, 4), (3, 2, 2), (6, 8, 8)]):
        out = proj(x)
        assert out.shape == (4, k, h, w)
        assert (out >= 0).all()
        assert proj.conv.kernel_size == (1, 1)
        assert proj.conv.bias is not None


def test_projector_conv_bias_bn_relu_eval_against_numpy():
    rng = np.random.default_rng(10)
    proj = FeatureProjector(3, 4, (2, 2)).double().eval()
    weight, bias = rng.normal(size=(4, 3)), rng.normal(size=4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    with torch.no_grad():
        proj.conv.weight.copy_(t64(weight)[:, :, None, None])
        proj.conv.bias.copy_(t64(bias))
        proj.bn.running_mean.copy_(t64(mean))
        proj.bn.running_var.copy_(t64(var))
        proj.bn.weight.copy_(t64(gamma))
        proj.bn.bias.copy_(t64(beta))
    x = rng.normal(size=(2, 3, 4, 4))
    pooled = x.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    conv = np.einsum("oc,bchw->bohw", weight, pooled) + bias[None, :, None, None]
    bn = (conv - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + proj.bn.eps)
    expected = np.maximum(bn * gamma[None, :, None, None] + beta[None, :, None, None], 0.0)
    out = proj(t64(x)).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert (expected == 0).any() and (expected > 0).any()  # the ReLU is actually exercised


def test_projector_train_mode_uses_batch_statistics():
    rng = np.random.default_rng(11)
    proj = FeatureProjector(2, 3, (2, 2)).double().train()
    weight, bias = rng.normal(size=(3, 2)), rng.normal(size=3)
    with torch.no_grad():
        proj.conv.weight.copy_(t64(weight)[:, :, None, None])
        proj.conv.bias.copy_(t64(bias))
    x = rng.normal(size=(4, 2, 2, 2))
    conv = np.einsum("oc,bchw->bohw", weight, x) + bias[None, :, None, None]
    mu = conv.mean(axis=(0, 2, 3), keepdims=True)
    var = conv.var(axis=(0, 2, 3), keepdims=True)  # biased, as batch norm normalises
    expected = np.maximum((conv - mu) / np.sqrt(var + proj.bn.eps), 0.0)
    np.testing.assert_allclose(proj(t64(x)).detach().numpy(), expected, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- agent_state
def _state_inputs(rng, B=3, dims=(3, 5), C=4, sizes=((2, 2), (1, 3))):
    maps = [np.abs(rng.normal(size=(B, d, *s))) + 0.1 for d, s in zip(dims, sizes)]
    embeddings = [rng.normal(size=(B, d)) for d in dims]
    student = rng.normal(size=(B, C)) * 2
    teachers = [rng.normal(size=(B, C)) * 2 for _ in dims]
    targets = rng.integers(0, C, size=B)
    return maps, embeddings, student, teachers, targets


def _np_state(maps, embeddings, student, teachers, targets, T):
    blocks, cos, kl, ce = [], [], [], []
    for m, e, zt in zip(maps, embeddings, teachers):
        c = np_cos(m.mean(axis=(2, 3)), e)
        k = np_kd_kl(student, zt, T)
        h = np_ce(zt, targets)
        blocks.append(np.concatenate([c[:, None], k[:, None], h[:, None], e, zt], axis=1))
        cos.append(c)
        kl.append(k)
        ce.append(h)
    return np.concatenate(blocks, axis=1), np.stack(cos, 1), np.stack(kl, 1), np.stack(ce, 1)


def test_agent_state_cos_literal():
    # GAP of a map whose channel 0 is 2 everywhere and channel 1 is 0 -> [2, 0]; embedding [1, 1]
    proj_map = torch.zeros(1, 2, 2, 2)
    proj_map[:, 0] = 2.0
    state = agent_state([proj_map], [torch.tensor([[1.0, 1.0]])], torch.zeros(1, 3), [torch.zeros(1, 3)],
                        torch.tensor([0]), 4.0)
    assert state.feature_gap.item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert state.logit_gap.item() == pytest.approx(0.0, abs=1e-7)
    assert state.teacher_ce.item() == pytest.approx(math.log(3.0), abs=1e-6)  # uniform over 3 classes
    expected_vector = [1 / math.sqrt(2), 0.0, math.log(3.0), 1.0, 1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(state.vector, torch.tensor([expected_vector]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_agent_state_layout_and_values_against_numpy(T):
    rng = np.random.default_rng(12)
    maps, embeddings, student, teachers, targets = _state_inputs(rng)
    vector, cos, kl, ce = _np_state(maps, embeddings, student, teachers, targets, T)
    state = agent_state([t64(m) for m in maps], [t64(e) for e in embeddings], t64(student),
                        [t64(z) for z in teachers], torch.as_tensor(targets), T)
    assert vector.shape == (3, (3 + 4 + 3) + (5 + 4 + 3))
    assert state.vector.shape == vector.shape
    np.testing.assert_allclose(state.vector.numpy(), vector, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.feature_gap.numpy(), cos, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.logit_gap.numpy(), kl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.teacher_ce.numpy(), ce, rtol=1e-10, atol=1e-12)
    for name in ("feature_gap", "logit_gap", "teacher_ce"):
        assert getattr(state, name).shape == (3, 2)


def test_agent_state_is_detached_even_when_inputs_require_grad():
    rng = np.random.default_rng(13)
    maps, embeddings, student, teachers, targets = _state_inputs(rng)
    leaves = [t32(m).requires_grad_(True) for m in maps] + [t32(e).requires_grad_(True) for e in embeddings]
    student_t = t32(student).requires_grad_(True)
    teacher_t = [t32(z).requires_grad_(True) for z in teachers]
    with torch.enable_grad():
        # a non-leaf input too, as the projector's output is in training
        proj_maps = [leaf * 1.0 for leaf in leaves[:2]]
        state = agent_state(proj_maps, leaves[2:], student_t * 1.0, teacher_t, torch.as_tensor(targets), 4.0)
    for tensor in (state.vector, state.teacher_ce, state.logit_gap, state.feature_gap):
        assert tensor.grad_fn is None
        assert not tensor.requires_grad


def test_agent_state_from_vector_round_trip():
    rng = np.random.default_rng(14)
    maps, embeddings, student, teachers, targets = _state_inputs(rng, dims=(3, 5, 2), sizes=((2, 2), (1, 3), (4, 4)))
    state = agent_state([t32(m) for m in maps], [t32(e) for e in embeddings], t32(student),
                        [t32(z) for z in teachers], torch.as_tensor(targets), 4.0)
    assert state.vector.shape[1] == sum(d + 4 + 3 for d in (3, 5, 2))
    rebuilt = AgentState.from_vector(state.vector, [3, 5, 2], 4)
    for name in ("vector", "teacher_ce", "logit_gap", "feature_gap"):
        torch.testing.assert_close(getattr(rebuilt, name), getattr(state, name), rtol=0, atol=0)
    with pytest.raises(ValueError):
        AgentState.from_vector(state.vector[:, :-1], [3, 5, 2], 4)


# ----------------------------------------------------------------------------- policy
def _np_policy(params: dict, vector: np.ndarray, dims: list[int], C: int, dynamic: bool):
    """docs/method.md §4 written out: h = ReLU(W1 s); a = softmax(head(h)); heuristics from the state; mixing."""
    offsets = np.cumsum([0] + [d + C + 3 for d in dims])[:-1]
    cos, kl, ce = (vector[:, offsets + k] for k in range(3))
    M = len(dims)
    hidden = np.maximum(vector @ params["stem.weight"].T, 0.0)
    a_logit = np_softmax(hidden @ params["logit_head.weight"].T + params["logit_head.bias"], axis=1)
    a_feature = np_softmax(hidden @ params["feature_head.weight"].T + params["feature_head.bias"], axis=1)
    c = (1.0 - np_softmax(ce, axis=1)) / (M - 1)
    g_logit, g_feature = np_softmax(kl, axis=1), np_softmax(cos, axis=1)
    if dynamic:
        lam, mu = np_softmax(params["theta_logit"]), np_softmax(params["theta_feature"])
    else:
        lam = mu = np.full(3, 1.0 / 3.0)
    return lam[0] * a_logit + lam[1] * c + lam[2] * g_logit, mu[0] * a_feature + mu[1] * c + mu[2] * g_feature


def _random_vector(rng, B: int, dims: list[int], C: int) -> np.ndarray:
    """A plausible state vector: cos in [-1, 1], KL and CE >= 0, embeddings and logits ~ N(0, 1)."""
    blocks = []
    for d in dims:
        blocks += [rng.uniform(-1, 1, (B, 1)), rng.uniform(0, 3, (B, 1)), rng.uniform(0, 4, (B, 1)),
                   rng.normal(size=(B, d)), rng.normal(size=(B, C)) * 2]
    return np.concatenate(blocks, axis=1)


@pytest.mark.parametrize("dynamic", [False, True])
def test_policy_state_dict_layout(dynamic):
    policy = PolicyNet(17, 3, dynamic=dynamic)
    shapes = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    expected = {
        "stem.weight": (128, 17),
        "logit_head.weight": (3, 128),
        "logit_head.bias": (3,),
        "feature_head.weight": (3, 128),
        "feature_head.bias": (3,),
    }
    if dynamic:
        expected.update({"theta_logit": (3,), "theta_feature": (3,)})
        torch.testing.assert_close(policy.state_dict()["theta_logit"], torch.ones(3))
        torch.testing.assert_close(policy.state_dict()["theta_feature"], torch.ones(3))
        assert {n for n, _ in policy.named_parameters()} >= {"theta_logit", "theta_feature"}
    assert shapes == expected


def _set_params(policy: PolicyNet, rng, dynamic: bool) -> dict:
    params = {k: rng.normal(size=tuple(v.shape)) * 0.3 for k, v in policy.state_dict().items()}
    if dynamic:
        params["theta_logit"] = np.array([0.3, -1.0, 2.0])
        params["theta_feature"] = np.array([-0.5, 1.5, 0.0])
    policy.load_state_dict({k: t64(v) for k, v in params.items()})
    return params


@pytest.mark.parametrize("dynamic", [False, True])
def test_policy_mixing_against_numpy(dynamic):
    rng = np.random.default_rng(15)
    dims, C, B = [3, 5], 4, 6
    policy = PolicyNet(sum(d + C + 3 for d in dims), 2, dynamic=dynamic).double()
    params = _set_params(policy, rng, dynamic)
    vector = _random_vector(rng, B, dims, C)
    expected_logit, expected_feature = _np_policy(params, vector, dims, C, dynamic)
    with torch.no_grad():
        w_logit, w_feature = policy(AgentState.from_vector(t64(vector), dims, C))
    np.testing.assert_allclose(w_logit.numpy(), expected_logit, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w_feature.numpy(), expected_feature, rtol=1e-10, atol=1e-12)


def test_policy_static_literal_single_row():
    # Zero network -> aL = aF = uniform [1/2, 1/2]. CE = [0, ln3] -> c = 1 - [1/4, 3/4] = [3/4, 1/4].
    # KL = [ln3, 0] -> gL = [3/4, 1/4]. cos = [0, 0] -> gF = [1/2, 1/2].
    # wL = ([.5,.5] + [.75,.25] + [.75,.25]) / 3 = [2/3, 1/3];  wF = ([.5,.5]+[.75,.25]+[.5,.5]) / 3 = [7/12, 5/12]
    dims, C = [1, 1], 2
    policy = PolicyNet(2 * (1 + 2 + 3), 2)
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
    vector = torch.tensor([[0.0, math.log(3.0), 0.0, 0.3, 0.1, 0.2, 0.0, 0.0, math.log(3.0), -0.3, 0.5, 0.4]])
    w_logit, w_feature = policy(AgentState.from_vector(vector, dims, C))
    torch.testing.assert_close(w_logit, torch.tensor([[2 / 3, 1 / 3]]))
    torch.testing.assert_close(w_feature, torch.tensor([[7 / 12, 5 / 12]]))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("num_teachers", [2, 3, 4])
def test_policy_rows_on_open_simplex(dynamic, num_teachers):
    rng = np.random.default_rng(16)
    dims, C = [3] * num_teachers, 5
    policy = PolicyNet(sum(d + C + 3 for d in dims), num_teachers, dynamic=dynamic)
    vector = t32(_random_vector(rng, 8, dims, C))
    w_logit, w_feature = policy(AgentState.from_vector(vector, dims, C))
    for w in (w_logit, w_feature):
        assert w.shape == (8, num_teachers)
        torch.testing.assert_close(w.sum(1), torch.ones(8))
        assert ((w > 0) & (w < 1)).all()


def test_heuristic_terms_literal_and_numpy():
    # M = 2: CE = [0, ln3] -> softmax [1/4, 3/4] -> c = [3/4, 1/4]; M = 3, equal CE -> c = 1/3 each
    c2 = heuristic_terms(AgentState.from_vector(
        torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, math.log(3.0), 1.0, 1.0]]), [1, 1], 1))[0]
    torch.testing.assert_close(c2, torch.tensor([[0.75, 0.25]]))
    rng = np.random.default_rng(17)
    dims, C = [2, 3, 4], 3
    vector = _random_vector(rng, 5, dims, C)
    offsets = np.cumsum([0] + [d + C + 3 for d in dims])[:-1]
    c, g_logit, g_feature = heuristic_terms(AgentState.from_vector(t64(vector), dims, C))
    np.testing.assert_allclose(c.numpy(), np_inverted_softmax(vector[:, offsets + 2]), rtol=1e-12)
    np.testing.assert_allclose(g_logit.numpy(), np_softmax(vector[:, offsets + 1], axis=1), rtol=1e-12)
    np.testing.assert_allclose(g_feature.numpy(), np_softmax(vector[:, offsets + 0], axis=1), rtol=1e-12)
    equal = np.zeros((1, sum(d + C + 3 for d in dims)))
    c_equal = heuristic_terms(AgentState.from_vector(t64(equal), dims, C))[0]
    np.testing.assert_allclose(c_equal.numpy(), np.full((1, 3), 1 / 3), rtol=1e-12)
    # low cross-entropy -> high confidence weight; high KL -> high logit-gap weight
    assert np.all(np.argmin(vector[:, offsets + 2], 1) == c.argmax(1).numpy())


# ----------------------------------------------------------------------------- rewards
def test_normalized_reward_literals_bessel():
    torch.testing.assert_close(normalized_reward(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.0, 0.0, 1.0]))
    # r = 0..4: mean 2, Bessel std sqrt(10/4) = 1.5811 -> (r - 2)/std = [.., .., 0, 0.6325, 1.2649] -> clamp
    out = normalized_reward(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(out, t64([0.0, 0.0, 0.0, 1 / math.sqrt(2.5), 1.0]))
    # population std (sqrt 2) would give 0.7071 for the fourth entry
    assert abs(out[3].item() - 1 / math.sqrt(2.0)) > 0.05
    # r = [-4, -1, -2, -3]: mean -2.5, std = sqrt(5/3) -> [0, 1.5/1.29=1.16 -> 1, 0.387, 0]
    out = normalized_reward(torch.tensor([-4.0, -1.0, -2.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(out, t64([0.0, 1.0, 0.5 / math.sqrt(5 / 3), 0.0]))


def test_normalized_reward_against_numpy_and_range():
    rng = np.random.default_rng(18)
    r = rng.normal(size=32) * 5 - 10
    expected = np.clip((r - r.mean()) / r.std(ddof=1), 0.0, 1.0)
    out = normalized_reward(t64(r)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    assert out.min() >= 0 and out.max() <= 1 and (out == 0).any() and ((out > 0) & (out < 1)).any()
    # invariant to a positive affine change of the raw reward
    np.testing.assert_allclose(normalized_reward(t64(3.0 * r + 7.0)).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_normalized_reward_degenerate_cases_are_zero():
    for raw in (torch.tensor([2.5]), torch.tensor([-1.0, -1.0, -1.0]), torch.zeros(4)):
        out = normalized_reward(raw)
        assert out.shape == raw.shape
        assert torch.isfinite(out).all()
        assert torch.all(out == 0)


def test_reference_agent_loss_literal():
    # one sample, r = 1: mean_m(-ln wL - ln wF) = ((ln2 + ln4) + (ln2 + ln4/3)) / 2
    loss = reference_agent_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]]), torch.tensor([1.0]))
    expected = (math.log(2) + math.log(4) + math.log(2) + math.log(4 / 3)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # two samples, r = [1, 0.5]: mean over all four (i, m) entries
    w_logit = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    w_feature = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    loss = reference_agent_loss(w_logit, w_feature, torch.tensor([1.0, 0.5]))
    expected = (
        1.0 * (math.log(2) + math.log(4)) + 1.0 * (math.log(2) + math.log(4 / 3))
        + 0.5 * (math.log(5) + math.log(2)) + 0.5 * (math.log(1.25) + math.log(2))
    ) / 4
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # zero reward -> zero loss
    assert reference_agent_loss(w_logit, w_feature, torch.zeros(2)).item() == 0.0


def test_reference_agent_loss_log_floor():
    # a zero weight contributes -(-100) * r: finite, 100 * r
    loss = reference_agent_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.5]))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(100 * 0.5 / 2, abs=1e-5)
    # the floor is at -100 exactly, not an epsilon: exp(-115) floors to -100, exp(-50) is kept
    w_logit = torch.tensor([[math.exp(-115.0), math.exp(-50.0)]], dtype=torch.float64)
    ones = torch.ones(1, 2, dtype=torch.float64)
    loss = reference_agent_loss(w_logit, ones, torch.tensor([1.0], dtype=torch.float64))
    assert loss.item() == pytest.approx((100.0 + 50.0) / 2, rel=1e-12)


def _np_agent_loss(w_logit, w_feature, reward_hat):
    log_l, log_f = np.maximum(np.log(w_logit), -100.0), np.maximum(np.log(w_feature), -100.0)
    return (reward_hat[:, None] * (-log_l - log_f)).mean()


def test_reference_agent_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(19)
    w_logit, w_feature = rng.uniform(0.05, 1.0, (3, 2)), rng.uniform(0.05, 1.0, (3, 2))
    reward_hat = np.array([0.0, 0.4, 1.0])
    wl, wf = t64(w_logit).requires_grad_(True), t64(w_feature).requires_grad_(True)
    loss = reference_agent_loss(wl, wf, t64(reward_hat))
    assert loss.item() == pytest.approx(_np_agent_loss(w_logit, w_feature, reward_hat), rel=1e-12)
    loss.backward()
    eps = 1e-6
    for which, tensor in ((0, wl), (1, wf)):
        numeric = np.zeros((3, 2))
        for idx in np.ndindex(3, 2):
            args_up, args_down = [w_logit.copy(), w_feature.copy()], [w_logit.copy(), w_feature.copy()]
            args_up[which][idx] += eps
            args_down[which][idx] -= eps
            numeric[idx] = (_np_agent_loss(*args_up, reward_hat) - _np_agent_loss(*args_down, reward_hat)) / (2 * eps)
        np.testing.assert_allclose(tensor.grad.numpy(), numeric, rtol=1e-6, atol=1e-9)
        # analytic form: d/dw = -r_i / (B * M * w)
        np.testing.assert_allclose(tensor.grad.numpy(), -reward_hat[:, None] / (6 * [w_logit, w_feature][which]),
                                   rtol=1e-10)


def test_reference_agent_loss_gradient_finite_at_floor():
    """Below the floor the floored log is constant, so its gradient is 0 (BCELoss gives a finite one
    too). A NaN here would poison every policy parameter in the agent's SGD step."""
    w_logit = torch.tensor([[0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    w_feature = torch.tensor([[0.5, 0.5], [0.5, 0.5]], requires_grad=True)
    reference_agent_loss(w_logit, w_feature, torch.tensor([1.0, 0.0])).backward()
    assert torch.isfinite(w_logit.grad).all(), f"gradient at a zero weight is {w_logit.grad.tolist()}"
    assert torch.isfinite(w_feature.grad).all()
