"""CIFAR-10 / CIFAR-100 from the python-pickle batches, read with a restricted unpickler.

The batches are pickled dicts ``{b'data': uint8 [N, 3072], b'labels' | b'fine_labels': [N] ints}``
(Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html). Unpickling can run arbitrary code,
so ``RestrictedUnpickler`` resolves only the three numpy globals an ndarray needs and refuses
every other global.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkd.data.dataset import DataError, DataNotFoundError, ImageDataset
from mtkd.errors import UserError
from mtkd.data.registry import DATASETS

_reconstruct = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Train-split statistics in [0, 1] scale (the true std, not the often-quoted 0.2023/0.1994/0.2010).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickle asked for a global that ``RestrictedUnpickler`` does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers, bytes, numbers and numpy arrays.

    Args:
        file: binary file object.
        source: name used in error messages (usually the file path).
    """

    def __init__(self, file, *, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"{self.source}: refusing global {module}.{name}; a CIFAR batch needs only {allowed} "
                "(a Python 3 pickle of protocol 2 also needs _codecs.encode, one of protocol 5 numpy's "
                "_frombuffer: re-save it with protocol 3 or 4)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refusing persistent id {pid!r}")


def load_pickle(path: str | os.PathLike, expected: str) -> Any:
    """Unpickle ``path`` with ``RestrictedUnpickler`` (``encoding="bytes"``, as the CIFAR files need).

    Raises:
        UnsafePickleError: the pickle names a forbidden global.
        DataError: the file is not a readable pickle; the message says ``expected``.
    """
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=str(path), encoding="bytes").load()
        except UnsafePickleError:
            raise
        except Exception as err:  # a corrupt pickle can raise nearly anything
            raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err}); {expected}") from err


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 from one CIFAR batch file."""
    expected = f"expected a CIFAR python batch: a pickled dict with b'data' uint8 [N, 3072] and {label_key!r} [N]"
    batch = load_pickle(path, expected)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: got a pickled {type(batch).__name__}; {expected}")
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is {got}; {expected}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {label_key!r} is {type(labels).__name__}, not integers; {expected}") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {label_key!r} has shape {list(labels.shape)} for {data.shape[0]} images; {expected}")
    return data.reshape(-1, 3, 32, 32), labels


def _resolve_root(root, folder: str, files: list[str], download: str) -> Path:
    if root is None:
        raise DataNotFoundError(f"{folder}: root= is required (no default location). {download}")
    root = Path(root)
    base = root / folder if (root / folder).is_dir() else root
    missing = [str(base / f) for f in files if not (base / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{folder} files not found: {', '.join(missing)}. {download}")
    return base


def _load_cifar(name, base: Path, files, label_key, num_classes, split, **dataset_kwargs) -> ImageDataset:
    parts = [read_cifar_batch(base / f, label_key) for f in files]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{name} {split} in {base}: labels span [{labels.min()}, {labels.max()}]; expected [0, {num_classes - 1}]"
        )
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    return ImageDataset(images_t, torch.from_numpy(labels), num_classes, name, split, **dataset_kwargs)


def _check_split(name: str, split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for {name}; expected 'train' or 'test'")


@DATASETS.register
def cifar10(root=None, split="train", *, mean=None, std=None) -> ImageDataset:
    """CIFAR-10: 50k/10k 32x32 RGB images, 10 classes.

    Args:
        root: ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``) or its parent.
        split: ``"train"`` or ``"test"``.
        mean, std: override the published train statistics.

    Example YAML:
        data: {name: cifar10, kwargs: {root: /data/cifar}}
    """
    _check_split("cifar10", split)
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    download = "Get https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it and pass root=."
    base = _resolve_root(root, "cifar-10-batches-py", files, download)
    stats = dict(mean=mean or CIFAR10_STATS[0], std=std or CIFAR10_STATS[1], class_names=CIFAR10_CLASSES)
    return _load_cifar("cifar10", base, files, b"labels", 10, split, **stats)


@DATASETS.register
def cifar100(root=None, split="train", *, mean=None, std=None) -> ImageDataset:
    """CIFAR-100: 50k/10k 32x32 RGB images, 100 fine classes (class names from ``meta`` if present).

    Args:
        root: ``cifar-100-python`` (``train``, ``test``, optional ``meta``) or its parent.
        split: ``"train"`` or ``"test"``.
        mean, std: override the published train statistics.

    Example YAML:
        data: {name: cifar100, kwargs: {root: /data/cifar}}
    """
    _check_split("cifar100", split)
    download = "Get https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extract it and pass root=."
    base = _resolve_root(root, "cifar-100-python", [split], download)
    stats = dict(mean=mean or CIFAR100_STATS[0], std=std or CIFAR100_STATS[1], class_names=_cifar100_names(base))
    return _load_cifar("cifar100", base, [split], b"fine_labels", 100, split, **stats)


def _cifar100_names(base: Path) -> list[str] | None:
    """The 100 fine label names from ``base/meta``, or None when the file is absent."""
    path = base / "meta"
    if not path.is_file():
        return None
    expected = "expected the CIFAR-100 meta pickle: a dict with b'fine_label_names' (100 names)"
    meta = load_pickle(path, expected)
    names = meta.get(b"fine_label_names", meta.get("fine_label_names")) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 100:
        raise DataError(f"{path}: no list of 100 b'fine_label_names'; {expected}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
