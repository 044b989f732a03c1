"""A segmentation teacher over real gRPC on loopback: Describe states the logit maps' size and stride,
dense logits travel at the head's own stride (never upsampled), whole or in chunks under the budget,
equal to the in-process teacher in float32 and within float16 rounding with ``half_precision``."""
from __future__ import annotations

import grpc
import pytest
import torch

from mtkd.data import normalize
from mtkd.models import Outputs, create_model
from mtkd.teachers import Teacher
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc, tensor_pb2
from services.convert import InvalidMessage, tensor_to_proto
from services.teacher_server.grpc_client import RemoteTeacher
from services.teacher_server.grpc_server import serve, stop
from services.teacher_server.messages import response_to_outputs, teacher_info_to_proto

SIZE, CLASSES = 48, 11


def seg_teacher(model: str, precision: str = "fp32") -> Teacher:
    """An untrained segmentation teacher on ``[1, 48, 48]`` canvases (serving does not need it trained)."""
    torch.manual_seed(0)
    meta = {"model": model, "num_classes": CLASSES, "input_shape": [1, SIZE, SIZE], "weights_digest": model,
            "task": "segmentation", "dataset": {"name": "canvases", "mean": [0.2], "std": [0.25]}}
    return Teacher(create_model(model, num_classes=CLASSES, in_channels=1), meta, precision=precision)


def pixels(batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def normalised(images: torch.Tensor) -> torch.Tensor:
    """What the server computes from uint8 pixels (the training loader's normalisation)."""
    return normalize(images, (0.2,), (0.25,))


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return seg_teacher("deeplabv3_resnet8")


@pytest.fixture(scope="module")
def address(teacher):
    server, port = serve(teacher, max_batch=32)
    yield f"127.0.0.1:{port}"
    stop(server, grace=None)


def test_describe_states_the_logit_map_size_and_stride(address, teacher):
    with RemoteTeacher(address) as remote:
        info = remote.describe()
    assert info["logit_size"] == teacher.describe()["logit_size"] == (12, 12)  # CIFAR-style ResNet: stride 4
    assert info["output_stride"] == 4 and info["feature_shape"] == teacher.describe()["feature_shape"]
    carried = {k: v for k, v in info.items() if k not in ("max_batch", "output_stride")}
    assert carried == {k: teacher.describe()[k] for k in carried}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_dense_outputs_are_the_in_process_ones_in_float32(address, teacher, stream):
    x = pixels(16)
    want = teacher.infer(normalised(x))
    assert want.logits.shape == (16, CLASSES, 12, 12)  # the head's own stride, not upsampled
    with RemoteTeacher(address, stream=stream, max_chunk_bytes=60_000) as remote:
        got = remote.infer(x)
    for field in Outputs._fields:
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_dense_stream_chunks_stay_under_the_budget(address):
    budget = 60_000
    request = teacher_pb2.InferRequest(images=tensor_to_proto(pixels(16)), max_chunk_bytes=budget)
    with grpc.insecure_channel(address) as channel:
        chunks = list(teacher_pb2_grpc.TeacherServiceStub(channel).InferStream(request))
    assert len(chunks) > 1 and all(c.ByteSize() <= budget for c in chunks)
    assert all(list(c.logits.shape[1:]) == [CLASSES, 12, 12] for c in chunks)
    assert sum(c.logits.shape[0] for c in chunks) == 16


def test_half_precision_halves_the_bytes_within_float16_rounding(address, teacher):
    x = pixels(8)
    want = teacher.infer(normalised(x))
    with RemoteTeacher(address, half_precision=True) as remote:
        got = remote.infer(x)
    for field in Outputs._fields:
        exact = getattr(want, field)
        # float16 rounds to 11 significant bits: within 2^-11 of each value (plus the subnormal step)
        assert torch.all((getattr(got, field) - exact).abs() <= exact.abs() * 2**-11 + 2**-24), field
    request = teacher_pb2.InferRequest(images=tensor_to_proto(x), fields=[teacher_pb2.OUTPUT_FIELD_LOGITS])
    with grpc.insecure_channel(address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        full = stub.Infer(request)
        request.half_precision = True
        half = stub.Infer(request)
    assert half.logits.dtype == tensor_pb2.DTYPE_FLOAT16 and 2 * len(half.logits.data) == len(full.logits.data)
    assert len(full.logits.data) == 8 * CLASSES * 12 * 12 * 4


def test_a_bf16_teacher_serves_its_own_numbers():
    """A teacher computing in bf16 gives, over the wire (float32 or float16), its in-process outputs:
    exactly, and within float16 rounding of them."""
    teacher = seg_teacher("lraspp_mobilenetv2", precision="bf16")
    server, port = serve(teacher, max_batch=8)
    try:
        x = pixels(4)
        want = teacher.infer(normalised(x)).logits.float()
        with RemoteTeacher(f"127.0.0.1:{port}") as remote:
            assert torch.equal(remote.infer(x, fields=["logits"]).logits, want)
        with RemoteTeacher(f"127.0.0.1:{port}", half_precision=True) as remote:
            got = remote.infer(x, fields=["logits"]).logits
        assert torch.all((got - want).abs() <= want.abs() * 2**-11 + 2**-24)
    finally:
        stop(server, grace=None)


def test_a_response_of_another_logit_shape_is_refused(teacher):
    info = {**teacher.describe()}
    classifier_shaped = teacher_pb2.InferResponse(batch_size=2, logits=tensor_to_proto(torch.zeros(2, CLASSES)))
    with pytest.raises(InvalidMessage, match="logits"):
        response_to_outputs(classifier_shaped, batch=2, info=info, fields=["logits"])
    with pytest.raises(ValueError, match="logit_size"):
        teacher_info_to_proto({**info, "logit_size": (5, 6)}, max_batch=4)  # 48/5 is no whole stride


def test_half_precision_can_be_asked_per_call(address, teacher):
    """What a teacher actor does for a run with ``runtime.half_precision``: float16 on the gRPC wire for
    that call, whatever the client was built with."""
    x = pixels(4)
    exact = teacher.infer(normalised(x)).logits
    with RemoteTeacher(address) as remote:
        assert torch.equal(remote.infer(x, fields=["logits"]).logits, exact)
        half = remote.infer(x, fields=["logits"], half_precision=True).logits
    assert torch.all((half - exact).abs() <= exact.abs() * 2**-11 + 2**-24) and not torch.equal(half, exact)
