"""Conversions between ``mtkd.v1.Tensor`` messages and torch tensors, with validation.

Tensors travel as ``{dtype, shape, data}``: raw little-endian bytes in C order. They
are decoded with ``np.frombuffer`` and copied, and checked before use: dtype, number
and sizes of dimensions, byte count, a size limit and finiteness. Nothing is ever
unpickled.

Every check failure raises :class:`InvalidMessage` (or its subclass
:class:`InvalidTensor`) with a message that says what was wrong, what was received
and what was expected; servers answer those with ``INVALID_ARGUMENT``. Encoding a
value beyond float16's range as float16 raises :class:`HalfPrecisionOverflow`.

The teacher's messages (``TeacherInfo``, ``InferResponse`` and its chunks) are
converted in :mod:`services.teacher_server.messages`, which builds on this module.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Union

import numpy as np
import torch

from mtkd.errors import UserError
from services._generated.mtkd.v1 import tensor_pb2

__all__ = [
    "HalfPrecisionOverflow",
    "InvalidMessage",
    "InvalidTensor",
    "count_non_finite",
    "decode_field",
    "proto_to_tensor",
    "tensor_to_proto",
]

Dim = Union[int, range, None]
"""One expected dimension: an exact size, a ``range`` of allowed sizes, or None (any)."""

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


def count_non_finite(msg: tensor_pb2.Tensor) -> int:
    """NaNs and infinities in a ``Tensor`` message's data (0 for integer dtypes), without decoding it.

    Raises:
        KeyError: ``msg`` has an unknown dtype (check it with :func:`proto_to_tensor` first).
    """
    torch_dtype, np_dtype = _WIRE_DTYPES[msg.dtype]
    if torch_dtype not in _EXPONENT_BITS:
        return 0
    return _count_non_finite(np.frombuffer(msg.data, dtype=np_dtype), torch_dtype)


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
