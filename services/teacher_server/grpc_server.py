"""A teacher served over gRPC (``mtkd.v1.TeacherService``).

The servicer only translates: it validates each request, decodes it into tensors,
calls a backend, and encodes the result. The backend is any object with

* ``describe() -> dict`` with keys ``name``, ``num_classes``, ``input_shape``
  (C, H, W), ``embedding_dim``, ``feature_shape`` (K, H, W), ``digest``;
* ``infer(images: Tensor[B, C, H, W] float32) -> mtkd.models.outputs.Outputs``.

Example::

    server, port = serve(backend, port=50051, token=os.environ["MTKD_TOKEN"])
    ...
    stop(server, grace=5.0)
"""
from __future__ import annotations

import threading
from typing import Any, Protocol

import grpc
import torch

from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc
from services.convert import (
    InvalidMessage,
    fields_from_proto,
    iter_response_chunks,
    outputs_to_response,
    proto_to_tensor,
    teacher_info_to_proto,
)
from services.grpc_common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Pem,
    RpcFailure,
    Service,
    start_server,
    stop,
    translate_errors,
)

__all__ = ["SERVICE_NAME", "TeacherBackend", "TeacherServicer", "serve", "stop"]

SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name  # "mtkd.v1.TeacherService"
DEFAULT_MAX_BATCH = 256
DEFAULT_STREAM_CHUNK_BYTES = 1024 * 1024
IMAGE_DIMS = ("batch", "channels", "height", "width")
MAX_REQUEST_ID_CHARS = 128


class TeacherBackend(Protocol):
    """What a :class:`TeacherServicer` calls (a local teacher or a RemoteTeacher)."""

    def describe(self) -> dict[str, Any]: ...

    def infer(self, images: torch.Tensor) -> Outputs: ...


class TeacherServicer(teacher_pb2_grpc.TeacherServiceServicer):
    """Translates ``TeacherService`` calls to a backend; holds no model logic.

    Backend calls are serialised (one at a time, like a Ray actor's methods);
    decoding and encoding run outside that lock.

    Args:
        backend: See the module docstring. ``describe()`` is called once, here.
        max_batch: Largest accepted batch B.
        max_message_bytes: The server's message limit: a unary ``Infer`` response
            larger than this fails with RESOURCE_EXHAUSTED (use ``InferStream``).
        stream_chunk_bytes: Largest ``InferStream`` chunk (clients may ask for less).

    Raises:
        ValueError: ``describe()`` lacks a key, or a limit is not positive.
    """

    def __init__(
        self,
        backend: TeacherBackend,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stream_chunk_bytes: int = DEFAULT_STREAM_CHUNK_BYTES,
    ) -> None:
        if min(max_batch, max_message_bytes, stream_chunk_bytes) <= 0:
            raise ValueError(
                f"limits must be positive; got max_batch={max_batch}, "
                f"max_message_bytes={max_message_bytes}, stream_chunk_bytes={stream_chunk_bytes}"
            )
        self._backend = backend
        self._info = teacher_info_to_proto(backend.describe(), max_batch=max_batch)
        self._max_message_bytes = max_message_bytes
        self._chunk_bytes = min(stream_chunk_bytes, max_message_bytes)
        c, h, w = self._info.input_shape
        self._image_spec = dict(
            allowed_dtypes=(torch.float32, torch.float16),
            max_bytes=max_batch * c * h * w * 4,
            expected_shape=(range(1, max_batch + 1), c, h, w),
            name="images",
            dim_names=IMAGE_DIMS,
        )
        self._lock = threading.Lock()

    def _respond(self, request: teacher_pb2.InferRequest) -> teacher_pb2.InferResponse:
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidMessage(
                f"request_id has {len(request.request_id)} characters, expected at most {MAX_REQUEST_ID_CHARS}"
            )
        fields = fields_from_proto(request.fields)
        images = proto_to_tensor(request.images, **self._image_spec).float()
        with self._lock:
            outputs = self._backend.infer(images)
        return outputs_to_response(outputs, fields=fields, half=request.half_precision,
                                   request_id=request.request_id)

    @translate_errors
    def Describe(self, request, context):
        return self._info

    @translate_errors
    def Infer(self, request, context):
        response = self._respond(request)
        size = response.ByteSize()
        if size > self._max_message_bytes:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"response is {size} bytes, over the server's message limit of {self._max_message_bytes} "
                "bytes; use InferStream, half_precision or a smaller batch",
            )
        return response

    @translate_errors
    def InferStream(self, request, context):
        if request.max_chunk_bytes < 0:
            raise InvalidMessage(f"max_chunk_bytes is {request.max_chunk_bytes}; expected >= 0 (0: server default)")
        budget = min(request.max_chunk_bytes or self._chunk_bytes, self._chunk_bytes)
        yield from iter_response_chunks(self._respond(request), budget)


def serve(
    backend: TeacherBackend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls_cert: Pem | None = None,
    tls_key: Pem | None = None,
    token: str | None = None,
    max_workers: int = 4,
    max_batch: int = DEFAULT_MAX_BATCH,
    stream_chunk_bytes: int = DEFAULT_STREAM_CHUNK_BYTES,
) -> tuple[grpc.Server, int]:
    """Serve ``backend`` as ``mtkd.v1.TeacherService`` with health checking.

    Args:
        backend: See the module docstring.
        host: Interface to bind; loopback unless told otherwise.
        port: TCP port; 0 picks a free one.
        max_message_bytes: Largest message sent or received.
        tls_cert: Server certificate chain (PEM path or bytes); TLS with ``tls_key``.
        tls_key: Server private key (PEM path or bytes).
        token: Require metadata ``authorization: Bearer <token>`` (health exempt).
        max_workers: Threads serving calls.
        max_batch: Largest accepted batch.
        stream_chunk_bytes: Largest ``InferStream`` chunk.

    Returns:
        ``(server, bound_port)``, started. Stop it with :func:`stop`.
    """
    servicer = TeacherServicer(backend, max_batch=max_batch, max_message_bytes=max_message_bytes,
                               stream_chunk_bytes=stream_chunk_bytes)
    return start_server(
        [Service(SERVICE_NAME, teacher_pb2_grpc.add_TeacherServiceServicer_to_server, servicer)],
        host=host, port=port, max_message_bytes=max_message_bytes, tls_cert=tls_cert,
        tls_key=tls_key, token=token, max_workers=max_workers,
    )
