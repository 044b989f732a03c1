"""Teacher checkpoints, the :class:`TeacherPool` protocol and the in-process teacher pool.

A teacher checkpoint is a folder written by ``mtkd train-teacher``::

    weights.safetensors   the model's state_dict
    meta.json             model, num_classes, in_channels, input_shape, dataset, test_accuracy,
                          weights_digest (sha256 of the weights), ...
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from mtkd.checkpoint import (META_FILE, WEIGHTS_FILE, CheckpointError, load_weights, read_json,
                             save_weights, state_dict_digest, write_json)
from mtkd.devices import DTYPES, autocast, numerics_tag, resolve_device, resolve_precision
from mtkd.models import Outputs, create_model
from mtkd.models.fold import fold_batchnorm as fold_batchnorm_into_convs
from mtkd.models.fold import store_low_precision_weights
from mtkd.precision_probe import Bounds, ProbeCache, Setting, choose_setting, plan_compile, planned_teacher_calls

if TYPE_CHECKING:
    from mtkd.data import Batch

TEACHER_FORMAT = "mtkd-teacher/1"


def save_teacher(folder: str | Path, model: nn.Module, meta: dict) -> dict:
    """Write ``model`` and ``meta`` (plus format and weights digest) to ``folder``; returns the meta."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    meta = {**meta, "format": TEACHER_FORMAT, "weights_digest": state_dict_digest(state)}
    save_weights(folder / WEIGHTS_FILE, state, metadata={"format": TEACHER_FORMAT})
    write_json(folder / META_FILE, meta)
    return meta


def load_model_checkpoint(folder: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint folder and load its weights (checked against the digest).

    Returns:
        ``(model, meta)``; the model is in eval mode on the CPU.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist")
    meta = read_json(folder / META_FILE)
    for key in ("model", "num_classes", "in_channels", "weights_digest"):
        if key not in meta:
            raise CheckpointError(f"{folder / META_FILE}: missing key {key!r}")
    state = load_weights(folder / WEIGHTS_FILE)
    if state_dict_digest(state) != meta["weights_digest"]:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: weights do not match the digest in {META_FILE}")
    model = create_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: weights do not fit model {meta['model']!r}: {exc}") from exc
    return model.eval(), meta


class Teacher:
    """A frozen teacher: eval mode, no gradients, on a device, in a precision. The same duck type as a
    remote teacher (``describe()``, ``infer(images)``).

    Under reduced precision the teacher is also made lean for inference (results stay those of
    autocast, see :mod:`mtkd.models.fold`): each batch-norm that directly follows a convolution is
    folded into it, and the conv/linear weights are stored in the autocast dtype (bit-identical to
    casting them at every forward, without the cast). fp32 stays exactly the reference computation.
    A model it transforms is copied first; otherwise (fp32) the model itself is moved and frozen.

    Args:
        model: a network returning :class:`Outputs`.
        meta: its checkpoint metadata (needs ``input_shape``, ``num_classes``, ``weights_digest``).
        name: a short name (default: ``meta['model']``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        precision: ``fp32`` (exact), ``bf16``, ``fp16`` (reduced precision runs under autocast with
            channels_last weights and inputs), or ``auto``: the setting (precision, channels_last,
            batch-norm folding) measured fastest among those whose outputs agree with exact fp32
            (:mod:`mtkd.precision_probe`; the decision is cached on disk and kept in ``probe``).
        compile: True: wrap the model in ``torch.compile`` with inductor's ``freezing`` (the frozen
            weights become constants: batch-norm folded, weights pre-packed for oneDNN). It compiles
            once per batch size (45-136 s for four CIFAR teachers on one busy CPU core) and changes
            the last bits (about 1e-6 relative in fp32); there it made the four fp32 teachers 1.49x
            faster, bf16 ones 1.02x (a CPU without AMX). ``auto``: compile when ``planned_calls``
            exceed the measured compile time over the measured saving per call
            (:func:`mtkd.precision_probe.plan_compile`; the measurement is cached like the probe's,
            the decision kept in ``compile_plan`` and ``describe()["compile"]``).
        channels_last: the weights' and inputs' memory format; None (default): channels_last exactly
            when the precision is reduced (:func:`mtkd.devices.memory_format`).
        fold_batchnorm: fold batch-norm into the preceding convolution; None (default): when the
            precision is reduced (in fp32 folding would change the last bits of the outputs, by
            about 1e-6 relative).
        probe_batch: ``auto``: the batch size the probe times (the batch the teacher will serve).
        probe_cache: ``auto``: the folder of cached decisions (default
            :func:`mtkd.precision_probe.default_cache_dir`).
        probe_bounds: ``auto``: how close to exact fp32 a setting's outputs must be (default :class:`Bounds`).
        planned_calls: ``compile="auto"``: the batches the teacher will compute in the run (None:
            unknown, stays eager).
    """

    def __init__(self, model: nn.Module, meta: dict, name: str | None = None, *, device: str | torch.device = "cpu",
                 precision: str = "fp32", compile: bool | str = False, channels_last: bool | None = None,
                 fold_batchnorm: bool | None = None, probe_batch: int = 64, probe_cache: str | None = None,
                 probe_bounds: Bounds | None = None, planned_calls: int | None = None):
        if compile not in (True, False, "auto"):
            raise ValueError(f"Teacher compile: expected True, False or 'auto', got {compile!r}")
        self.device = resolve_device(device)
        self.probe = None  # the probe's report (a dict) when precision was auto
        if precision == "auto":
            report = choose_setting(model, meta, self.device, probe_batch, cache=ProbeCache(probe_cache),
                                    bounds=probe_bounds or Bounds())
            self.probe = report.to_dict()
            print(f"[mtkd] {report.line(name or meta['model'])}", file=sys.stderr, flush=True)
            chosen = report.setting()
            precision, channels_last, fold_batchnorm = chosen.precision, chosen.channels_last, chosen.fold_batchnorm
        self.precision = resolve_precision(precision, self.device)
        reduced = self.precision != "fp32"
        self.channels_last = reduced if channels_last is None else bool(channels_last)
        self.fold_batchnorm = reduced if fold_batchnorm is None else bool(fold_batchnorm)
        self.compiled = False
        self.compile_plan = None  # compile="auto": the break-even decision (a dict)
        model = model.eval()
        if self.fold_batchnorm or reduced:
            model = copy.deepcopy(model)  # the caller's module keeps its layers and dtypes
        folded = fold_batchnorm_into_convs(model) if self.fold_batchnorm else 0
        if reduced:
            store_low_precision_weights(model, DTYPES[self.precision])
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=layout)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._folded = folded
        self._forward = self.model
        self._compiled_forward = None
        self.meta = meta
        self.name = name or meta["model"]
        probe = self.infer(torch.zeros(1, *meta["input_shape"]))  # eager: a batch-1 compile would be wasted
        self.embedding_dim = probe.embedding.shape[1]
        self.feature_shape = tuple(probe.feature.shape[1:])
        self.logit_size = tuple(probe.logits.shape[2:])  # () for class scores, (h, w) for dense logit maps
        self.logit_channels = probe.logits.shape[1]  # num_classes, or K + 4 for a detector's heatmaps and boxes
        if compile == "auto":
            plan = plan_compile(self, planned_calls, batch=probe_batch, cache=ProbeCache(probe_cache),
                                bounds=probe_bounds or Bounds())
            self.compile_plan = plan.to_dict()
            print(f"[mtkd] {plan.line()}", file=sys.stderr, flush=True)
        elif compile:
            self.use_compiled(True)

    @property
    def setting(self) -> Setting:
        """How the teacher computes (precision, channels_last, batch norm folded), as the probe names it."""
        return Setting(self.precision, self.channels_last, self.fold_batchnorm)

    @property
    def _variant(self) -> str:
        reduced = self.precision != "fp32"
        return "-".join(v for v, on in (("foldbn", self._folded > 0), ("compiled", self.compiled),
                                        ("nchw", reduced and not self.channels_last),
                                        ("nhwc", self.channels_last and not reduced)) if on)

    def use_compiled(self, on: bool) -> None:
        """Run the model through ``torch.compile`` (inductor, ``freezing``, static shapes: compiled at
        the first call of each batch shape) or eagerly; a compiled function is kept for reuse."""
        if on and self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.model, dynamic=False, options={"freezing": True})
        self._forward = self._compiled_forward if on else self.model
        self.compiled = bool(on)

    @torch.inference_mode()
    def infer_raw(self, images: torch.Tensor) -> Outputs:
        """``images [B, C, H, W]`` float32 (any device) -> :class:`Outputs` on the teacher's device, in
        the dtype they were computed in (bfloat16/float16 under reduced precision: lossless to move
        or store as such)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return Outputs(*self._forward(images))

    def infer(self, images: torch.Tensor) -> Outputs:
        """``images [B, C, H, W]`` float32 -> :class:`Outputs` (logits ``[B, C]``, embedding ``[B, D]``,
        feature ``[B, K, H', W']``) in float32 on the teacher's device."""
        return Outputs(*(t.float() for t in self.infer_raw(images)))

    def describe(self) -> dict:
        """Name, classes, input shape, embedding dim, feature shape, logit size (``()`` for a classifier,
        ``(h, w)`` of a segmentation network's or detector's logit map at its own stride), logit channels
        (``num_classes``; ``K + 4`` for a detector), weights digest, model, and the
        input normalisation it was trained with (``mean``/``std`` per channel in ``[0, 1]`` pixel
        scale, None when the checkpoint does not record them); ``precision`` and ``numerics`` say how
        it computes (``bf16``, ``cpu-bf16-foldbn-torch2.13.0``)."""
        dataset = self.meta.get("dataset") or {}
        return {
            "name": self.name,
            "model": self.meta["model"],
            "num_classes": int(self.meta["num_classes"]),
            "input_shape": tuple(self.meta["input_shape"]),
            "embedding_dim": int(self.embedding_dim),
            "feature_shape": tuple(int(s) for s in self.feature_shape),
            "logit_size": tuple(int(s) for s in self.logit_size),
            "logit_channels": int(self.logit_channels),
            "digest": self.meta["weights_digest"],
            "mean": tuple(dataset["mean"]) if dataset.get("mean") else None,
            "std": tuple(dataset["std"]) if dataset.get("std") else None,
            "precision": self.precision,
            "numerics": numerics_tag(self.device, self.precision, self._variant),
            "probe": self.probe,
            "compile": self.compile_plan,
        }


def load_teacher(folder: str | Path, name: str | None = None, **options) -> Teacher:
    """Load a teacher checkpoint folder as a frozen :class:`Teacher` (``options``: device, precision,
    compile, channels_last, fold_batchnorm; see :class:`Teacher`)."""
    model, meta = load_model_checkpoint(folder)
    return Teacher(model, meta, name, **options)


def probe_options(config, planned_calls: bool = False) -> dict:
    """:func:`load_teacher`'s keywords for ``teacher_precision: auto`` and ``compile_teachers: auto``
    from an ``ExperimentConfig``: the batch the teachers serve, the cache of decisions, the agreement
    bounds, and the batches each teacher computes in the run (counted when ``compile_teachers`` is
    auto or ``planned_calls`` asks: :func:`mtkd.precision_probe.planned_teacher_calls`; else None)."""
    rt = config.runtime
    count = planned_calls or rt.compile_teachers == "auto"
    return {"probe_batch": int(config.data.batch_size), "probe_cache": rt.probe_cache,
            "probe_bounds": Bounds(max_logit_kl=rt.probe_max_logit_kl, max_feature_rel_error=rt.probe_max_feature_error),
            "planned_calls": planned_teacher_calls(config) if count else None}


def teacher_manifest(descriptions: list[dict]) -> list[dict]:
    """What a run records of its pool and refuses to see change: name, model, digest, classes."""
    return [{k: d[k] for k in ("name", "model", "digest", "num_classes")} for d in descriptions]


def check_same_pool(recorded: list[dict], current: list[dict]) -> None:
    """Raise :class:`CheckpointError` naming the first difference between two manifests."""
    if len(recorded) != len(current):
        raise CheckpointError(f"teacher pool differs: the run has {len(recorded)} teachers, got {len(current)}")
    for index, (old, new) in enumerate(zip(recorded, current)):
        for key in ("name", "model", "digest", "num_classes"):
            if old.get(key) != new.get(key):
                raise CheckpointError(
                    f"teacher pool differs at teacher {index} ({old.get('name')}): {key} was "
                    f"{old.get(key)!r}, now {new.get(key)!r}"
                )


@runtime_checkable
class TeacherPool(Protocol):
    """What the engine asks of a teacher pool: M teachers answering batches of B images.

    Implemented by :class:`LocalTeacherPool` (in process) and
    ``services.teacher_server.pool.RayTeacherPool`` (Ray actors). The engine submits a batch ahead of
    the step that uses it and collects it at that step, so teachers may compute while the student
    trains; each ticket is collected once.

    Attributes:
        accepts_device_batches: whether :meth:`submit` may be handed a batch whose tensors are
            already on the engine's device (else the engine submits the host-memory batch).
    """

    accepts_device_batches: bool

    def describe(self) -> list[dict]:
        """One dict per teacher (the same order as :meth:`collect`'s outputs), as
        :meth:`Teacher.describe`: ``name``, ``model``, ``num_classes`` C, ``input_shape`` (C_in, H, W),
        ``embedding_dim`` D, ``feature_shape`` (K, H', W'), ``digest``, ``mean``/``std``, ``numerics``."""
        ...

    def submit(self, batch: Batch) -> Any:
        """Start the teachers on ``batch`` (images ``[B, C_in, H, W]`` float32, normalised); returns
        an opaque ticket for :meth:`collect`."""
        ...

    def collect(self, ticket: Any) -> list[Outputs]:
        """The M teachers' outputs of a submitted batch: per teacher ``Outputs(logits [B, C],
        embedding [B, D], feature [B, K, H', W'])`` (the fields the pool was not asked for may be
        None), on any device, in the dtype they were computed or sent in (the engine makes them
        float32 on its device)."""
        ...

    def take_stats(self) -> dict[str, float]:
        """The pool's metrics since the last call (``cache/hit_rate``, ``cache/bytes``...); {} if none."""
        ...

    def close(self) -> None:
        """Release what the pool holds (cache connections, batches in flight); teachers it was given
        are not stopped."""
        ...


class LocalTeacherPool:
    """The in-process :class:`TeacherPool`: runs every teacher in this process when collected.

    Outputs come back on the teachers' device in the dtype they were computed in (the engine makes
    them float32). The engine may hand over batches already on its device
    (``accepts_device_batches``).

    With :meth:`use_cache`, each teacher looks its outputs up in a store before computing them.
    """

    accepts_device_batches = True

    def __init__(self, teachers: list[Teacher]):
        self.teachers = teachers
        self._cache = None  # (store, context, per-teacher TeacherOutputCache)

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.teachers]

    def use_cache(self, store, context) -> None:
        """Look outputs up in ``store`` (an :class:`mtkd.cache.OutputStore`) keyed with ``context``
        (an :class:`mtkd.cache.CacheContext`) before computing them."""
        from mtkd.cache import teacher_cache

        caches = [teacher_cache(store, d, context.value_dtype, t.device) for t, d in zip(self.teachers, self.describe())]
        self._cache = (store, context, caches)

    def submit(self, batch) -> object:
        """Remember ``batch`` (a :class:`mtkd.data.Batch`); the teachers run at :meth:`collect`."""
        return batch

    def collect(self, ticket) -> list[Outputs]:
        if self._cache is None:
            return [t.infer_raw(ticket.images) for t in self.teachers]
        _, context, caches = self._cache
        return [cache.outputs(context.keys(description, ticket), lambda t=t: t.infer_raw(ticket.images))
                for t, description, cache in zip(self.teachers, self.describe(), caches)]

    def take_stats(self) -> dict[str, float]:
        """The cache's metrics since the last call (``cache/hit_rate``, ``cache/bytes``...); {} without one."""
        if self._cache is None:
            return {}
        from mtkd.cache import cache_metrics

        store, _, caches = self._cache
        return cache_metrics([c.take_stats() for c in caches], store.used_bytes())

    def close(self) -> None:
        """Nothing to release: the teachers and the cache's store belong to the caller."""
