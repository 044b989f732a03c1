"""Conversions between the wire messages of ``proto/mtkd/v1`` and torch / mtkd types.

Tensors travel as ``{dtype, shape, data}``: raw little-endian bytes in C order. They
are decoded with ``np.frombuffer`` and copied, and checked before use: dtype, number
and sizes of dimensions, byte count, a size limit and finiteness. Nothing is ever
unpickled.

Every check failure raises :class:`InvalidMessage` (or its subclass
:class:`InvalidTensor`) with a message that says what was wrong, what was received
and what was expected; servers answer those with ``INVALID_ARGUMENT``. Encoding a
value beyond float16's range as float16 raises :class:`HalfPrecisionOverflow`.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from mtkd.errors import UserError
from mtkd.models.outputs import Outputs
from services._generated.mtkd.v1 import teacher_pb2, tensor_pb2

__all__ = [
    "OUTPUT_FIELDS",
    "PIXEL_MAX",
    "TEACHER_INFO_KEYS",
    "HalfPrecisionOverflow",
    "InvalidMessage",
    "InvalidTensor",
    "decode_field",
    "fields_from_proto",
    "fields_to_proto",
    "iter_response_chunks",
    "join_response_chunks",
    "non_finite_outputs",
    "outputs_to_response",
    "proto_to_tensor",
    "response_to_outputs",
    "teacher_info_from_proto",
    "teacher_info_to_proto",
    "tensor_to_proto",
]

Dim = Union[int, range, None]
"""One expected dimension: an exact size, a ``range`` of allowed sizes, or None (any)."""

OUTPUT_FIELDS: tuple[str, ...] = Outputs._fields  # ("logits", "embedding", "feature")
TEACHER_INFO_KEYS = ("name", "num_classes", "input_shape", "embedding_dim", "feature_shape", "digest")
PIXEL_MAX = 255.0
"""Largest raw pixel value (8-bit images): ``Preprocessing.pixel_max``."""

_D = tensor_pb2.DType
# wire dtype -> (torch dtype, numpy dtype of the raw little-endian bytes)
_WIRE_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    _D.DTYPE_FLOAT32: (torch.float32, np.dtype("<f4")),
    _D.DTYPE_FLOAT16: (torch.float16, np.dtype("<f2")),
    _D.DTYPE_BFLOAT16: (torch.bfloat16, np.dtype("<i2")),  # numpy has no bfloat16: bit pattern as int16
    _D.DTYPE_INT64: (torch.int64, np.dtype("<i8")),
    _D.DTYPE_UINT8: (torch.uint8, np.dtype("u1")),
}
_TORCH_TO_WIRE = {torch_dtype: wire for wire, (torch_dtype, _) in _WIRE_DTYPES.items()}
# Float formats: (unsigned view, exponent mask). All exponent bits set = NaN or infinity.
# Testing the bits in numpy is one cheap single-threaded pass for every float format.
_EXPONENT_BITS: dict[torch.dtype, tuple[np.dtype, int]] = {
    torch.float32: (np.dtype("<u4"), 0x7F800000),
    torch.float16: (np.dtype("<u2"), 0x7C00),
    torch.bfloat16: (np.dtype("<u2"), 0x7F80),
}
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


class InvalidMessage(ValueError):
    """A message from the network is malformed or violates a limit."""


class InvalidTensor(InvalidMessage):
    """A ``Tensor`` message is malformed, of a wrong dtype or shape, or too large."""


class HalfPrecisionOverflow(UserError, ValueError):
    """Finite values beyond float16's range (65504) cannot be sent as float16."""


def _count_non_finite(wire_array: np.ndarray, dtype: torch.dtype) -> int:
    """NaNs and infinities in an array holding ``dtype`` values in their wire layout."""
    unsigned, mask = _EXPONENT_BITS[dtype]
    return int(np.count_nonzero((wire_array.view(unsigned) & mask) == mask))


def _dtype_label(wire: int) -> str:
    name = _D.Name(wire) if wire in _D.values() else str(wire)
    return name.removeprefix("DTYPE_")


def _dtype_labels(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(sorted(_dtype_label(_TORCH_TO_WIRE[d]) for d in dtypes))


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------
def tensor_to_proto(t: torch.Tensor, *, half: bool = False, name: str = "a tensor") -> tensor_pb2.Tensor:
    """Encode a tensor as a ``Tensor`` message (little-endian, C order).

    Args:
        t: Any-shaped tensor of dtype float32, float16, bfloat16, int64 or uint8, on
            any device (it is copied to the CPU).
        half: Send floating-point tensors as float16 (half the bytes). Integer
            tensors are unaffected.
        name: What the tensor is, for error messages.

    Returns:
        The ``mtkd.v1.Tensor`` message.

    Raises:
        ValueError: The dtype has no wire encoding.
        HalfPrecisionOverflow: ``half`` would turn finite values into infinities
            (magnitudes above float16's 65504). (Encoding local data is not a
            malformed message, hence not :class:`InvalidTensor`.)
    """
    source = t.detach()
    to_half = half and source.is_floating_point() and source.dtype != torch.float16
    t = source.to(torch.float16) if to_half else source
    wire = _TORCH_TO_WIRE.get(t.dtype)
    if wire is None:
        raise ValueError(f"cannot send dtype {t.dtype}; expected one of {_dtype_labels(_TORCH_TO_WIRE)}")
    shape = list(t.shape)
    t = t.cpu().contiguous()
    array = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    array = array.numpy().astype(_WIRE_DTYPES[wire][1], copy=False)
    if to_half and _count_non_finite(array, torch.float16) and torch.isfinite(source).all():
        raise HalfPrecisionOverflow(
            f"cannot send {name} as float16: its largest magnitude is "
            f"{source.abs().max().item():.4g}, expected at most 65504"
        )
    data = array.tobytes()
    return tensor_pb2.Tensor(dtype=wire, shape=shape, data=data)


def _render_dim(dim: Dim) -> str:
    if dim is None:
        return "*"
    if isinstance(dim, range):
        return f"{dim.start}..{dim.stop - 1}"
    return str(dim)


def _check_shape(
    name: str,
    shape: tuple[int, ...],
    expected_ndim: int | None,
    expected_shape: Sequence[Dim] | None,
    dim_names: Sequence[str] | None,
) -> None:
    if expected_shape is not None:
        expected_ndim = len(expected_shape)
    if expected_ndim is not None and len(shape) != expected_ndim:
        raise InvalidTensor(
            f"{name} must have {expected_ndim} dimensions, got {len(shape)} (shape {list(shape)})"
        )
    if expected_shape is None:
        return
    context = f" (shape {list(shape)}, expected [{', '.join(_render_dim(d) for d in expected_shape)}])"
    for i, (got, want) in enumerate(zip(shape, expected_shape)):
        if isinstance(want, range) and got not in want:
            what = dim_names[i] if dim_names else f"size in dimension {i}"
            raise InvalidTensor(
                f"{name} must have {what} between {want.start} and {want.stop - 1}, got {got}{context}"
            )
        if isinstance(want, int) and got != want:
            what = f"{want} {dim_names[i]}" if dim_names else f"size {want} in dimension {i}"
            raise InvalidTensor(f"{name} must have {what}, got {got}{context}")


def proto_to_tensor(
    msg: tensor_pb2.Tensor,
    *,
    allowed_dtypes: Collection[torch.dtype],
    max_bytes: int,
    expected_ndim: int | None = None,
    expected_shape: Sequence[Dim] | None = None,
    name: str = "tensor",
    dim_names: Sequence[str] | None = None,
    require_finite: bool = True,
) -> torch.Tensor:
    """Decode and validate a ``Tensor`` message (``np.frombuffer`` + copy; never pickle).

    Args:
        msg: The ``mtkd.v1.Tensor`` message.
        allowed_dtypes: torch dtypes accepted here.
        max_bytes: Largest accepted ``len(msg.data)``.
        expected_ndim: Required number of dimensions (implied by ``expected_shape``).
        expected_shape: Per dimension an exact size, a ``range`` of allowed sizes or
            None (any size).
        name: What the tensor is, for error messages (e.g. ``"images"``).
        dim_names: Names of the dimensions for error messages, e.g.
            ``("batch", "channels", "height", "width")``.
        require_finite: Reject NaN and infinities in floating-point tensors.

    Returns:
        A new CPU tensor (writable, owning its memory) of the message's dtype and shape.

    Raises:
        InvalidTensor: With what was wrong, what was received and what was expected,
            e.g. ``images must have 1 channels, got 3 (shape [4, 3, 28, 28], expected
            [1..256, 1, 28, 28])``.
    """
    entry = _WIRE_DTYPES.get(msg.dtype)
    if entry is None:
        raise InvalidTensor(
            f"{name} has unknown dtype {_dtype_label(msg.dtype)}; expected one of {_dtype_labels(allowed_dtypes)}"
        )
    torch_dtype, np_dtype = entry
    if torch_dtype not in allowed_dtypes:
        raise InvalidTensor(
            f"{name} has dtype {_dtype_label(msg.dtype)}, not allowed here; "
            f"expected one of {_dtype_labels(allowed_dtypes)}"
        )
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidTensor(f"{name} has negative dimensions in shape {list(shape)}; expected sizes >= 0")
    _check_shape(name, shape, expected_ndim, expected_shape, dim_names)
    if len(msg.data) > max_bytes:
        raise InvalidTensor(f"{name} has {len(msg.data)} bytes of data, over the limit of {max_bytes} bytes")
    want_bytes = math.prod(shape) * np_dtype.itemsize
    if len(msg.data) != want_bytes:
        raise InvalidTensor(
            f"{name} has {len(msg.data)} bytes of data, expected {want_bytes} "
            f"(shape {list(shape)} x {np_dtype.itemsize} bytes per {_dtype_label(msg.dtype)})"
        )
    wire_array = np.frombuffer(msg.data, dtype=np_dtype).reshape(shape)
    if require_finite and torch_dtype in _EXPONENT_BITS:
        bad = _count_non_finite(wire_array, torch_dtype)
        if bad:
            raise InvalidTensor(f"{name} has {bad} non-finite values (NaN or infinity); expected finite values")
    tensor = torch.from_numpy(wire_array.astype(np_dtype.newbyteorder("=")))  # a copy in native order
    return tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor


def decode_field(parent: Any, field: str, *, expected: str, **spec: Any) -> torch.Tensor:
    """Decode the required ``Tensor`` field ``field`` of message ``parent``.

    Args:
        parent: A request message, e.g. an ``InferRequest``.
        field: Name of its ``Tensor`` field, e.g. ``"images"``; also the name in errors.
        expected: What the field should hold, for the error when it is missing, e.g.
            ``"a [B, 1, 28, 28] Tensor"``.
        **spec: The keyword arguments of :func:`proto_to_tensor` (``name`` excepted).

    Raises:
        InvalidMessage: The field is unset (``images missing; expected ...``).
        InvalidTensor: See :func:`proto_to_tensor`.
    """
    if not parent.HasField(field):
        raise InvalidMessage(f"{field} missing; expected {expected}")
    return proto_to_tensor(getattr(parent, field), name=field, **spec)


# ---------------------------------------------------------------------------
# Teacher: descriptions, requested fields, Outputs <-> InferResponse
# ---------------------------------------------------------------------------
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
    reports it), ``numerics`` (e.g. ``"cpu-fp32"``) and ``mean``/``std`` (the input
    normalisation, per channel in ``[0, 1]`` pixel scale; ``preprocessing`` is left
    unset unless both are given) are carried too.

    Raises:
        ValueError: ``info`` lacks one of :data:`TEACHER_INFO_KEYS`, or its mean/std
            are not one finite value per input channel (std > 0).
    """
    _require_keys("teacher describe()", info, TEACHER_INFO_KEYS)
    return teacher_pb2.TeacherInfo(
        name=str(info["name"]),
        num_classes=int(info["num_classes"]),
        input_shape=[int(d) for d in info["input_shape"]],
        embedding_dim=int(info["embedding_dim"]),
        feature_shape=[int(d) for d in info["feature_shape"]],
        weights_digest=str(info["digest"]),
        max_batch=max_batch,
        model=str(info.get("model", "")),
        preprocessing=_preprocessing_to_proto(info),
        numerics=str(info.get("numerics") or ""),
    )


def teacher_info_from_proto(msg: teacher_pb2.TeacherInfo) -> dict[str, Any]:
    """The ``describe()`` dict of a teacher backend (``model`` and ``numerics`` "" if unknown;
    ``mean`` and ``std`` tuples, None if the server knows no preprocessing), plus ``max_batch``."""
    known = msg.HasField("preprocessing")
    return {
        "name": msg.name,
        "model": msg.model,
        "num_classes": msg.num_classes,
        "input_shape": tuple(msg.input_shape),
        "embedding_dim": msg.embedding_dim,
        "feature_shape": tuple(msg.feature_shape),
        "digest": msg.weights_digest,
        "mean": tuple(msg.preprocessing.mean) if known else None,
        "std": tuple(msg.preprocessing.std) if known else None,
        "numerics": msg.numerics,
        "max_batch": msg.max_batch,
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
        outputs: ``Outputs(logits [B, C], embedding [B, D], feature [B, K, H, W])``.
        fields: Which outputs to include.
        half: Send them as float16.
        request_id: Echoed to the client.

    Raises:
        HalfPrecisionOverflow: ``half`` and an output beyond float16's range (the
            message names the output).
        ValueError: An output cannot be encoded (see :func:`tensor_to_proto`).
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
            t = getattr(response, field)
            torch_dtype, np_dtype = _WIRE_DTYPES[t.dtype]
            if torch_dtype in _EXPONENT_BITS:
                bad = _count_non_finite(np.frombuffer(t.data, dtype=np_dtype), torch_dtype)
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
        info: The teacher's ``describe()`` dict (gives C, D and [K, H, W]).
        fields: The outputs requested; the others are None in the result.

    Raises:
        InvalidMessage: A requested output is missing, malformed or of a wrong shape.
    """
    shapes = {
        "logits": (batch, info["num_classes"]),
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
