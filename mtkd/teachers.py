"""Teacher checkpoints and the in-process teacher pool.

A teacher checkpoint is a folder written by ``mtkd train-teacher``::

    weights.safetensors   the model's state_dict
    meta.json             model, num_classes, in_channels, input_shape, dataset, test_accuracy,
                          weights_digest (sha256 of the weights), ...
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mtkd.checkpoint import (META_FILE, WEIGHTS_FILE, CheckpointError, load_weights, read_json,
                             save_weights, state_dict_digest, write_json)
from mtkd.models import Outputs, create_model

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
    """A frozen teacher: eval mode, no gradients. The same duck type as a remote teacher.

    Args:
        model: a network returning :class:`Outputs`.
        meta: its checkpoint metadata (needs ``input_shape``, ``num_classes``, ``weights_digest``).
        name: a short name (default: ``meta['model']``).
    """

    def __init__(self, model: nn.Module, meta: dict, name: str | None = None):
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.meta = meta
        self.name = name or meta["model"]
        probe = self.infer(torch.zeros(1, *meta["input_shape"]))
        self.embedding_dim = probe.embedding.shape[1]
        self.feature_shape = tuple(probe.feature.shape[1:])

    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> Outputs:
        """``images [B, C, H, W]`` float32 -> :class:`Outputs` (logits, embedding, feature)."""
        return Outputs(*self.model(images))

    def describe(self) -> dict:
        """Name, classes, input shape, embedding dim, feature shape, weights digest, model."""
        return {
            "name": self.name,
            "model": self.meta["model"],
            "num_classes": int(self.meta["num_classes"]),
            "input_shape": tuple(self.meta["input_shape"]),
            "embedding_dim": int(self.embedding_dim),
            "feature_shape": tuple(int(s) for s in self.feature_shape),
            "digest": self.meta["weights_digest"],
        }


def load_teacher(folder: str | Path, name: str | None = None) -> Teacher:
    """Load a teacher checkpoint folder as a frozen :class:`Teacher`."""
    model, meta = load_model_checkpoint(folder)
    return Teacher(model, meta, name)


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


@dataclass
class _Ticket:
    batch_index: int
    images: torch.Tensor


class LocalTeacherPool:
    """The in-process teacher source: runs every teacher in this process when collected.

    The engine talks to a pool through ``describe()``, ``submit(batch_index, images) -> ticket``
    and ``collect(ticket) -> list[Outputs]``; the Ray runtime's pool has the same verbs.
    """

    def __init__(self, teachers: list[Teacher]):
        self.teachers = teachers

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.teachers]

    def submit(self, batch_index: int, images: torch.Tensor) -> _Ticket:
        return _Ticket(batch_index, images)

    def collect(self, ticket: _Ticket) -> list[Outputs]:
        return [t.infer(ticket.images) for t in self.teachers]

    def close(self) -> None:
        pass
