"""TeacherService over real gRPC on loopback: round trips, streaming, validation, security, health."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc, tensor_pb2
from services.convert import tensor_to_proto
from services.teacher_server.grpc_client import RemoteTeacher
from services.teacher_server.grpc_server import SERVICE_NAME, serve, stop

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
            assert {k: v for k, v in remote.describe().items() if k != "max_batch"} == local.describe()
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
                    "images has dtype INT64, not allowed here; expected one of FLOAT16, FLOAT32"),
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
