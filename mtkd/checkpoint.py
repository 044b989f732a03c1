"""Checkpoint files. Weights go to safetensors; optimiser and RNG state to a torch file read back
with ``weights_only=True``; metadata to JSON. Nothing is ever unpickled.

Every file is written to a temporary name, flushed to disk (fsync) and renamed into place. A
checkpoint's ``meta.json`` lists the sha256 and size of its other files (``files``), which
:func:`verify_files` checks before a run resumes from it.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from mtkd.errors import UserError

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"
TRAINER_STATE_FILE = "trainer_state.pt"
DIGESTS_KEY = "files"  # meta.json: {file name: {"sha256": hex, "bytes": size}}


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


# ------------------------------------------------------------------------------ durable writes
def fsync_file(path: str | Path) -> None:
    """Flush a written file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename still happened
        pass
    finally:
        os.close(fd)


def _replace(tmp: Path, path: str | Path) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the folder: ``path`` is the old or the new file, whole."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


# ------------------------------------------------------------------------------ digests
def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str | Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"sha256": hex, "bytes": size}}`` of files in ``folder`` (the ``files`` of a meta.json)."""
    folder = Path(folder)
    return {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in names}


def verify_files(folder: str | Path, meta: dict) -> None:
    """Check the files ``meta["files"]`` lists in ``folder``: present, their size, their sha256.
    A checkpoint written before digests existed (no ``files``) passes: its files are checked when
    they load.

    Raises:
        CheckpointError: naming the first file that is missing, truncated, grown or altered.
    """
    folder = Path(folder)
    listed = meta.get(DIGESTS_KEY) if isinstance(meta, dict) else None
    if listed is None:
        return
    if not isinstance(listed, dict):
        raise CheckpointError(f"{str(folder / META_FILE)!r}: {DIGESTS_KEY!r} is not a mapping of file digests")
    for name, expected in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing")
        size = path.stat().st_size
        if "bytes" in expected and size != expected["bytes"]:
            kind = "truncated" if size < expected["bytes"] else "longer than written"
            raise CheckpointError(f"{str(path)!r} is {kind} ({size} of {expected['bytes']} bytes)")
        if file_sha256(path) != expected.get("sha256"):
            raise CheckpointError(f"{str(path)!r} does not match its sha256 in {META_FILE} (altered since written)")


# ------------------------------------------------------------------------------ interrupts
_writes_in_progress = 0
_held_interrupt: BaseException | None = None


def hold_interrupt(error: BaseException) -> bool:
    """Called by a signal handler: while a checkpoint is being written or deleted
    (:func:`uninterrupted`), keep ``error`` to raise when that ends and return True; else False
    (the handler raises it at once)."""
    global _held_interrupt
    if _writes_in_progress == 0:
        return False
    _held_interrupt = error
    return True


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A checkpoint write or deletion that an interrupt (SIGINT/SIGTERM, when the command line
    handles them) must not cut in two: one held by :func:`hold_interrupt` is raised at its end."""
    global _writes_in_progress, _held_interrupt
    _writes_in_progress += 1
    try:
        yield
    finally:
        _writes_in_progress -= 1
        if _writes_in_progress == 0 and _held_interrupt is not None:
            error, _held_interrupt = _held_interrupt, None
            raise error


# ------------------------------------------------------------------------------ files
def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file (atomic: temp file, fsync, rename)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    _replace(tmp, path)


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
    """Write ``data`` as JSON (atomic: temp file, fsync, rename)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    _replace(tmp, path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"metadata file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata file {str(path)!r} is not valid JSON: {exc}") from exc


def save_trainer_state(path: str | Path, state: dict) -> None:
    """Optimiser/scheduler/RNG state: tensors and plain containers only (atomic: temp file, fsync, rename)."""
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    _replace(tmp, path)


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
