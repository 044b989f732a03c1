"""``RemoteTeacher``: a teacher behind a gRPC server, usable wherever a local one is.

It has the teacher backend's duck type (``describe()``, ``infer(images) -> Outputs``)
and returns float32 CPU tensors whatever travelled on the wire.

Example::

    with RemoteTeacher("10.0.0.5:50051", token=token, root_cert="ca.pem") as teacher:
        outputs = teacher.infer(images)      # Outputs(logits, embedding, feature)
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import torch

from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc
from services.convert import InvalidMessage, tensor_to_proto
from services.grpc_common import DEFAULT_MAX_MESSAGE_BYTES, Pem, auth_metadata, open_channel
from services.teacher_server.messages import (
    OUTPUT_FIELDS,
    fields_to_proto,
    join_response_chunks,
    response_to_outputs,
    teacher_info_from_proto,
)

__all__ = ["RemoteTeacher"]


class RemoteTeacher:
    """Client of ``mtkd.v1.TeacherService``.

    Args:
        address: ``host:port`` of the server.
        token: Bearer token, if the server requires one.
        root_cert: PEM (path or bytes) of the CA or self-signed certificate that
            signed the server's; enables TLS.
        half_precision: Send images and receive outputs as float16 (half the bytes,
            about 3 significant digits); results are still float32 tensors.
        stream: Use ``InferStream`` (chunked; no size limit) instead of ``Infer``.
        timeout: Deadline of each call, in seconds.
        max_message_bytes: Largest message sent or received.
        max_chunk_bytes: Chunk size asked of ``InferStream`` (0: the server's default).

    Errors of the server arrive as ``grpc.RpcError`` (``code()``, ``details()``);
    a malformed response raises :class:`~services.convert.InvalidMessage`.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        root_cert: Pem | None = None,
        half_precision: bool = False,
        stream: bool = True,
        timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_chunk_bytes: int = 0,
    ) -> None:
        self.address = address
        self.half_precision = half_precision
        self.stream = stream
        self.timeout = timeout
        self.max_chunk_bytes = max_chunk_bytes
        self._metadata = auth_metadata(token)
        self._channel = open_channel(address, root_cert=root_cert, max_message_bytes=max_message_bytes)
        self._stub = teacher_pb2_grpc.TeacherServiceStub(self._channel)
        self._info: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """The teacher's ``describe()`` dict (fetched once), plus the server's ``max_batch``."""
        if self._info is None:
            reply = self._stub.Describe(teacher_pb2.DescribeTeacherRequest(),
                                        timeout=self.timeout, metadata=self._metadata)
            self._info = teacher_info_from_proto(reply)
        return dict(self._info)

    def infer(self, images: torch.Tensor, *, fields: Sequence[str] | None = None,
              half_precision: bool | None = None) -> Outputs:
        """Teacher outputs for a batch.

        Args:
            images: ``[B, C, H, W]``, 1 <= B <= ``describe()["max_batch"]``: uint8 raw
                pixels (the server normalises them; a quarter of float32's bytes; refused
                with FAILED_PRECONDITION when ``describe()["mean"]`` is None), or float
                images already normalised with ``describe()``'s ``mean``/``std``.
            fields: Outputs wanted (names of ``Outputs`` fields); None: all. The
                others are None in the result.
            half_precision: this call's float16 on the wire (None: the client's setting).

        Returns:
            ``Outputs(logits [B, C] (or [B, C, h, w] from a dense teacher, ``describe()["logit_size"]``),
            embedding [B, D], feature [B, K, H, W])``, float32; C is ``describe()["logit_channels"]``
            (``K + 4`` from a detector, whose outputs read with ``mtkd.detection.models.split_logits``).
        """
        info = self.describe()
        half = self.half_precision if half_precision is None else bool(half_precision)
        request = teacher_pb2.InferRequest(
            images=tensor_to_proto(images, half=half),
            fields=fields_to_proto(fields),
            half_precision=half,
            request_id=uuid.uuid4().hex,
            max_chunk_bytes=self.max_chunk_bytes,
        )
        call = dict(timeout=self.timeout, metadata=self._metadata)
        if self.stream:
            response = join_response_chunks(self._stub.InferStream(request, **call))
        else:
            response = self._stub.Infer(request, **call)
        if response.request_id != request.request_id:
            raise InvalidMessage(f"response has request_id {response.request_id!r}, expected {request.request_id!r}")
        return response_to_outputs(response, batch=images.shape[0], info=info, fields=fields or OUTPUT_FIELDS)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteTeacher({self.address!r}, half_precision={self.half_precision}, stream={self.stream})"
