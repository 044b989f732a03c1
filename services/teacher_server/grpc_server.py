"""A teacher served over gRPC (``mtkd.v1.TeacherService``).

The servicer only translates: it validates each request, decodes it into tensors,
calls a backend, and encodes the result. The backend is any object with

* ``describe() -> dict`` with keys ``name``, ``num_classes``, ``input_shape``
  (C, H, W), ``embedding_dim``, ``feature_shape`` (K, H, W), ``digest``, and
  optionally ``logit_size`` ((h, w) of a dense teacher's logit maps at its own stride),
  ``logit_channels`` (the logits' channels when they are not ``num_classes``: ``K + 4`` for a
  CenterNet detector of K classes), and
  optionally ``model`` and ``mean``/``std`` (the input normalisation, C values each in
  ``[0, 1]`` pixel scale; without them raw ``DTYPE_UINT8`` images are refused);
* ``infer(images: Tensor[B, C, H, W] float32) -> mtkd.models.outputs.Outputs``.

Images arrive either as raw ``DTYPE_UINT8`` pixels, which the server normalises with
:func:`mtkd.data.normalize` (exactly what the training loader computes), or as floats
already normalised by the client. Outputs are checked before they are sent: NaN or
infinite outputs end the call with ``INVALID_ARGUMENT``, never OK.

Example::

    server, port = serve(backend, port=50051, token=os.environ["MTKD_TOKEN"])
    ...
    stop(server, grace=5.0)
"""
from __future__ import annotations

import math
import threading
from typing import Any, Protocol

import grpc
import torch

from mtkd.data import normalize
from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc
from services.convert import HalfPrecisionOverflow, InvalidMessage, decode_field
from services.grpc_common import (
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_MESSAGE_BYTES,
    Pem,
    RpcFailure,
    Service,
    start_server,
    stop,
    translate_errors,
)
from services.teacher_server.messages import (
    fields_from_proto,
    iter_response_chunks,
    non_finite_outputs,
    outputs_to_response,
    teacher_info_to_proto,
)

__all__ = ["SERVICE_NAME", "TeacherBackend", "TeacherServicer", "serve", "stop"]

SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name  # "mtkd.v1.TeacherService"
DEFAULT_MAX_BATCH = 256
DEFAULT_STREAM_CHUNK_BYTES = 1024 * 1024
IMAGE_DIMS = ("batch", "channels", "height", "width")
MAX_REQUEST_ID_CHARS = 128
REQUEST_FRAMING_BYTES = 1024
"""Room in a request for everything besides the image bytes (fields, request id, tags)."""


def largest_batch(input_shape: tuple[int, int, int], max_message_bytes: int) -> int:
    """The largest B whose ``[B, C, H, W]`` float32 request fits in one message of ``max_message_bytes``."""
    return (max_message_bytes - REQUEST_FRAMING_BYTES) // (4 * math.prod(input_shape))


def check_max_batch(max_batch: int | None, input_shape: tuple[int, int, int], max_message_bytes: int) -> int:
    """``max_batch``, or by default ``min(DEFAULT_MAX_BATCH, largest_batch(...))``.

    Raises:
        ValueError: ``max_batch`` < 1, or a batch of ``max_batch`` float32 images of
            ``input_shape`` would not fit in one message of ``max_message_bytes``.
    """
    fits = largest_batch(input_shape, max_message_bytes)
    if fits < 1:
        raise ValueError(f"one float32 image of shape {list(input_shape)} ({4 * math.prod(input_shape)} bytes) does "
                         f"not fit the message limit of {max_message_bytes} bytes; raise the message limit")
    if max_batch is None:
        return min(DEFAULT_MAX_BATCH, fits)
    if not 1 <= max_batch <= fits:
        raise ValueError(
            f"max_batch is {max_batch}; expected 1..{fits}: a request of B float32 images of shape "
            f"{list(input_shape)} takes {4 * math.prod(input_shape)} * B bytes, and the message limit is "
            f"{max_message_bytes} bytes (raise it for larger batches)"
        )
    return max_batch


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
        max_batch: Largest accepted batch B; a batch of float32 images must fit
            ``max_message_bytes``. None: ``min(256, the largest that fits)``.
        max_message_bytes: The server's message limit: a unary ``Infer`` response
            larger than this fails with RESOURCE_EXHAUSTED (use ``InferStream``).
        stream_chunk_bytes: Largest ``InferStream`` chunk (clients may ask for less).

    Raises:
        ValueError: ``describe()`` lacks a key or has a malformed mean/std, a limit
            is not positive, or ``max_batch`` images do not fit one message.
    """

    def __init__(
        self,
        backend: TeacherBackend,
        *,
        max_batch: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stream_chunk_bytes: int = DEFAULT_STREAM_CHUNK_BYTES,
    ) -> None:
        if min(max_message_bytes, stream_chunk_bytes) <= 0:
            raise ValueError(
                f"limits must be positive; got max_message_bytes={max_message_bytes}, "
                f"stream_chunk_bytes={stream_chunk_bytes}"
            )
        self._backend = backend
        description = backend.describe()
        input_shape = tuple(int(d) for d in description["input_shape"]) if "input_shape" in description else None
        if input_shape is None or len(input_shape) != 3:
            raise ValueError(f"teacher describe() has input_shape {description.get('input_shape')}; expected [C, H, W]")
        max_batch = check_max_batch(max_batch, input_shape, max_message_bytes)
        self._info = teacher_info_to_proto(description, max_batch=max_batch)
        known = self._info.HasField("preprocessing")
        self._mean = tuple(self._info.preprocessing.mean) if known else None
        self._std = tuple(self._info.preprocessing.std) if known else None
        self._max_message_bytes = max_message_bytes
        self._chunk_bytes = min(stream_chunk_bytes, max_message_bytes)
        c, h, w = input_shape
        self._image_spec = dict(
            allowed_dtypes=(torch.float32, torch.float16, torch.uint8),
            max_bytes=max_batch * c * h * w * 4,
            expected_shape=(range(1, max_batch + 1), c, h, w),
            dim_names=IMAGE_DIMS,
            expected=f"a [B, {c}, {h}, {w}] Tensor (1 <= B <= {max_batch}) of DTYPE_UINT8 pixels or normalised floats",
        )
        self._lock = threading.Lock()

    def _images(self, request: teacher_pb2.InferRequest) -> torch.Tensor:
        """The request's images as the backend takes them: ``[B, C, H, W]`` float32, normalised.

        Raises:
            InvalidMessage: Missing or malformed images.
            RpcFailure: FAILED_PRECONDITION for uint8 images when no normalisation is known.
        """
        images = decode_field(request, "images", **self._image_spec)
        if images.dtype != torch.uint8:
            return images.float()
        if self._mean is None:
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                "images are DTYPE_UINT8 but this teacher's checkpoint records no input normalisation (mean/std), "
                "so the server cannot normalise raw pixels; Describe's preprocessing is unset. Send float images "
                "preprocessed as the teacher was trained",
            )
        return normalize(images, self._mean, self._std)

    def _float_range_hint(self) -> str:
        """Where normalised images lie, for error messages: ``(0 - mean) / std .. (1 - mean) / std``."""
        if self._mean is None:
            return "images preprocessed as the teacher was trained"
        low = min((0.0 - m) / s for m, s in zip(self._mean, self._std))
        high = max((1.0 - m) / s for m, s in zip(self._mean, self._std))
        return (f"DTYPE_UINT8 pixels, or floats normalised with Describe's mean/std "
                f"(within {low:.3g}..{high:.3g} for this teacher)")

    def _respond(self, request: teacher_pb2.InferRequest) -> teacher_pb2.InferResponse:
        """Validate, infer, encode and check one request; the whole batch in one response.

        Raises:
            InvalidMessage: A malformed request.
            RpcFailure: INVALID_ARGUMENT for outputs that are not finite or, with
                ``half_precision``, beyond float16's range; FAILED_PRECONDITION (see
                :meth:`_images`).
        """
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidMessage(
                f"request_id has {len(request.request_id)} characters, expected at most {MAX_REQUEST_ID_CHARS}"
            )
        if request.max_chunk_bytes < 0:
            raise InvalidMessage(f"max_chunk_bytes is {request.max_chunk_bytes}; expected >= 0 (0: server default)")
        fields = fields_from_proto(request.fields)
        images = self._images(request)
        with self._lock:
            outputs = self._backend.infer(images)
        try:
            response = outputs_to_response(outputs, fields=fields, half=request.half_precision,
                                           request_id=request.request_id)
        except HalfPrecisionOverflow as err:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"half_precision: {err}; ask again without half_precision "
                             "for float32 outputs") from err
        bad = non_finite_outputs(response)
        if bad:
            counts = ", ".join(f"{field}: {n} NaN or infinite values" for field, n in bad.items())
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the teacher's outputs for these images are not finite ({counts}); the images reach "
                f"|x| = {float(images.abs().max()):.3g}. Expected {self._float_range_hint()}",
            )
        return response

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
        response = self._respond(request)  # validates max_chunk_bytes
        budget = min(request.max_chunk_bytes or self._chunk_bytes, self._chunk_bytes)
        yield from iter_response_chunks(response, budget)


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
    max_batch: int | None = None,
    stream_chunk_bytes: int = DEFAULT_STREAM_CHUNK_BYTES,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    insecure: bool = False,
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
        max_batch: Largest accepted batch (None: 256, or fewer if 256 float32
            images do not fit ``max_message_bytes``).
        stream_chunk_bytes: Largest ``InferStream`` chunk.
        max_concurrent_rpcs: Calls accepted at once; more get RESOURCE_EXHAUSTED.
        insecure: Allow plaintext on a non-loopback ``host`` (refused otherwise).

    Returns:
        ``(server, bound_port)``, started. Stop it with :func:`stop`.

    Raises:
        ValueError: A setting is invalid (see :class:`TeacherServicer` and
            :func:`services.grpc_common.start_server`).
        services.grpc_common.BindError: The address could not be bound.
    """
    servicer = TeacherServicer(backend, max_batch=max_batch, max_message_bytes=max_message_bytes,
                               stream_chunk_bytes=stream_chunk_bytes)
    return start_server(
        [Service(SERVICE_NAME, teacher_pb2_grpc.add_TeacherServiceServicer_to_server, servicer)],
        host=host, port=port, max_message_bytes=max_message_bytes, tls_cert=tls_cert,
        tls_key=tls_key, token=token, max_workers=max_workers, max_concurrent_rpcs=max_concurrent_rpcs,
        insecure=insecure,
    )
