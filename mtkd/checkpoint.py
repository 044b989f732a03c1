"""Checkpoint files. Weights go to safetensors; optimiser and RNG state to a torch file read back
with ``weights_only=True``; metadata to JSON. Nothing is ever unpickled."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mtkd.errors import UserError

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"
TRAINER_STATE_FILE = "trainer_state.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into (CLI exit 2)."""


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: identifies the weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file (atomic: temp file then rename)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"weights file {str(path)!r} is not a valid safetensors file: {exc}") from exc


def write_json(path: str | Path, data: Any) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"metadata file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata file {str(path)!r} is not valid JSON: {exc}") from exc


def save_trainer_state(path: str | Path, state: dict) -> None:
    """Optimiser/scheduler/RNG state: tensors and plain containers only (atomic write)."""
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_trainer_state(path: str | Path) -> dict:
    """Read a trainer state with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trainer state {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"trainer state {str(path)!r} cannot be read safely: {exc}") from exc


def split_prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix.`` with the prefix removed."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def join_prefixed(**parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten several state dicts into one with ``prefix.`` keys."""
    return {f"{prefix}.{k}": v for prefix, sd in parts.items() for k, v in sd.items()}
