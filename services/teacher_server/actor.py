"""The teacher actor: hosts one teacher (a checkpoint, or a remote gRPC teacher) and serves
batched outputs. Thin: the model code is :mod:`mtkd.teachers`."""
from __future__ import annotations

import os

import numpy as np
import ray
import torch

from mtkd.teachers import load_teacher


def outputs_to_arrays(outputs, half: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outputs -> numpy arrays (zero-copy through Ray's object store); float16 when ``half``."""
    dtype = torch.float16 if half else torch.float32
    return tuple(t.detach().to(dtype).cpu().numpy() for t in outputs)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class TeacherActor:
    """One replica of one teacher.

    Args:
        source: ``{"checkpoint": path, "name": ...}`` or ``{"address": "host:port", ...}`` (a teacher
            served by ``mtkd serve-teacher``; ``token``/``root_cert`` optional).
        device: ``cpu`` or ``cuda`` (use with ``num_gpus`` in the actor options).

    Restarted by Ray when it dies (``max_restarts=-1``); calls in flight are retried on the new
    replica (``max_task_retries=-1``): inference is a pure function of the batch, so a retry is safe.
    """

    def __init__(self, source: dict, device: str = "cpu"):
        self.device = torch.device(device)
        if source.get("address"):
            from services.teacher_server.grpc_client import RemoteTeacher

            self.teacher = RemoteTeacher(source["address"], token=source.get("token"),
                                         root_cert=source.get("root_cert"))
        else:
            self.teacher = load_teacher(source["checkpoint"], source.get("name") or None)
            self.teacher.model.to(self.device)
        self.calls = 0

    def describe(self) -> dict:
        """Name, model, classes, input shape, embedding dim, feature shape, weights digest."""
        return self.teacher.describe()

    def infer(self, images: np.ndarray, half: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``images [B, C, H, W]`` float32 -> ``(logits [B, C], embedding [B, D], feature [B, K, H, W])``."""
        self.calls += 1
        batch = torch.from_numpy(np.array(images, copy=True)).to(self.device)  # object-store arrays are read-only
        return outputs_to_arrays(self.teacher.infer(batch), half)

    def stats(self) -> dict:
        """This incarnation's process id and the calls it served (a restart starts a new one)."""
        return {"pid": os.getpid(), "calls": self.calls}
