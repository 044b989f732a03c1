"""The teacher actor: hosts one teacher (a checkpoint, or a remote gRPC teacher) and serves
batched outputs. Thin: the model code is :mod:`mtkd.teachers`."""
from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from mtkd.cache import teacher_cache
from mtkd.models import Outputs
from mtkd.teachers import load_teacher
from services.metrics import TEACHER_LATENCY, observe

# How a tensor travels through the object store: numpy has no bfloat16, so it moves as its bits.
_WIRE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def tensor_to_wire(tensor: torch.Tensor, half: bool = False) -> tuple[np.ndarray, str]:
    """A CPU numpy array (zero-copy through Ray's object store) and the name of the tensor's dtype.

    Float32 moves as float16 when ``half``; bfloat16 and float16 always move as themselves (lossless).
    """
    tensor = tensor.detach()
    if half and tensor.dtype == torch.float32:
        tensor = tensor.to(torch.float16)
    tensor = tensor.cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy(), "bfloat16"
    return tensor.numpy(), _WIRE[tensor.dtype]


def tensor_from_wire(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`tensor_to_wire` (a writable copy: object-store arrays are read-only)."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def outputs_to_wire(outputs: Outputs, fields: tuple[str, ...], half: bool) -> dict:
    """``{field: (array, dtype)}`` for the requested fields of ``outputs``."""
    return {f: tensor_to_wire(getattr(outputs, f), half) for f in fields}


def outputs_from_wire(wire: dict) -> Outputs:
    """Inverse of :func:`outputs_to_wire`; fields not sent are None."""
    return Outputs(*(tensor_from_wire(*wire[f]) if f in wire else None for f in Outputs._fields))


# bounded here too; the run's own bounds (runtime.teacher_max_restarts / _max_task_retries) come in
# through .options() (start_teacher_actors)
@ray.remote(max_restarts=3, max_task_retries=3)
class TeacherActor:
    """One replica of one teacher.

    Args:
        source: ``{"checkpoint": path, "name": ...}`` or ``{"address": "host:port", ...}`` (a teacher
            served by ``mtkd serve-teacher``; ``token``/``root_cert`` optional).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (resolved for this actor's device).
        compile: ``torch.compile`` the model.
        cache_url: a Redis (``redis://...``) to look outputs up in before computing them, for calls
            that carry keys; None: no cache.
        value_dtype: the ``cache.value_dtype`` setting.
        probe: ``precision: auto``: the probe's keywords (:func:`mtkd.teachers.probe_options`).

    The device is the GPU Ray gave this actor (``num_gpus > 0`` in its options), else the CPU.
    Restarted by Ray when it dies, up to ``runtime.teacher_max_restarts`` times; calls in flight are
    sent again to the new incarnation, up to ``runtime.teacher_max_task_retries`` times: inference is a
    pure function of the batch, so a retry is safe. Each call's time goes to the
    ``mtkd_teacher_latency_seconds`` histogram (:mod:`services.metrics`), tagged with the teacher's name.
    """

    def __init__(self, source: dict, precision: str = "fp32", compile: bool = False, cache_url: str | None = None,
                 value_dtype: str = "auto", probe: dict | None = None):
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.remote = bool(source.get("address"))
        if self.remote:
            from services.teacher_server.grpc_client import RemoteTeacher

            self.teacher = RemoteTeacher(source["address"], token=source.get("token"),
                                         root_cert=source.get("root_cert"))
            self._infer = self.teacher.infer
        else:
            self.teacher = load_teacher(source["checkpoint"], source.get("name") or None, device=device,
                                        precision=precision, compile=compile, **(probe or {}))
            self._infer = self.teacher.infer_raw
        self.cache = None
        if cache_url:
            from services.cache import RedisStore

            self.cache = teacher_cache(RedisStore(cache_url), self.teacher.describe(), value_dtype)
        self.calls = 0
        self._name: str | None = None  # the metrics' teacher tag, on the first call (a served teacher's needs a call)

    def describe(self) -> dict:
        """Name, model, classes, input shape, embedding dim, feature shape, weights digest, numerics."""
        return self.teacher.describe()

    def infer(self, images: np.ndarray, fields: tuple[str, ...] = Outputs._fields, half: bool = False,
              keys: list[str] | None = None) -> dict:
        """``images [B, C, H, W]`` float32 -> ``{field: (array, dtype)}`` of logits ``[B, C]``,
        embedding ``[B, D]``, feature ``[B, K, H, W]`` (only ``fields``).

        With ``keys`` (one per sample) and a cache, the outputs come from the cache when it holds the
        whole batch; the reply then also carries ``"cache"``: the lookups and hits of this call.
        """
        self.calls += 1
        start = time.perf_counter()
        wire = self._infer_wire(images, fields, half, keys)
        if self._name is None:
            self._name = str(self.teacher.describe().get("name"))
        observe(TEACHER_LATENCY, time.perf_counter() - start, teacher=self._name)
        return wire

    def _infer_wire(self, images: np.ndarray, fields: tuple[str, ...], half: bool, keys: list[str] | None) -> dict:
        def compute(half_wire: bool = False) -> Outputs:
            batch = torch.from_numpy(np.array(images, copy=True))
            if self.remote:  # a teacher served over gRPC: float16 on that wire too when asked
                return self.teacher.infer(batch, half_precision=half_wire)
            return self._infer(batch)

        if keys is None or self.cache is None:
            return outputs_to_wire(compute(half), fields, half)
        # what goes into the cache is the teacher's own numbers (a later run may not ask for half)
        wire = outputs_to_wire(self.cache.outputs(keys, compute), fields, half)
        wire["cache"] = self.cache.take_stats()
        return wire

    def stats(self) -> dict:
        """This incarnation's process id, node and the calls it served (a restart starts a new one)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "calls": self.calls}
