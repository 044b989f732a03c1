"""TeacherService over real gRPC on loopback: round trips, streaming, validation, security, health;
real checkpoints: self-describing inputs (uint8), checked outputs, the concurrency bound."""
from __future__ import annotations

import datetime
import gzip
import hashlib
import ipaddress
import json
import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc, tensor_pb2
from services.convert import tensor_to_proto
from services.teacher_server.grpc_client import RemoteTeacher
from services.teacher_server.grpc_server import SERVICE_NAME, serve, stop
from services.teacher_server.messages import TEACHER_INFO_KEYS

MiB = 1024 * 1024
MAX_BATCH = 16
D = tensor_pb2.DType


# ---------------------------------------------------------------------------
# A small real backend
# ---------------------------------------------------------------------------
class TinyNet(nn.Module):
    """conv-bn-relu stem, one strided conv stage, GAP, linear: returns Outputs."""

    def __init__(self, in_channels: int = 1, width: int = 64, num_classes: int = 10, stride: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(16, width, 3, stride=stride, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> Outputs:
        feature = self.stage(self.stem(x))
        embedding = feature.mean(dim=(2, 3))
        return Outputs(self.fc(embedding), embedding, feature)


def make_model() -> nn.Module:
    """The zoo's resnet8 (1 channel, 10 classes) when the zoo has it, else TinyNet."""
    torch.manual_seed(0)
    try:
        from mtkd.models import create_model
    except ImportError:
        return TinyNet()
    return create_model("resnet8", num_classes=10, in_channels=1)


class ModelBackend:
    """A frozen network behind the teacher backend duck type."""

    def __init__(self, model: nn.Module, name: str, input_shape=(1, 28, 28)):
        self.model = model.eval()
        self.fail = False
        with torch.inference_mode():
            out = self.model(torch.zeros(1, *input_shape))
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in self.model.state_dict().values()))
        self.info = dict(name=name, model=type(model).__name__, num_classes=out.logits.shape[1], input_shape=tuple(input_shape),
                         embedding_dim=out.embedding.shape[1], feature_shape=tuple(out.feature.shape[1:]),
                         digest=digest.hexdigest())

    def describe(self) -> dict:
        return dict(self.info)

    def infer(self, images: torch.Tensor) -> Outputs:
        if self.fail:
            raise RuntimeError("simulated backend failure")
        with torch.inference_mode():
            return self.model(images)


def images(batch: int, channels: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, 28, 28, generator=torch.Generator().manual_seed(seed))


def request(tensor_msg: tensor_pb2.Tensor, **kwargs) -> teacher_pb2.InferRequest:
    return teacher_pb2.InferRequest(images=tensor_msg, **kwargs)


@pytest.fixture(scope="module")
def backend() -> ModelBackend:
    return ModelBackend(make_model(), "resnet8")


@pytest.fixture(scope="module")
def server(backend):
    srv, port = serve(backend, max_batch=MAX_BATCH)
    yield f"127.0.0.1:{port}"
    stop(srv, grace=None)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield teacher_pb2_grpc.TeacherServiceStub(channel)


def assert_outputs_equal(got: Outputs, want: Outputs) -> None:
    for field in Outputs._fields:
        assert got is not None and getattr(got, field).dtype == torch.float32
        assert torch.equal(getattr(got, field), getattr(want, field)), field


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------
def test_describe_round_trip(server, backend):
    with RemoteTeacher(server) as teacher:
        info = teacher.describe()
    assert {k: info[k] for k in backend.info} == backend.describe()
    assert info["max_batch"] == MAX_BATCH


def test_remote_stands_in_for_the_library_teacher():
    teachers = pytest.importorskip("mtkd.teachers")
    meta = {"model": "resnet8", "num_classes": 10, "input_shape": (1, 28, 28), "weights_digest": "d1"}
    local = teachers.Teacher(make_model(), meta, name="t0")
    srv, port = serve(local)
    try:
        with RemoteTeacher(f"127.0.0.1:{port}") as remote:
            carried = {k: v for k, v in remote.describe().items() if k not in ("max_batch", "output_stride")}
            assert set(carried) >= {*TEACHER_INFO_KEYS, "model", "mean", "std", "numerics"}
            assert carried == {k: local.describe()[k] for k in carried}
            assert teachers.teacher_manifest([remote.describe()]) == teachers.teacher_manifest([local.describe()])
            assert_outputs_equal(remote.infer(images(4)), local.infer(images(4)))
    finally:
        stop(srv, grace=None)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_infer_fp32_is_exact(server, backend, stream):
    x = images(MAX_BATCH)
    with RemoteTeacher(server, stream=stream, max_chunk_bytes=64 * 1024) as teacher:
        got = teacher.infer(x)
    assert_outputs_equal(got, backend.infer(x))


def test_infer_half_precision_is_close(server, backend):
    x = images(8)
    with RemoteTeacher(server, half_precision=True) as teacher:
        got = teacher.infer(x)
    want = backend.infer(x)
    for field in Outputs._fields:
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == torch.float32
        # float16 keeps ~3 significant digits; errors stay well under 1% of the output's scale
        assert float((g - w).abs().max()) <= 1e-2 * float(w.abs().max()), field


def test_half_precision_halves_the_payload(stub):
    x = tensor_to_proto(images(4))
    full = stub.Infer(request(x))
    half = stub.Infer(request(x, half_precision=True))
    assert half.feature.dtype == D.DTYPE_FLOAT16
    assert len(half.feature.data) * 2 == len(full.feature.data)


def test_requested_fields_only(server, stub):
    reply = stub.Infer(request(tensor_to_proto(images(2)), fields=[teacher_pb2.OUTPUT_FIELD_LOGITS],
                               request_id="abc"))
    assert reply.HasField("logits") and not reply.HasField("feature") and not reply.HasField("embedding")
    assert reply.request_id == "abc" and reply.batch_size == 2
    with RemoteTeacher(server) as teacher:
        got = teacher.infer(images(2), fields=["logits", "embedding"])
    assert got.feature is None and got.logits.shape == (2, 10) and got.embedding is not None


def test_stream_chunks_respect_the_budget(stub):
    budget = 40_000
    chunks = list(stub.InferStream(request(tensor_to_proto(images(MAX_BATCH)), max_chunk_bytes=budget)))
    assert len(chunks) > 1
    assert all(c.ByteSize() <= budget for c in chunks)
    assert [c.batch_offset for c in chunks] == sorted({c.batch_offset for c in chunks})
    assert sum(c.logits.shape[0] for c in chunks) == MAX_BATCH


def test_feature_maps_over_4mib_stream_but_do_not_fit_one_message():
    # 64 x 14 x 14 float32 features: 50 KiB per sample, 5 MiB for 100 samples.
    big = ModelBackend(TinyNet(stride=2), "tiny-wide")
    srv, port = serve(big, max_batch=128, max_message_bytes=4 * MiB)
    x = images(100)
    want = big.infer(x)
    assert want.feature.numel() * 4 > 4 * MiB
    try:
        with RemoteTeacher(f"127.0.0.1:{port}", stream=False, max_message_bytes=4 * MiB) as teacher:
            with pytest.raises(grpc.RpcError) as err:
                teacher.infer(x)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "InferStream" in err.value.details()
            teacher.stream = True
            assert_outputs_equal(teacher.infer(x), want)
            # A request over the server's receive limit is refused by gRPC itself.
            with pytest.raises(grpc.RpcError) as err:
                teacher.infer(torch.randn(128, 1, 100, 100))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert_outputs_equal(teacher.infer(x[:3]), big.infer(x[:3]))
    finally:
        stop(srv, grace=None)


# ---------------------------------------------------------------------------
# Validation: every malformed request is INVALID_ARGUMENT with a useful message
# ---------------------------------------------------------------------------
def _good(batch: int = 2) -> tensor_pb2.Tensor:
    return tensor_to_proto(images(batch))


def _with(**changes) -> tensor_pb2.Tensor:
    msg = _good()
    for key, value in changes.items():
        if key == "shape":
            del msg.shape[:]
            msg.shape.extend(value)
        else:
            setattr(msg, key, value)
    return msg


def _nan_images() -> tensor_pb2.Tensor:
    x = images(2)
    x[1, 0, 3, 4] = float("nan")
    return tensor_to_proto(x)


MALFORMED = {
    "int64 dtype": (lambda: tensor_to_proto(torch.zeros(2, 1, 28, 28, dtype=torch.int64)),
                    "images has dtype INT64, not allowed here; expected one of FLOAT16, FLOAT32, UINT8"),
    "unknown dtype": (lambda: _with(dtype=42), "images has unknown dtype 42"),
    "unspecified dtype": (lambda: tensor_pb2.Tensor(), "images has unknown dtype UNSPECIFIED"),
    "bytes not matching shape": (lambda: _with(data=_good().data[:-4]),
                                 "images has 6268 bytes of data, expected 6272"),
    "oversized data": (lambda: _with(data=bytes(MAX_BATCH * 28 * 28 * 4 + 4)), "over the limit of 50176 bytes"),
    "batch over max_batch": (lambda: _good(MAX_BATCH + 1), "images must have batch between 1 and 16, got 17"),
    "empty batch": (lambda: _with(shape=[0, 1, 28, 28], data=b""), "images must have batch between 1 and 16, got 0"),
    "wrong channel count": (lambda: tensor_to_proto(images(2, channels=3)), "images must have 1 channels, got 3"),
    "wrong height": (lambda: _with(shape=[2, 1, 14, 56]), "images must have 28 height, got 14"),
    "wrong ndim": (lambda: _with(shape=[2, 28, 28]), "images must have 4 dimensions, got 3"),
    "negative dim": (lambda: _with(shape=[2, -1, 28, 28]), "negative dimensions"),
    "NaN input": (_nan_images, "images has 1 non-finite values"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_invalid_argument(stub, case):
    make, message = MALFORMED[case]
    for call in (stub.Infer, lambda r: list(stub.InferStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(request(make()))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
    assert stub.Infer(request(_good())).batch_size == 2  # still serving


def test_bad_fields_chunk_budget_and_request_id_are_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(request(_good(), fields=[7]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fields has unknown values [7]" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.InferStream(request(_good(), max_chunk_bytes=-1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_chunk_bytes is -1" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(request(_good(), request_id="x" * 129))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id has 129 characters, expected at most 128" in err.value.details()


def test_backend_error_is_internal_and_server_keeps_serving(stub, backend):
    backend.fail = True
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request(_good()))
    finally:
        backend.fail = False
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError: simulated backend failure" in err.value.details()
    assert stub.Infer(request(_good())).batch_size == 2


# ---------------------------------------------------------------------------
# Security and health
# ---------------------------------------------------------------------------
def _health(channel: grpc.Channel):
    return health_pb2_grpc.HealthStub(channel)


def test_token_is_required(backend):
    srv, port = serve(backend, token="s3cret")
    address = f"127.0.0.1:{port}"
    try:
        for token, message in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
            with RemoteTeacher(address, token=token) as teacher, pytest.raises(grpc.RpcError) as err:
                teacher.infer(images(1))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in err.value.details()
        with RemoteTeacher(address, token="s3cret") as teacher:
            assert_outputs_equal(teacher.infer(images(2)), backend.infer(images(2)))
        with grpc.insecure_channel(address) as channel:  # probes need no token
            reply = _health(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop(srv, grace=None)


def test_health_serving_then_not_serving_after_stop(backend):
    srv, port = serve(backend)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = _health(channel)
        for name in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopped = stop(srv, grace=2.0)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert stopped.wait(5)


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1: (cert.pem, key.pem)."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("TLS test needs the cryptography package or the openssl CLI; neither is installed")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key_path), "-out", str(cert_path),
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_token(backend, tmp_path):
    cert, key = _self_signed_cert(tmp_path)
    srv, port = serve(backend, tls_cert=cert, tls_key=key, token="s3cret")
    address = f"127.0.0.1:{port}"
    try:
        with RemoteTeacher(address, root_cert=cert, token="s3cret") as teacher:
            assert teacher.describe()["digest"] == backend.info["digest"]
            assert_outputs_equal(teacher.infer(images(2)), backend.infer(images(2)))
        with RemoteTeacher(address, token="s3cret", timeout=3) as plaintext, pytest.raises(grpc.RpcError) as err:
            plaintext.describe()
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        stop(srv, grace=None)


def test_tls_needs_cert_and_key(backend, tmp_path):
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        serve(backend, tls_cert=tmp_path / "cert.pem")


# ---------------------------------------------------------------------------
# A real checkpoint behind the server: self-describing inputs, checked outputs
# ---------------------------------------------------------------------------

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist")
REAL_MAX_BATCH = 128


@pytest.fixture(scope="module")
def real_teacher(teacher_dirs):
    from mtkd.teachers import load_teacher

    return load_teacher(teacher_dirs[0])


@pytest.fixture(scope="module")
def real_server(real_teacher):
    srv, port = serve(real_teacher, max_batch=REAL_MAX_BATCH)
    yield f"127.0.0.1:{port}"
    stop(srv, grace=None)


@pytest.fixture(scope="module")
def real_stub(real_server):
    with grpc.insecure_channel(real_server) as channel:
        yield teacher_pb2_grpc.TeacherServiceStub(channel)


def fashion_test_pixels(count: int) -> tuple[np.ndarray, np.ndarray]:
    """What a stranger would do: read the IDX files with gzip + numpy. ``[N, 1, 28, 28]`` uint8, ``[N]`` labels."""
    with gzip.open(FASHION_TEST / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FASHION_TEST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return pixels[:count], labels[:count]


def stranger_logits(address: str, pixels: np.ndarray, *, send_floats: bool = False) -> np.ndarray:
    """A client written from proto/ alone: the generated stubs and numpy, no conversion code from services/.

    It asks Describe how inputs are preprocessed, then sends raw uint8 pixels (or, with
    ``send_floats``, float32 images it normalises itself as Describe says), in batches of
    at most ``max_batch``, and decodes the float32 logits. Returns ``[N, num_classes]``.
    """
    with grpc.insecure_channel(address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        info = stub.Describe(teacher_pb2.DescribeTeacherRequest(), timeout=30)
        assert list(info.input_shape) == list(pixels.shape[1:])
        pre = info.preprocessing
        mean = np.array(pre.mean, dtype=np.float64).reshape(1, -1, 1, 1)
        std = np.array(pre.std, dtype=np.float64).reshape(1, -1, 1, 1)
        chunks = []
        for start in range(0, len(pixels), info.max_batch):
            batch = np.ascontiguousarray(pixels[start:start + info.max_batch])
            if send_floats:
                unit = (batch.astype(np.float64) - pre.pixel_min) / (pre.pixel_max - pre.pixel_min)
                x = ((unit - mean) / std).astype("<f4")
                images = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes())
            else:
                images = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=batch.shape, data=batch.tobytes())
            reply = stub.Infer(teacher_pb2.InferRequest(images=images, fields=[teacher_pb2.OUTPUT_FIELD_LOGITS]),
                               timeout=60)
            assert reply.logits.dtype == tensor_pb2.DTYPE_FLOAT32 and reply.batch_size == len(batch)
            chunks.append(np.frombuffer(reply.logits.data, dtype="<f4").reshape(list(reply.logits.shape)))
    return np.concatenate(chunks)


def in_process_logits(teacher, pixels: np.ndarray) -> np.ndarray:
    """The in-process teacher on the images as the training loader normalises them, fp32."""
    from mtkd.data import normalize

    info = teacher.describe()
    images = normalize(torch.from_numpy(pixels.copy()), info["mean"], info["std"])
    return torch.cat([teacher.infer(images[i:i + 256]).logits for i in range(0, len(images), 256)]).numpy()


def assert_serves_correctly(stub, teacher, batch: int = 4) -> None:
    """The server answers a good (uint8) request with the in-process teacher's outputs."""
    pixels, _ = fashion_test_pixels(batch)
    images = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=pixels.shape, data=pixels.tobytes())
    reply = stub.Infer(teacher_pb2.InferRequest(images=images), timeout=30)
    got = np.frombuffer(reply.logits.data, dtype="<f4").reshape(batch, -1)
    assert np.abs(got - in_process_logits(teacher, pixels)).max() <= 1e-4


def _rejected(call, message: str, code=grpc.StatusCode.INVALID_ARGUMENT) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()


def _no_traceback_logged(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def test_describe_reports_the_checkpoint_preprocessing(real_stub, real_teacher, teacher_dirs):
    info = real_stub.Describe(teacher_pb2.DescribeTeacherRequest())
    dataset = json.loads((Path(teacher_dirs[0]) / "meta.json").read_text())["dataset"]
    assert info.HasField("preprocessing")
    assert list(info.preprocessing.mean) == dataset["mean"] and list(info.preprocessing.std) == dataset["std"]
    assert (info.preprocessing.pixel_min, info.preprocessing.pixel_max) == (0.0, 255.0)
    assert info.numerics == real_teacher.describe()["numerics"] and info.max_batch == REAL_MAX_BATCH


@pytest.mark.skipif(not (FASHION_TEST / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_a_proto_only_client_classifies_raw_fashion_mnist_like_the_in_process_teacher(real_server, teacher_dirs):
    from mtkd.data import load_dataset
    from mtkd.teachers import load_teacher

    pixels, labels = fashion_test_pixels(1000)
    assert np.array_equal(pixels, load_dataset("fashion_mnist", None, "test").images[:1000].numpy())
    want = in_process_logits(load_teacher(teacher_dirs[0]), pixels)
    got_uint8 = stranger_logits(real_server, pixels)
    got_float = stranger_logits(real_server, pixels, send_floats=True)
    assert np.abs(got_uint8 - want).max() <= 1e-4  # the server normalises as the training loader does
    assert np.abs(got_float - want).max() <= 1e-4  # the float path, normalised as Describe says
    accuracy = (got_uint8.argmax(1) == labels).mean()
    assert accuracy == (want.argmax(1) == labels).mean() and accuracy > 0.15  # trained, if briefly


def test_uint8_images_are_a_quarter_of_the_bytes(real_teacher, real_stub):
    pixels, _ = fashion_test_pixels(8)
    as_uint8 = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=pixels.shape, data=pixels.tobytes())
    as_float = tensor_to_proto(torch.from_numpy(pixels.astype(np.float32)))
    assert len(as_uint8.data) * 4 == len(as_float.data)
    assert_serves_correctly(real_stub, real_teacher, batch=8)


def test_uint8_without_a_recorded_normalisation_is_failed_precondition(teacher_dirs, tmp_path, caplog):
    from mtkd.teachers import load_teacher

    folder = tmp_path / "no-stats"
    shutil.copytree(teacher_dirs[0], folder)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["dataset"]["mean"], meta["dataset"]["std"]
    (folder / "meta.json").write_text(json.dumps(meta))
    teacher = load_teacher(folder)
    srv, port = serve(teacher)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            assert not stub.Describe(teacher_pb2.DescribeTeacherRequest()).HasField("preprocessing")
            pixels, _ = fashion_test_pixels(2)
            raw = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=pixels.shape, data=pixels.tobytes())
            with caplog.at_level(logging.DEBUG):
                _rejected(lambda: stub.Infer(request(raw)), "checkpoint records no input normalisation",
                          grpc.StatusCode.FAILED_PRECONDITION)
            _no_traceback_logged(caplog)
            x = images(2)  # floats still work
            reply = stub.Infer(request(tensor_to_proto(x)))
            got = np.frombuffer(reply.logits.data, dtype="<f4").reshape(2, -1)
            assert np.array_equal(got, teacher.infer(x).logits.numpy())
        with RemoteTeacher(f"127.0.0.1:{port}") as remote:
            assert remote.describe()["mean"] is None and remote.describe()["std"] is None
    finally:
        stop(srv, grace=None)


@pytest.mark.parametrize("stream", [False, True], ids=["Infer", "InferStream"])
def test_non_finite_outputs_are_never_ok(real_teacher, real_stub, stream, caplog):
    call = (lambda r: list(real_stub.InferStream(r))) if stream else real_stub.Infer
    huge = tensor_to_proto(torch.full((2, 1, 28, 28), 3e38))  # finite pixels, NaN logits
    with caplog.at_level(logging.DEBUG):
        _rejected(lambda: call(request(huge)), "the teacher's outputs for these images are not finite (logits: 20 NaN")
        assert_serves_correctly(real_stub, real_teacher)
        _rejected(lambda: call(request(huge, half_precision=True)), "are not finite")
    _no_traceback_logged(caplog)
    assert_serves_correctly(real_stub, real_teacher)


def test_float16_overflow_on_half_precision_is_invalid_argument_without_traceback(real_teacher, real_stub, caplog):
    from mtkd.data import normalize

    pixels, _ = fashion_test_pixels(4)
    large = normalize(torch.from_numpy(pixels.copy()), (0.286,), (0.353,)) * 1e4  # outputs ~1e5: finite in fp32
    with caplog.at_level(logging.DEBUG):
        _rejected(lambda: real_stub.Infer(request(tensor_to_proto(large), half_precision=True)),
                  "half_precision: cannot send logits as float16: its largest magnitude is")
    _no_traceback_logged(caplog)
    reply = real_stub.Infer(request(tensor_to_proto(large)))  # the same images in float32 are fine
    assert np.isfinite(np.frombuffer(reply.feature.data, dtype="<f4")).all()
    assert_serves_correctly(real_stub, real_teacher)


def test_negative_chunk_budget_and_missing_images_are_invalid_argument(real_teacher, real_stub, caplog):
    good = tensor_to_proto(images(2))
    with caplog.at_level(logging.DEBUG):
        _rejected(lambda: real_stub.Infer(request(good, max_chunk_bytes=-5)), "max_chunk_bytes is -5; expected >= 0")
        assert_serves_correctly(real_stub, real_teacher)
        for call in (real_stub.Infer, lambda r: list(real_stub.InferStream(r))):
            _rejected(lambda: call(teacher_pb2.InferRequest()),
                      "images missing; expected a [B, 1, 28, 28] Tensor (1 <= B <= 128) of DTYPE_UINT8 pixels")
            assert_serves_correctly(real_stub, real_teacher)
    _no_traceback_logged(caplog)


class GatedTeacher:
    """A real teacher whose ``infer`` waits until the test opens the gate."""

    def __init__(self, teacher):
        self.teacher, self.gate, self.entered = teacher, threading.Event(), threading.Semaphore(0)

    def describe(self) -> dict:
        return self.teacher.describe()

    def infer(self, images: torch.Tensor) -> Outputs:
        self.entered.release()
        assert self.gate.wait(30)
        return self.teacher.infer(images)


def test_calls_beyond_the_concurrency_bound_get_resource_exhausted(real_teacher):
    gated = GatedTeacher(real_teacher)
    srv, port = serve(gated, max_concurrent_rpcs=2, max_workers=4)
    pixels, _ = fashion_test_pixels(2)
    raw = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=pixels.shape, data=pixels.tobytes())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            first = stub.Infer.future(request(raw), timeout=30)
            assert gated.entered.acquire(timeout=10)  # the first call holds the backend
            # Two more: one takes the second slot (and waits), the other is over the bound.
            others = [stub.Infer.future(request(raw), timeout=30) for _ in range(2)]
            deadline = time.time() + 10
            while not any(f.done() for f in others) and time.time() < deadline:
                time.sleep(0.01)
            rejected = [f for f in others if f.done()]
            assert len(rejected) == 1 and rejected[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit exceeded" in rejected[0].details()
            gated.gate.set()
            want = in_process_logits(real_teacher, pixels)
            for future in (first, *(f for f in others if f is not rejected[0])):
                got = np.frombuffer(future.result().logits.data, dtype="<f4").reshape(2, -1)
                assert np.abs(got - want).max() <= 1e-4
            assert_serves_correctly(stub, real_teacher, batch=2)
    finally:
        gated.gate.set()
        stop(srv, grace=None)
