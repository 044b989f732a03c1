"""Conversions of the ``mtkd.v1.TeacherService`` messages to and from mtkd types.

``describe()`` dicts <-> ``TeacherInfo``, output names <-> ``OutputField`` values, and
``Outputs`` <-> ``InferResponse`` (whole, or streamed in chunks along the batch). The
tensors inside travel through the generic encoding and validation of
:mod:`services.convert`; malformed messages raise its :class:`~services.convert.InvalidMessage`
(or :class:`~services.convert.InvalidTensor`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import teacher_pb2, tensor_pb2
from services.convert import InvalidMessage, count_non_finite, proto_to_tensor, tensor_to_proto

__all__ = [
    "OUTPUT_FIELDS",
    "PIXEL_MAX",
    "TEACHER_INFO_KEYS",
    "fields_from_proto",
    "fields_to_proto",
    "iter_response_chunks",
    "join_response_chunks",
    "logit_channels",
    "non_finite_outputs",
    "outputs_to_response",
    "response_to_outputs",
    "teacher_info_from_proto",
    "teacher_info_to_proto",
]

OUTPUT_FIELDS: tuple[str, ...] = Outputs._fields  # ("logits", "embedding", "feature")
TEACHER_INFO_KEYS = ("name", "num_classes", "input_shape", "embedding_dim", "feature_shape", "digest")
PIXEL_MAX = 255.0
"""Largest raw pixel value (8-bit images): ``Preprocessing.pixel_max``."""

_FIELD_TO_WIRE = {
    "logits": teacher_pb2.OUTPUT_FIELD_LOGITS,
    "embedding": teacher_pb2.OUTPUT_FIELD_EMBEDDING,
    "feature": teacher_pb2.OUTPUT_FIELD_FEATURE,
}
_WIRE_TO_FIELD = {wire: name for name, wire in _FIELD_TO_WIRE.items()}
# Upper bound of an InferResponse's bytes besides the tensors' data: per tensor the
# field tag and length, dtype and packed shape; plus offsets and the request id's framing.
_TENSOR_FRAMING_BYTES = 96
_RESPONSE_FRAMING_BYTES = 64


def _require_keys(what: str, info: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in info]
    if missing:
        raise ValueError(f"{what} lacks keys {missing}; got keys {sorted(info)}, expected {list(keys)}")


def _preprocessing_to_proto(info: Mapping[str, Any]) -> teacher_pb2.Preprocessing | None:
    """``Preprocessing`` from ``describe()``'s ``mean``/``std`` (C values each), or None if either is missing.

    Raises:
        ValueError: mean/std not one finite value per input channel, or a std <= 0.
    """
    mean, std = info.get("mean"), info.get("std")
    if mean is None or std is None:
        return None
    channels = int(info["input_shape"][0])
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"teacher describe() has {len(mean)} means and {len(std)} stds; "
                         f"expected one per input channel ({channels})")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"teacher describe() has mean {mean} and std {std}; expected finite values, std > 0")
    return teacher_pb2.Preprocessing(mean=mean, std=std, pixel_min=0.0, pixel_max=PIXEL_MAX)


def teacher_info_to_proto(info: Mapping[str, Any], *, max_batch: int) -> teacher_pb2.TeacherInfo:
    """Build ``TeacherInfo`` from a teacher backend's ``describe()`` dict.

    The optional keys ``model`` (the zoo architecture, as ``mtkd.teachers.Teacher``
    reports it), ``numerics`` (e.g. ``"cpu-fp32"``), ``mean``/``std`` (the input
    normalisation, per channel in ``[0, 1]`` pixel scale; ``preprocessing`` is left
    unset unless both are given), ``logit_size`` and ``logit_channels`` (the logits'
    channels, ``num_classes`` when absent; ``K + 4`` for a detector) are carried too.

    Raises:
        ValueError: ``info`` lacks one of :data:`TEACHER_INFO_KEYS`, its mean/std
            are not one finite value per input channel (std > 0), its ``logit_size``
            is no whole stride of the input, or ``logit_channels`` is below 1.
    """
    _require_keys("teacher describe()", info, TEACHER_INFO_KEYS)
    logit_size = _logit_size(info)
    channels = logit_channels(info)
    if channels < 1:
        raise ValueError(f"teacher describe() has logit_channels {channels}; expected >= 1")
    return teacher_pb2.TeacherInfo(
        name=str(info["name"]),
        num_classes=int(info["num_classes"]),
        logit_channels=channels,
        input_shape=[int(d) for d in info["input_shape"]],
        embedding_dim=int(info["embedding_dim"]),
        feature_shape=[int(d) for d in info["feature_shape"]],
        weights_digest=str(info["digest"]),
        max_batch=max_batch,
        model=str(info.get("model", "")),
        preprocessing=_preprocessing_to_proto(info),
        numerics=str(info.get("numerics") or ""),
        logit_size=list(logit_size),
        output_stride=int(info["input_shape"][1]) // logit_size[0] if logit_size else 0,
    )


def logit_channels(info: Mapping[str, Any]) -> int:
    """C, the channels of a teacher's logits, from its ``describe()`` dict: ``logit_channels`` when
    given (``K + 4`` for a detector of K classes), else ``num_classes`` (a classifier or a segmentation
    network, and every description written before detectors)."""
    channels = info.get("logit_channels")
    return int(info["num_classes"] if channels is None else channels)


def _logit_size(info: Mapping[str, Any]) -> tuple[int, ...]:
    """``describe()``'s ``logit_size``: ``()`` for a classifier (also when absent), ``(h, w)`` for a
    dense teacher whose map divides the input evenly.

    Raises:
        ValueError: not ``()`` or two sizes >= 1 that divide the input's height and width by one stride.
    """
    size = tuple(int(s) for s in info.get("logit_size") or ())
    if not size:
        return ()
    height, width = (int(d) for d in info["input_shape"][1:])
    if len(size) != 2 or min(size) < 1 or height % size[0] or width % size[1] or height // size[0] != width // size[1]:
        raise ValueError(f"teacher describe() has logit_size {size} for input {height}x{width}; expected () or "
                         f"(h, w) with H/h = W/w a whole stride")
    return size


def teacher_info_from_proto(msg: teacher_pb2.TeacherInfo) -> dict[str, Any]:
    """The ``describe()`` dict of a teacher backend (``model`` and ``numerics`` "" if unknown;
    ``mean`` and ``std`` tuples, None if the server knows no preprocessing; ``logit_size`` ``()`` or
    ``(h, w)``; ``logit_channels`` C, ``num_classes`` from a server that does not send it), plus
    ``max_batch`` and ``output_stride`` (0 for a classifier).

    Raises:
        InvalidMessage: ``logit_size`` is neither empty nor two sizes >= 1, or ``logit_channels`` is
            negative.
    """
    known = msg.HasField("preprocessing")
    if msg.logit_size and (len(msg.logit_size) != 2 or min(msg.logit_size) < 1):
        raise InvalidMessage(f"TeacherInfo.logit_size is {list(msg.logit_size)}; expected [] or [h, w] with h, w >= 1")
    if msg.logit_channels < 0:
        raise InvalidMessage(f"TeacherInfo.logit_channels is {msg.logit_channels}; expected >= 1 (0: num_classes)")
    return {
        "name": msg.name,
        "model": msg.model,
        "num_classes": msg.num_classes,
        "logit_channels": msg.logit_channels or msg.num_classes,  # 0: a server from before the field
        "input_shape": tuple(msg.input_shape),
        "embedding_dim": msg.embedding_dim,
        "feature_shape": tuple(msg.feature_shape),
        "digest": msg.weights_digest,
        "mean": tuple(msg.preprocessing.mean) if known else None,
        "std": tuple(msg.preprocessing.std) if known else None,
        "numerics": msg.numerics,
        "logit_size": tuple(msg.logit_size),
        "max_batch": msg.max_batch,
        "output_stride": msg.output_stride,
    }


def fields_to_proto(fields: Sequence[str] | None) -> list[int]:
    """Wire values for output names; None means all outputs (an empty list).

    Raises:
        ValueError: An unknown output name.
    """
    if fields is None:
        return []
    unknown = [f for f in fields if f not in _FIELD_TO_WIRE]
    if unknown:
        raise ValueError(f"unknown output fields {unknown}; expected a subset of {list(OUTPUT_FIELDS)}")
    return [_FIELD_TO_WIRE[f] for f in fields]


def fields_from_proto(values: Sequence[int]) -> tuple[str, ...]:
    """Output names, in ``Outputs`` order, from a request's ``fields`` (empty: all).

    Raises:
        InvalidMessage: An unknown or unspecified field value.
    """
    if not values:
        return OUTPUT_FIELDS
    unknown = [v for v in values if v not in _WIRE_TO_FIELD]
    if unknown:
        raise InvalidMessage(
            f"fields has unknown values {unknown}; expected OUTPUT_FIELD_LOGITS (1), "
            "OUTPUT_FIELD_EMBEDDING (2) or OUTPUT_FIELD_FEATURE (3)"
        )
    wanted = {_WIRE_TO_FIELD[v] for v in values}
    return tuple(f for f in OUTPUT_FIELDS if f in wanted)


def outputs_to_response(
    outputs: Outputs,
    *,
    fields: Sequence[str] = OUTPUT_FIELDS,
    half: bool = False,
    request_id: str = "",
) -> teacher_pb2.InferResponse:
    """Encode a backend's ``Outputs`` for a whole batch as one ``InferResponse``.

    Args:
        outputs: ``Outputs(logits [B, C] or [B, C, h, w], embedding [B, D], feature [B, K, H, W])``
            (a detector's ``DetectionOutputs`` alike: C = K + 4).
        fields: Which outputs to include.
        half: Send them as float16.
        request_id: Echoed to the client.

    Raises:
        HalfPrecisionOverflow: ``half`` and an output beyond float16's range (the
            message names the output).
        ValueError: An output cannot be encoded (see :func:`~services.convert.tensor_to_proto`).
    """
    response = teacher_pb2.InferResponse(
        batch_offset=0, batch_size=outputs.logits.shape[0], request_id=request_id
    )
    for field in fields:
        getattr(response, field).CopyFrom(tensor_to_proto(getattr(outputs, field), half=half, name=field))
    return response


def non_finite_outputs(response: teacher_pb2.InferResponse) -> dict[str, int]:
    """Per output present in ``response``, how many of its values are NaN or infinite (0s omitted)."""
    counts = {}
    for field in OUTPUT_FIELDS:
        if response.HasField(field):
            bad = count_non_finite(getattr(response, field))
            if bad:
                counts[field] = bad
    return counts


def iter_response_chunks(
    response: teacher_pb2.InferResponse, max_chunk_bytes: int
) -> Iterator[teacher_pb2.InferResponse]:
    """Split a whole-batch response along the batch dimension.

    Each chunk serialises to at most ``max_chunk_bytes`` bytes, except that a chunk
    always holds at least one sample. Chunks come in batch order, with
    ``batch_offset`` set; the data bytes are sliced, not re-encoded.

    Args:
        response: A response from :func:`outputs_to_response` (``batch_offset`` 0).
        max_chunk_bytes: Budget for one serialised chunk.

    Yields:
        ``InferResponse`` chunks covering samples ``[0, batch_size)``.
    """
    batch = response.batch_size
    tensors = {f: getattr(response, f) for f in OUTPUT_FIELDS if response.HasField(f)}
    row_bytes = {f: len(t.data) // batch for f, t in tensors.items()}
    framing = _RESPONSE_FRAMING_BYTES + len(response.request_id) + _TENSOR_FRAMING_BYTES * len(tensors)
    per_chunk = max(1, (max_chunk_bytes - framing) // max(1, sum(row_bytes.values())))
    if per_chunk >= batch:
        yield response  # one chunk: no copy
        return
    for start in range(0, batch, per_chunk):
        stop = min(batch, start + per_chunk)
        chunk = teacher_pb2.InferResponse(batch_offset=start, batch_size=batch, request_id=response.request_id)
        for field, t in tensors.items():
            row = row_bytes[field]
            getattr(chunk, field).CopyFrom(
                tensor_pb2.Tensor(dtype=t.dtype, shape=[stop - start, *t.shape[1:]], data=t.data[start * row : stop * row])
            )
        yield chunk


def join_response_chunks(chunks: Iterable[teacher_pb2.InferResponse]) -> teacher_pb2.InferResponse:
    """Reassemble the chunks of a streamed response into one whole-batch response.

    Raises:
        InvalidMessage: No chunks; chunks missing, out of order or overlapping; or
            chunks that disagree on batch size, outputs, dtypes or trailing shapes.
    """
    chunks = list(chunks)
    if not chunks:
        raise InvalidMessage("stream ended with no chunks; expected at least one")

    def layout(chunk: teacher_pb2.InferResponse) -> list[tuple[str, int, tuple[int, ...]]]:
        return [(f, getattr(chunk, f).dtype, tuple(getattr(chunk, f).shape[1:]))
                for f in OUTPUT_FIELDS if chunk.HasField(f)]

    first, batch, offset = chunks[0], chunks[0].batch_size, 0
    for chunk in chunks:
        rows = {getattr(chunk, f).shape[0] if getattr(chunk, f).shape else -1 for f, _, _ in layout(chunk)}
        if chunk.batch_offset != offset or chunk.batch_size != batch or len(rows) != 1 or -1 in rows:
            raise InvalidMessage(
                f"stream chunk has batch_offset {chunk.batch_offset}, batch_size {chunk.batch_size} and "
                f"rows {sorted(rows)}; expected offset {offset}, batch_size {batch} and one row count"
            )
        if layout(chunk) != layout(first):
            raise InvalidMessage(
                f"stream chunk carries (output, dtype, trailing shape) {layout(chunk)}; expected {layout(first)}"
            )
        offset += rows.pop()
    if offset != batch:
        raise InvalidMessage(f"stream ended after {offset} samples; expected {batch}")
    if len(chunks) == 1:
        return first  # already whole: no copy
    joined = teacher_pb2.InferResponse(batch_offset=0, batch_size=batch, request_id=first.request_id)
    for field, dtype, trailing in layout(first):
        data = b"".join(getattr(chunk, field).data for chunk in chunks)
        getattr(joined, field).CopyFrom(tensor_pb2.Tensor(dtype=dtype, shape=[batch, *trailing], data=data))
    return joined


def response_to_outputs(
    msg: teacher_pb2.InferResponse,
    *,
    batch: int,
    info: Mapping[str, Any],
    fields: Sequence[str] = OUTPUT_FIELDS,
) -> Outputs:
    """Decode and validate a whole-batch response into float32 ``Outputs``.

    Args:
        msg: A whole-batch response (from ``Infer`` or :func:`join_response_chunks`).
        batch: B, the request's batch size.
        info: The teacher's ``describe()`` dict (gives C (:func:`logit_channels`), D, [K, H, W]
            and, for a dense teacher, ``logit_size`` (h, w): logits ``[B, C, h, w]``).
        fields: The outputs requested; the others are None in the result.

    Raises:
        InvalidMessage: A requested output is missing, malformed or of a wrong shape.
    """
    shapes = {
        "logits": (batch, logit_channels(info), *info.get("logit_size", ())),
        "embedding": (batch, info["embedding_dim"]),
        "feature": (batch, *info["feature_shape"]),
    }
    decoded: dict[str, torch.Tensor | None] = dict.fromkeys(OUTPUT_FIELDS)
    for field in fields:
        if not msg.HasField(field):
            raise InvalidMessage(f"response lacks {field}; expected {list(fields)}")
        decoded[field] = proto_to_tensor(
            getattr(msg, field),
            allowed_dtypes=(torch.float32, torch.float16),
            max_bytes=math.prod(shapes[field]) * 4,
            expected_shape=shapes[field],
            name=field,
        ).float()
    return Outputs(**decoded)
