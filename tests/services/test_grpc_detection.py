"""A detection teacher over real gRPC on loopback: Describe states the logits' K + 4 channels
(``logit_channels``: K heatmaps, box size and offset) beside the K classes, the map's size and stride;
the outputs travel at the head's own stride, whole or in chunks, equal to the in-process teacher in
float32 and within float16 rounding with ``half_precision``; logits of another shape are refused; the
cache of teacher outputs lays a detector's outputs out by its described channels."""
from __future__ import annotations

import grpc
import pytest
import torch

from mtkd.cache import MemoryStore, OutputLayout, sample_keys, teacher_cache
from mtkd.data import normalize
from mtkd.detection.models import BOX_CHANNELS, split_logits
from mtkd.models import Outputs, create_model
from mtkd.tasks import DetectionTask
from mtkd.teachers import Teacher
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc, tensor_pb2
from services.convert import InvalidMessage, tensor_to_proto
from services.teacher_server.grpc_client import RemoteTeacher
from services.teacher_server.grpc_server import serve, stop
from services.teacher_server.messages import response_to_outputs, teacher_info_from_proto, teacher_info_to_proto

SIZE, CLASSES, CELLS = 32, 10, 8  # 32 x 32 canvases, 10 garment classes, stride-4 maps of 8 x 8 cells
CHANNELS = CLASSES + BOX_CHANNELS


def det_teacher() -> Teacher:
    """An untrained CenterNet teacher on ``[1, 32, 32]`` canvases (serving does not need it trained)."""
    torch.manual_seed(0)
    meta = {"model": "centernet_resnet8", "num_classes": CLASSES, "input_shape": [1, SIZE, SIZE],
            "weights_digest": "centernet_resnet8", "task": "detection",
            "dataset": {"name": "canvases_det", "mean": [0.2], "std": [0.25]}}
    return Teacher(create_model("centernet_resnet8", num_classes=CLASSES, in_channels=1), meta)


def pixels(batch: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 1, SIZE, SIZE), dtype=torch.uint8, generator=generator)


def normalised(images: torch.Tensor) -> torch.Tensor:
    """What the server computes from uint8 pixels (the training loader's normalisation)."""
    return normalize(images, (0.2,), (0.25,))


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return det_teacher()


@pytest.fixture(scope="module")
def address(teacher):
    server, port = serve(teacher, max_batch=32)
    yield f"127.0.0.1:{port}"
    stop(server, grace=None)


def test_describe_states_the_logit_channels_size_and_stride(address, teacher):
    local = teacher.describe()
    assert local["num_classes"] == CLASSES and local["logit_channels"] == CHANNELS
    with grpc.insecure_channel(address) as channel:
        info = teacher_pb2_grpc.TeacherServiceStub(channel).Describe(teacher_pb2.DescribeTeacherRequest())
    assert (info.num_classes, info.logit_channels, list(info.logit_size), info.output_stride) == (CLASSES, CHANNELS,
                                                                                                   [CELLS, CELLS], 4)
    with RemoteTeacher(address) as remote:
        described = remote.describe()
    carried = {k: v for k, v in described.items() if k not in ("max_batch", "output_stride")}
    assert carried == {k: local[k] for k in carried} and "logit_channels" in carried
    DetectionTask(CLASSES, 5).check_teachers([described])  # a served detector is a detector teacher


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_detection_outputs_are_the_in_process_ones_in_float32(address, teacher, stream):
    x = pixels(16)
    want = teacher.infer(normalised(x))
    assert want.logits.shape == (16, CHANNELS, CELLS, CELLS)  # the head's own stride, not upsampled
    with RemoteTeacher(address, stream=stream, max_chunk_bytes=40_000) as remote:
        got = remote.infer(x)
    for field in Outputs._fields:
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    heads = split_logits(got.logits)
    assert heads.heatmap.shape[1] == CLASSES and heads.size.shape[1] == heads.offset.shape[1] == 2


def test_detection_stream_chunks_stay_under_the_budget(address):
    budget = 40_000  # a sample: 14 * 64 + 32 + 32 * 64 floats = 12 KB, so 3 per chunk
    request = teacher_pb2.InferRequest(images=tensor_to_proto(pixels(16)), max_chunk_bytes=budget)
    with grpc.insecure_channel(address) as channel:
        chunks = list(teacher_pb2_grpc.TeacherServiceStub(channel).InferStream(request))
    assert len(chunks) > 1 and all(c.ByteSize() <= budget for c in chunks)
    assert all(list(c.logits.shape[1:]) == [CHANNELS, CELLS, CELLS] for c in chunks)
    assert sum(c.logits.shape[0] for c in chunks) == 16


def test_half_precision_halves_the_bytes_within_float16_rounding(address, teacher):
    x = pixels(8, seed=4)
    want = teacher.infer(normalised(x))
    with RemoteTeacher(address, half_precision=True) as remote:
        got = remote.infer(x)
    for field in Outputs._fields:
        exact = getattr(want, field)
        # float16 rounds to 11 significant bits: within 2^-11 of each value (plus the subnormal step)
        assert torch.all((getattr(got, field) - exact).abs() <= exact.abs() * 2**-11 + 2**-24), field
    assert not torch.equal(got.logits, want.logits)  # it did round
    request = teacher_pb2.InferRequest(images=tensor_to_proto(x), fields=[teacher_pb2.OUTPUT_FIELD_LOGITS])
    with grpc.insecure_channel(address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        full = stub.Infer(request)
        request.half_precision = True
        half = stub.Infer(request)
    assert half.logits.dtype == tensor_pb2.DTYPE_FLOAT16 and 2 * len(half.logits.data) == len(full.logits.data)
    assert len(full.logits.data) == 8 * CHANNELS * CELLS * CELLS * 4


def test_logits_of_another_shape_are_refused(teacher):
    info = teacher.describe()
    for shape in [(2, CLASSES, CELLS, CELLS),  # the class count read as the channels: no box channels
                  (2, CHANNELS, CELLS, CELLS + 1), (2, CHANNELS)]:
        response = teacher_pb2.InferResponse(batch_size=2, logits=tensor_to_proto(torch.zeros(shape)))
        with pytest.raises(InvalidMessage, match="logits"):
            response_to_outputs(response, batch=2, info=info, fields=["logits"])
    with pytest.raises(ValueError, match="logit_channels 0"):
        teacher_info_to_proto({**info, "logit_channels": 0}, max_batch=4)
    with pytest.raises(InvalidMessage, match="logit_channels is -1"):
        teacher_info_from_proto(teacher_pb2.TeacherInfo(num_classes=CLASSES, logit_channels=-1))


def test_descriptions_without_logit_channels_read_as_the_class_count(teacher):
    """A backend or a server from before ``logit_channels``: a classifier's logits have its classes."""
    old = {k: v for k, v in teacher.describe().items() if k not in ("logit_channels", "logit_size")}
    assert teacher_info_to_proto(old, max_batch=4).logit_channels == CLASSES
    assert teacher_info_from_proto(teacher_pb2.TeacherInfo(num_classes=CLASSES))["logit_channels"] == CLASSES
    assert OutputLayout.from_description(old).logit_channels == CLASSES


def test_the_cache_holds_a_served_detectors_outputs(address, teacher):
    """The layout comes from the described channels, so a detector's outputs round-trip the store:
    a cold lookup computes and stores them, a warm one reads back the in-process numbers."""
    x = pixels(4, seed=5)
    want = teacher.infer(normalised(x))
    with RemoteTeacher(address) as remote:
        described = remote.describe()
        cache = teacher_cache(MemoryStore(), described, "float32")
        assert cache.layout == OutputLayout.of(want) and cache.layout.logit_channels == CHANNELS
        keys = sample_keys(described["digest"], "canvases_det", described["numerics"], "float32",
                           torch.arange(4), None, 0)
        cold = cache.outputs(keys, lambda: remote.infer(x))
        warm = cache.outputs(keys, lambda: pytest.fail("a warm cache computes nothing"))
    assert cache.take_stats()["hits"] == 4
    for field in Outputs._fields:
        assert torch.equal(getattr(cold, field), getattr(want, field)), field
        assert torch.equal(getattr(warm, field), getattr(want, field)), field
