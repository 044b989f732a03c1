"""services.convert and services.teacher_server.messages without a network: tensor encoding,
validation messages, chunking."""
from __future__ import annotations

import pytest
import torch

from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import tensor_pb2
from services.convert import InvalidMessage, InvalidTensor, proto_to_tensor, tensor_to_proto
from services.teacher_server.messages import (
    fields_from_proto,
    iter_response_chunks,
    join_response_chunks,
    outputs_to_response,
    response_to_outputs,
)

ALL = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8)


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_tensor_round_trip_is_exact(dtype):
    t = (torch.randn(3, 4, 5) * 50).to(dtype).transpose(0, 2)  # non-contiguous on purpose
    msg = tensor_to_proto(t)
    assert list(msg.shape) == [5, 4, 3] and len(msg.data) == t.numel() * t.element_size()
    back = proto_to_tensor(msg, allowed_dtypes=ALL, max_bytes=1 << 20)
    assert back.dtype == dtype and torch.equal(back, t)
    back[0] = 0  # writable, and a copy
    assert torch.equal(proto_to_tensor(msg, allowed_dtypes=ALL, max_bytes=1 << 20), t)


def test_wire_format_is_little_endian_c_order():
    msg = tensor_to_proto(torch.tensor([[1, 2], [3, 256]], dtype=torch.int64))
    assert msg.dtype == tensor_pb2.DTYPE_INT64
    assert msg.data[:8] == (1).to_bytes(8, "little") and msg.data[24:] == (256).to_bytes(8, "little")


def test_scalar_and_half():
    msg = tensor_to_proto(torch.tensor(1.5), half=True)
    assert msg.dtype == tensor_pb2.DTYPE_FLOAT16 and list(msg.shape) == []
    assert proto_to_tensor(msg, allowed_dtypes=ALL, max_bytes=2).item() == 1.5
    assert tensor_to_proto(torch.arange(3), half=True).dtype == tensor_pb2.DTYPE_INT64  # ints untouched


def test_encoding_refuses_unsupported_dtype_and_float16_overflow():
    with pytest.raises(ValueError, match="cannot send dtype torch.float64"):
        tensor_to_proto(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="largest magnitude is 1e\\+05, expected at most 65504"):
        tensor_to_proto(torch.tensor([1e5]), half=True)


def test_expected_shape_messages():
    msg = tensor_to_proto(torch.zeros(4, 3, 8, 8))
    spec = dict(allowed_dtypes=(torch.float32,), max_bytes=1 << 20, name="images",
                dim_names=("batch", "channels", "height", "width"))
    with pytest.raises(InvalidTensor) as err:
        proto_to_tensor(msg, expected_shape=(range(1, 9), 1, 8, 8), **spec)
    assert str(err.value) == "images must have 1 channels, got 3 (shape [4, 3, 8, 8], expected [1..8, 1, 8, 8])"
    assert proto_to_tensor(msg, expected_shape=(None, 3, None, 8), **spec).shape == (4, 3, 8, 8)
    with pytest.raises(InvalidTensor, match="must have size 9 in dimension 1, got 3"):
        proto_to_tensor(msg, allowed_dtypes=(torch.float32,), max_bytes=1 << 20, expected_shape=(4, 9, 8, 8))
    with pytest.raises(InvalidTensor, match="tensor must have 2 dimensions, got 4"):
        proto_to_tensor(msg, allowed_dtypes=(torch.float32,), max_bytes=1 << 20, expected_ndim=2)
    with pytest.raises(InvalidTensor, match="tensor has 3072 bytes of data, over the limit of 3000 bytes"):
        proto_to_tensor(msg, allowed_dtypes=(torch.float32,), max_bytes=3000)
    inf = tensor_to_proto(torch.tensor([1.0, float("inf")]))
    with pytest.raises(InvalidTensor, match="1 non-finite"):
        proto_to_tensor(inf, allowed_dtypes=(torch.float32,), max_bytes=8)
    assert proto_to_tensor(inf, allowed_dtypes=(torch.float32,), max_bytes=8, require_finite=False)[1].isinf()


def _outputs(batch: int) -> Outputs:
    g = torch.Generator().manual_seed(batch)
    return Outputs(torch.randn(batch, 10, generator=g), torch.randn(batch, 6, generator=g),
                   torch.randn(batch, 6, 3, 3, generator=g))


INFO = dict(num_classes=10, embedding_dim=6, feature_shape=(6, 3, 3))


@pytest.mark.parametrize("budget", [1, 500, 1000, 10**6])
def test_chunks_rejoin_exactly(budget):
    want = _outputs(7)
    response = outputs_to_response(want, request_id="r1")
    chunks = list(iter_response_chunks(response, budget))
    assert sum(c.logits.shape[0] for c in chunks) == 7
    assert all(c.ByteSize() <= budget for c in chunks) or all(c.logits.shape[0] == 1 for c in chunks)
    got = response_to_outputs(join_response_chunks(chunks), batch=7, info=INFO)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_join_refuses_missing_reordered_or_inconsistent_chunks():
    chunks = list(iter_response_chunks(outputs_to_response(_outputs(6)), 1000))
    assert len(chunks) == 3
    with pytest.raises(InvalidMessage, match="stream ended after 4 samples; expected 6"):
        join_response_chunks(chunks[:2])
    with pytest.raises(InvalidMessage, match=r"batch_offset 4, batch_size 6 and rows \[2\]; expected offset 2"):
        join_response_chunks([chunks[0], chunks[2], chunks[1]])
    with pytest.raises(InvalidMessage, match="no chunks"):
        join_response_chunks([])
    chunks[1].ClearField("feature")
    with pytest.raises(InvalidMessage, match="carries"):
        join_response_chunks(chunks)


def test_response_validation():
    response = outputs_to_response(_outputs(2), fields=("logits",))
    got = response_to_outputs(response, batch=2, info=INFO, fields=("logits",))
    assert got.embedding is None and got.feature is None
    with pytest.raises(InvalidMessage, match="response lacks embedding"):
        response_to_outputs(response, batch=2, info=INFO)
    with pytest.raises(InvalidTensor, match="logits must have size 3 in dimension 0, got 2"):
        response_to_outputs(response, batch=3, info=INFO, fields=("logits",))


def test_fields_from_proto():
    assert fields_from_proto([]) == ("logits", "embedding", "feature")
    assert fields_from_proto([3, 1, 3]) == ("logits", "feature")
    with pytest.raises(InvalidMessage, match=r"unknown values \[0\]"):
        fields_from_proto([0])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_non_finite_detection_per_float_format(dtype):
    finfo = torch.finfo(dtype)
    edge = torch.tensor([finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 4, 0.0, -0.0], dtype=dtype)
    assert torch.equal(proto_to_tensor(tensor_to_proto(edge), allowed_dtypes=ALL, max_bytes=64), edge)
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0], dtype=dtype)
    with pytest.raises(InvalidTensor, match="tensor has 3 non-finite values"):
        proto_to_tensor(tensor_to_proto(bad), allowed_dtypes=ALL, max_bytes=64)
