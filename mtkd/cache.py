"""A content-addressed cache of teacher outputs, whatever stores it (``services.cache.RedisStore``
over Redis; :class:`MemoryStore` in process).

Keys (:func:`sample_keys`): one per sample, ``mtkd:t1:<context>:<index>:<sy>:<sx>:<flip>``, where
``context`` is a hash of the teacher's weights digest, the dataset digest, a numerics tag (where and
in which precision the teacher computes, e.g. ``cpu-bf16``) and the stored dtype; ``index`` is the
sample's index in the dataset and ``sy, sx, flip`` the crop shift (``dy - crop_padding``, ...) and
flip that were applied. A shifted crop of a zero-padded image does not depend on the padding, so
the key does not either; the identity augmentation and no augmentation share a key.

Values (:func:`encode_samples`): per sample, a 4-byte header (``b"MK"``, format version, dtype code)
then the raw little-endian bytes of ``logits [C]``, ``embedding [D]`` and ``feature [K*H*W]`` in
the stored dtype (float32, float16 or bfloat16). Never pickle. A value read back is checked
(length and header) before use: a corrupt or foreign value is a miss.

:class:`TeacherOutputCache` puts one teacher in front of a store. The numbers it returns are the
same whether the store is warm, cold, failing or absent: on a miss it returns the computed outputs
exactly as they will read back (rounded to the stored dtype; with float32, or with the teacher's own
16-bit output dtype, that rounding is the identity).
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from mtkd.data.augment import AugmentParams
from mtkd.models.outputs import Outputs

log = logging.getLogger(__name__)

KEY_PREFIX = "mtkd:t1"
VALUE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                         "bfloat16": torch.bfloat16}
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
FORMAT_VERSION = 1
HEADER_BYTES = 4


@runtime_checkable
class OutputStore(Protocol):
    """Where encoded outputs live: a key-value store of ``bytes`` (``services.cache.RedisStore``)."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in order, None where a key is absent."""
        ...

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Store every ``key: value`` of ``items``."""
        ...

    def used_bytes(self) -> int | None:
        """Memory the store uses now, if known."""
        ...


class MemoryStore:
    """An :class:`OutputStore` in a dict of this process (tests, single-process runs); unbounded."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.values.get(k) for k in keys]

    def put_many(self, items: Mapping[str, bytes]) -> None:
        self.values.update(items)

    def used_bytes(self) -> int | None:
        return sum(len(k) + len(v) for k, v in self.values.items())


# ------------------------------------------------------------------------------------- dtypes
def as_value_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` or the torch dtype -> the torch dtype (checked)."""
    resolved = VALUE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in _DTYPE_CODES:
        raise ValueError(f"value dtype {dtype!r}; expected one of {', '.join(VALUE_DTYPES)}")
    return resolved


def dtype_name(dtype: str | torch.dtype) -> str:
    """The stored dtype's name as in keys: ``float32``, ``float16`` or ``bfloat16``."""
    return str(as_value_dtype(dtype)).removeprefix("torch.")


def resolve_value_dtype(setting: str, output_dtype: torch.dtype) -> torch.dtype:
    """The dtype to store a teacher's outputs in.

    Args:
        setting: ``cache.value_dtype``: ``auto`` (the teacher's own output dtype: lossless),
            ``float32``, ``float16`` or ``bfloat16``.
        output_dtype: the dtype the teacher computes its outputs in (``Teacher.infer_raw``):
            float32 for an fp32 teacher, bfloat16/float16 under reduced precision.
    """
    return as_value_dtype(output_dtype if setting == "auto" else setting)


# --------------------------------------------------------------------------------------- keys
def sample_keys(teacher_digest: str, dataset_digest: str, numerics: str, value_dtype: str | torch.dtype,
                sample_index: torch.Tensor, augment: AugmentParams | None, crop_padding: int) -> list[str]:
    """One cache key per sample of a batch.

    Args:
        teacher_digest: the teacher's weights digest (``describe()["digest"]``).
        dataset_digest: the dataset's content digest (``ImageDataset.digest``), plus anything else
            that changes the images the teacher sees (e.g. its input normalisation).
        numerics: how the teacher computes (``describe()["numerics"]``, e.g. ``cpu-bf16``).
        value_dtype: the stored dtype (``float32``, ``float16``, ``bfloat16``).
        sample_index: ``[B]`` int64 dataset indices (``Batch.sample_index``).
        augment: ``AugmentParams`` of ``[B]`` tensors (``Batch.augment``), or None without augmentation.
        crop_padding: the padding ``augment``'s offsets refer to.

    Returns:
        B strings; equal inputs give equal keys, any difference gives a different key.
    """
    name = dtype_name(value_dtype)
    if sample_index.dim() != 1 or sample_index.dtype.is_floating_point or sample_index.dtype == torch.bool:
        raise ValueError(f"sample_keys: sample_index is {sample_index.dtype} {list(sample_index.shape)}; "
                         f"expected int64 [B]")
    b = sample_index.shape[0]
    index = sample_index.to("cpu", torch.int64)
    if augment is None:
        shifts = torch.zeros(b, 3, dtype=torch.int64)
    else:
        shapes = [list(t.shape) for t in augment]
        if any(s != [b] for s in shapes):
            raise ValueError(f"sample_keys: augment tensors of shapes {shapes}; expected [{b}] each (one per sample)")
        sy = augment.dy.to("cpu", torch.int64) - crop_padding
        sx = augment.dx.to("cpu", torch.int64) - crop_padding
        if b and int(torch.maximum(sy.abs(), sx.abs()).max()) > crop_padding:
            raise ValueError(f"sample_keys: crop offsets outside [0, {2 * crop_padding}]; they must refer to "
                             f"crop_padding={crop_padding}")
        shifts = torch.stack([sy, sx, augment.flip.to("cpu", torch.int64)], 1)
    context = hashlib.sha256(repr((str(teacher_digest), str(dataset_digest), str(numerics), name)).encode())
    head = f"{KEY_PREFIX}:{context.hexdigest()[:20]}"
    rows = torch.cat([index[:, None], shifts], 1).tolist()
    return [f"{head}:{i}:{y}:{x}:{f}" for i, y, x, f in rows]


# -------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class OutputLayout:
    """The per-sample shapes of a teacher's outputs: ``logits [C, *logit_size]`` (``logit_size`` ``()``
    for a classifier, ``(h, w)`` for a dense logit map at the network's own stride), ``embedding [D]``,
    ``feature [K, H, W]``.

    ``num_classes`` is C, the logits' channels (:attr:`logit_channels`): the class count of a
    classifier or segmentation network, ``K + 4`` for a CenterNet detector of K classes (heatmaps,
    box size and offset). The field keeps its name so that layouts compare and print as before.
    """

    num_classes: int
    embedding_dim: int
    feature_shape: tuple[int, int, int]
    logit_size: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.feature_shape)
        object.__setattr__(self, "feature_shape", shape)
        object.__setattr__(self, "logit_size", tuple(int(s) for s in self.logit_size))
        if len(self.logit_size) not in (0, 2) or (self.logit_size and min(self.logit_size) < 1):
            raise ValueError(f"OutputLayout: logit_size={self.logit_size}; expected () or (h, w) with h, w >= 1")
        if len(shape) != 3 or min(shape) < 1 or self.num_classes < 1 or self.embedding_dim < 1:
            raise ValueError(f"OutputLayout: num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                             f"feature_shape={shape}; expected positive sizes and a 3-d feature shape [K, H, W]")

    @classmethod
    def from_description(cls, description: Mapping) -> "OutputLayout":
        """From a teacher's ``describe()`` (``logit_channels``, or ``num_classes`` when it has none,
        ``embedding_dim``, ``feature_shape``, ``logit_size``)."""
        channels = description.get("logit_channels")
        return cls(int(description["num_classes"] if channels is None else channels), int(description["embedding_dim"]),
                   tuple(description["feature_shape"]), tuple(description.get("logit_size", ())))

    @property
    def logit_channels(self) -> int:
        """C, the channels of ``logits`` (``num_classes``; ``K + 4`` for a detector)."""
        return self.num_classes

    @classmethod
    def of(cls, outputs: Outputs) -> "OutputLayout":
        """The layout of a batch of outputs (``[B, C]`` or ``[B, C, h, w]``, ``[B, D]``, ``[B, K, H, W]``)."""
        _check_outputs(outputs)
        return cls(outputs.logits.shape[1], outputs.embedding.shape[1], tuple(outputs.feature.shape[1:]),
                   tuple(outputs.logits.shape[2:]))

    @property
    def logit_values(self) -> int:
        """``C * h * w`` (``C`` for a classifier)."""
        return self.num_classes * math.prod(self.logit_size)

    @property
    def values_per_sample(self) -> int:
        """``C * h * w + D + K * H * W``."""
        return self.logit_values + self.embedding_dim + math.prod(self.feature_shape)

    def value_bytes(self, value_dtype: str | torch.dtype) -> int:
        """Bytes of one encoded sample: the header plus ``values_per_sample`` values of ``value_dtype``."""
        return HEADER_BYTES + self.values_per_sample * as_value_dtype(value_dtype).itemsize


def _header(dtype: torch.dtype) -> bytes:
    return b"MK" + bytes([FORMAT_VERSION, _DTYPE_CODES[dtype]])


def _check_outputs(outputs: Outputs) -> None:
    missing = [f for f, t in zip(Outputs._fields, outputs) if t is None]
    if missing:
        raise ValueError(f"teacher outputs without {', '.join(missing)}; the cache stores logits, embedding and "
                         f"feature together")
    dims = [t.dim() for t in outputs]
    sizes = {t.shape[0] for t in outputs}
    if dims[0] not in (2, 4) or dims[1:] != [2, 4] or len(sizes) != 1:
        raise ValueError(f"teacher outputs of shapes {[list(t.shape) for t in outputs]}; expected "
                         f"[B, C] (or [B, C, h, w]), [B, D], [B, K, H, W] with one B")


def encode_rows(outputs: Outputs, value_dtype: str | torch.dtype) -> torch.Tensor:
    """``outputs`` -> ``[B, value_bytes]`` uint8 on the CPU, one encoded sample per row (one copy,
    rounding to ``value_dtype`` to nearest even, as ``Tensor.to`` does)."""
    dtype = as_value_dtype(value_dtype)
    _check_outputs(outputs)
    layout = OutputLayout.of(outputs)
    b, c, d = outputs.logits.shape[0], layout.logit_values, layout.embedding_dim
    rows = torch.empty(b, layout.value_bytes(dtype), dtype=torch.uint8)
    rows[:, :HEADER_BYTES] = torch.tensor(list(_header(dtype)), dtype=torch.uint8)
    data = rows[:, HEADER_BYTES:].view(dtype)  # [B, Chw + D + KHW]
    with torch.no_grad():
        data[:, :c].copy_(outputs.logits.detach().reshape(b, c))
        data[:, c : c + d].copy_(outputs.embedding.detach())
        data[:, c + d :].copy_(outputs.feature.detach().reshape(b, data.shape[1] - c - d))
    return rows


def decode_rows(rows: torch.Tensor, layout: OutputLayout, value_dtype: str | torch.dtype,
                out_dtype: torch.dtype = torch.float32) -> Outputs:
    """``[B, value_bytes]`` uint8 rows (headers already checked) -> :class:`Outputs` of ``out_dtype``
    (float32, or ``value_dtype`` itself) on the CPU, each field contiguous."""
    dtype = as_value_dtype(value_dtype)
    b, c, d = rows.shape[0], layout.logit_values, layout.embedding_dim
    data = rows[:, HEADER_BYTES:].view(dtype)
    logits = torch.empty(b, layout.num_classes, *layout.logit_size, dtype=out_dtype)
    embedding = torch.empty(b, d, dtype=out_dtype)
    feature = torch.empty(b, *layout.feature_shape, dtype=out_dtype)
    logits.view(b, c).copy_(data[:, :c])
    embedding.copy_(data[:, c : c + d])
    feature.view(b, data.shape[1] - c - d).copy_(data[:, c + d :])
    return Outputs(logits, embedding, feature)


def encode_samples(outputs: Outputs, value_dtype: str | torch.dtype) -> list[bytes]:
    """One value per sample: header + raw bytes of ``logits [B, C]``, ``embedding [B, D]``,
    ``feature [B, K, H, W]`` (any device) in ``value_dtype``. No pickle."""
    rows = encode_rows(outputs, value_dtype)
    if rows.shape[0] == 0:
        return []
    n = rows.shape[1]
    blob = rows.numpy().tobytes()
    return [blob[i : i + n] for i in range(0, len(blob), n)]


def invalid_values(values: Sequence[bytes | None], layout: OutputLayout, value_dtype: str | torch.dtype) -> list[int]:
    """Positions of the values that are absent, of the wrong length, or not an encoding of ``value_dtype``."""
    n, header = layout.value_bytes(value_dtype), _header(as_value_dtype(value_dtype))
    return [i for i, v in enumerate(values) if v is None or len(v) != n or bytes(v[:HEADER_BYTES]) != header]


def decode_samples(values: Sequence[bytes], layout: OutputLayout, value_dtype: str | torch.dtype) -> Outputs:
    """B values from :func:`encode_samples` -> float32 :class:`Outputs` (``[B, C]``, ``[B, D]``,
    ``[B, K, H, W]``) on the CPU, in one join and one copy per field.

    Raises:
        ValueError: a value is absent, has the wrong length or another dtype's header.
    """
    dtype = as_value_dtype(value_dtype)
    bad = invalid_values(values, layout, dtype)
    if bad:
        v = values[bad[0]]
        got = "None" if v is None else f"{len(v)} bytes starting {bytes(v[:HEADER_BYTES])!r}"
        raise ValueError(f"decode_samples: value {bad[0]} is {got}; expected {layout.value_bytes(dtype)} bytes "
                         f"starting {_header(dtype)!r} ({dtype_name(dtype)} outputs of {layout})")
    return decode_rows(_join_rows(values, layout.value_bytes(dtype)), layout, dtype)


def _join_rows(values: Sequence[bytes], value_bytes: int) -> torch.Tensor:
    """B values of ``value_bytes`` each -> ``[B, value_bytes]`` uint8 (one join)."""
    if not values:
        return torch.empty(0, value_bytes, dtype=torch.uint8)
    joined = bytearray().join(values)  # writable: wrapped as a tensor without another copy
    return torch.frombuffer(joined, dtype=torch.uint8).view(len(values), value_bytes)


# --------------------------------------------------------------------------------- the cache
@dataclass
class Lookup:
    """The result of :meth:`TeacherOutputCache.lookup`: the outputs when every sample was stored,
    else None and the positions of the samples to compute and store."""

    outputs: Outputs | None
    missing: list[int]


class TeacherOutputCache:
    """One teacher's outputs through a store.

    ``outputs(keys, compute)`` returns the cached outputs when every sample of the batch is stored,
    else calls ``compute()`` (the whole batch, so numbers do not depend on the cache) and stores the
    samples that were missing. Counts lookups, hits and bytes. A store failure never fails the
    caller: it is logged (once until the store works again) and counts as a miss.

    ``lookup`` and ``save`` are the two halves of ``outputs`` (read the batch; on a miss, store what
    was computed); each can also be called on its own.

    Args:
        store: an :class:`OutputStore`.
        layout: the teacher's :class:`OutputLayout`.
        value_dtype: the stored dtype (see :func:`resolve_value_dtype`).
        name: the teacher's name, for messages.
        device: where returned outputs live (contiguous).
        output_dtype: the dtype of returned outputs: float32 (default), or ``value_dtype`` itself
            (lossless, half the bytes to move when that is 16-bit: what a teacher actor should ship,
            so that a cached bf16 teacher travels exactly as an uncached one).
    """

    def __init__(self, store: OutputStore, layout: OutputLayout, value_dtype: str | torch.dtype, *,
                 name: str = "teacher", device: str | torch.device = "cpu", output_dtype: torch.dtype = torch.float32):
        self.store, self.layout, self.name = store, layout, name
        self.value_dtype = as_value_dtype(value_dtype)
        if output_dtype not in (torch.float32, self.value_dtype):
            raise ValueError(f"TeacherOutputCache: output_dtype={output_dtype}; expected torch.float32 or the value "
                             f"dtype {self.value_dtype} (anything else would round the stored values again)")
        self.output_dtype = output_dtype
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("lookups", "hits", "bytes_read", "bytes_written"), 0)
        self._failing = False
        self._warned_corrupt = False

    # ------------------------------------------------------------------ halves
    def lookup(self, keys: Sequence[str]) -> Lookup:
        """Read ``keys``: the decoded outputs (``[B, ...]``, ``output_dtype`` on ``device``) if all B are
        stored and valid, else the positions to compute."""
        keys = list(keys)
        values = self._guard("read", lambda: self._get(keys), [None] * len(keys))
        bad = invalid_values(values, self.layout, self.value_dtype)
        corrupt = [i for i in bad if values[i] is not None]
        if corrupt and not self._warned_corrupt:
            self._warned_corrupt = True
            v = values[corrupt[0]]
            log.warning("teacher %s: %d cached value(s) are not %s outputs of %s (e.g. key %s: %d bytes starting %r, "
                        "expected %d); treating them as misses and overwriting them", self.name, len(corrupt),
                        dtype_name(self.value_dtype), self.layout, keys[corrupt[0]], len(v),
                        bytes(v[:HEADER_BYTES]), self.layout.value_bytes(self.value_dtype))
        good = set(range(len(keys))) - set(bad)
        self._count(lookups=len(keys), hits=len(good), bytes_read=sum(len(values[i]) for i in good))
        if bad:
            return Lookup(None, bad)
        rows = _join_rows(values, self.layout.value_bytes(self.value_dtype))
        return Lookup(self._to_device(decode_rows(rows, self.layout, self.value_dtype, self.output_dtype)), [])

    def save(self, keys: Sequence[str], computed: Outputs, missing: Sequence[int] | None = None) -> Outputs:
        """Store the samples ``missing`` (default: all) of ``computed`` (``[B, ...]``, any dtype and
        device) under ``keys``; return all B as they read back (``output_dtype`` on ``device``)."""
        keys = list(keys)
        layout = OutputLayout.of(computed)
        if layout != self.layout or computed.logits.shape[0] != len(keys):
            raise ValueError(f"teacher {self.name}: computed outputs of {layout} for {computed.logits.shape[0]} samples; "
                             f"expected {self.layout} for {len(keys)} keys")
        rows = encode_rows(computed, self.value_dtype)
        positions = range(len(keys)) if missing is None else missing
        if positions:
            n = rows.shape[1]
            blob = rows.numpy().tobytes()
            items = {keys[i]: blob[i * n : (i + 1) * n] for i in positions}
            self._guard("write", lambda: self.store.put_many(items), None)
            self._count(bytes_written=n * len(items))
        return self._to_device(decode_rows(rows, self.layout, self.value_dtype, self.output_dtype))

    def outputs(self, keys: Sequence[str], compute: Callable[[], Outputs]) -> Outputs:
        """The outputs of the B samples of ``keys``: ``[B, C]``, ``[B, D]``, ``[B, K, H, W]`` of
        ``output_dtype`` on ``device``, from the store when all B are there, else from ``compute()``
        (then stored)."""
        found = self.lookup(keys)
        if found.outputs is not None:
            return found.outputs
        return self.save(keys, compute(), found.missing)

    def take_stats(self) -> dict:
        """``{"lookups", "hits", "bytes_read", "bytes_written"}`` since the last call; then reset.

        ``lookups``: samples looked up; ``hits``: those found valid in the store (a batch is served
        from the store only when all its samples are); ``bytes_read``: bytes of those values;
        ``bytes_written``: bytes handed to the store.
        """
        with self._lock:
            stats, self._stats = self._stats, dict.fromkeys(self._stats, 0)
        return stats

    # ---------------------------------------------------------------- helpers
    def _get(self, keys: list[str]) -> list:
        values = list(self.store.get_many(keys))
        if len(values) != len(keys):
            raise ValueError(f"get_many returned {len(values)} values for {len(keys)} keys")
        return values

    def _guard(self, what: str, call: Callable, fallback):
        try:
            result = call()
        except Exception as exc:  # the cache only accelerates: never fail the caller
            if not self._failing:
                log.warning("teacher %s: the output cache failed to %s (%s: %s); computing outputs without it "
                            "until it works again", self.name, what, type(exc).__name__, exc)
            self._failing = True
            return fallback
        self._failing = False
        return result

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self._stats[key] += amount

    def _to_device(self, outputs: Outputs) -> Outputs:
        if self.device.type == "cpu":
            return outputs
        return Outputs(*(t.to(self.device, non_blocking=True) for t in outputs))


# ------------------------------------------------------------------------------ teacher pools
def dataset_cache_id(dataset) -> str:
    """What identifies a dataset's images as a teacher sees them: content digest and normalisation."""
    return f"{dataset.digest}|{tuple(dataset.mean)}|{tuple(dataset.std)}"


def stored_dtype(value_dtype: str, description: Mapping) -> torch.dtype:
    """The dtype a teacher's outputs are stored in: ``value_dtype`` (the ``cache.value_dtype``
    setting), where ``auto`` is the dtype the teacher computes in (``description["precision"]``)."""
    computed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(description.get("precision"), torch.float32)
    return resolve_value_dtype(value_dtype, computed)


def teacher_cache(store: OutputStore, description: Mapping, value_dtype: str = "auto",
                  device: str | torch.device = "cpu") -> TeacherOutputCache:
    """A :class:`TeacherOutputCache` of the teacher of ``description`` that returns outputs in their
    stored dtype (lossless: under ``auto``, the same bytes as the uncached teacher's outputs)."""
    dtype = stored_dtype(value_dtype, description)
    return TeacherOutputCache(store, OutputLayout.from_description(description), dtype,
                              name=str(description.get("name", "teacher")), device=device, output_dtype=dtype)


@dataclass(frozen=True)
class CacheContext:
    """What keys a teacher's outputs besides the teacher and the sample.

    Attributes:
        dataset: :func:`dataset_cache_id` of the training set.
        crop_padding: the padding the batches' augmentation offsets refer to.
        value_dtype: the ``cache.value_dtype`` setting (``auto``, ``float16``, ``bfloat16``).
    """

    dataset: str
    crop_padding: int
    value_dtype: str = "auto"

    def keys(self, description: Mapping, batch) -> list[str]:
        """The ``B`` keys of a teacher's outputs for ``batch`` (a :class:`mtkd.data.Batch`)."""
        if batch.sample_index is None:
            raise ValueError("the output cache needs batches that say which samples they hold (BatchLoader's)")
        return sample_keys(description["digest"], self.dataset, description.get("numerics", "remote"),
                           stored_dtype(self.value_dtype, description), batch.sample_index, batch.augment,
                           self.crop_padding)


def cache_metrics(stats: Sequence[Mapping], used_bytes: int | None) -> dict[str, float]:
    """``cache/hit_rate`` (stored samples / samples looked up), ``cache/bytes`` (the store's memory)
    and ``cache/bytes_written`` of one epoch, from teachers' :meth:`TeacherOutputCache.take_stats`."""
    lookups = sum(s["lookups"] for s in stats)
    metrics = {"cache/hit_rate": sum(s["hits"] for s in stats) / lookups if lookups else 0.0,
               "cache/bytes_written": float(sum(s["bytes_written"] for s in stats))}
    if used_bytes is not None:
        metrics["cache/bytes"] = float(used_bytes)
    return metrics
