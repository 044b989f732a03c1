"""IDX files (the MNIST family): a parser and the ``fashion_mnist`` / ``mnist`` loaders.

Format (big-endian): magic ``0x0000 TT NN`` (TT = dtype code, 0x08 = uint8; NN = number of
dims), then NN uint32 dims, then the data. Images are IDX3 ``[N, H, W]``, labels IDX1 ``[N]``.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch

from mtkd.data.dataset import DataError, DataNotFoundError, ImageDataset
from mtkd.data.registry import DATASETS

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Published statistics of the train splits, in [0, 1] scale.
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
MNIST_STATS = ((0.1307,), (0.3081,))


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an IDX file of uint8 data, gzip-compressed (by content) or raw.

    Args:
        path: the file.
        magic: expected magic number (``0x00000803`` images, ``0x00000801`` labels).

    Returns:
        A read-only uint8 array shaped by the header's dims.
    """
    path = Path(path)
    ndim = magic & 0xFF
    expected = f"expected IDX{ndim} uint8 {'images' if ndim == 3 else 'labels'} (magic 0x{magic:08x})"
    data = _read_bytes(path, expected)
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: {len(data)} bytes, too short for a header; {expected}")
    got_magic = int.from_bytes(data[:4], "big")
    if got_magic != magic:
        raise DataError(f"{path}: magic 0x{got_magic:08x}; {expected}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    header = 4 + 4 * ndim
    want = header + int(np.prod(dims))
    if len(data) != want:
        raise DataError(f"{path}: {len(data)} bytes; header dims {list(dims)} need {want} (truncated?); {expected}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path, expected: str) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return zlib.decompress(raw, wbits=31)
    except zlib.error as err:
        raise DataError(f"{path}: corrupt gzip stream ({err}); {expected}") from None


def _find(root: Path, stem: str) -> Path:
    """The first existing variant of ``stem`` (``x-idxN-ubyte``) in root: raw, ``.gz``, or ``x.idxN-ubyte``."""
    dotted = stem.replace("-idx", ".idx")
    candidates = [root / stem, root / f"{stem}.gz", root / dotted, root / f"{dotted}.gz"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(", ".join(map(str, candidates)))


def load_idx_pair(root: str | os.PathLike, split: str, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, H, W]`` uint8 and labels ``[N]`` int64 of an MNIST-style split in ``root``.

    Raises:
        FileNotFoundError: a file is missing; the message lists the paths looked for.
        DataError: a file is not the expected IDX file, counts differ, or a label is out of range.
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r} for IDX datasets; expected one of {sorted(SPLIT_PREFIX)}")
    prefix, root = SPLIT_PREFIX[split], Path(root)
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels; "
            "expected equal counts"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{labels_path}: max label {int(labels.max())}; expected [0, {num_classes - 1}]")
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    return images_t, torch.from_numpy(labels.astype(np.int64))


def _load_mnist_like(name: str, root: Path, split: str, how_to_get: str, **dataset_kwargs) -> ImageDataset:
    try:
        images, labels = load_idx_pair(root, split)
    except FileNotFoundError as err:
        raise DataNotFoundError(f"{name} {split} files not found; looked for: {err.args[0]}. {how_to_get}") from None
    return ImageDataset(images, labels, 10, name, split, **dataset_kwargs)


@DATASETS.register
def fashion_mnist(root=None, split="train", *, mean=None, std=None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017, https://arxiv.org/abs/1708.07747): 60k/10k 28x28 grey, 10 classes.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
            default ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
        split: ``"train"`` or ``"test"``.
        mean, std: override the published train statistics (0.2860, 0.3530).

    Example YAML:
        data: {name: fashion_mnist, kwargs: {root: /usr/share/datasets/fashion-mnist}}
    """
    root = Path(root or FASHION_MNIST_ROOT)
    how = "Install it with `apt-get install dataset-fashion-mnist` or pass root= a folder holding these files."
    return _load_mnist_like(
        "fashion_mnist", root, split, how,
        mean=mean or FASHION_MNIST_STATS[0], std=std or FASHION_MNIST_STATS[1], class_names=FASHION_MNIST_CLASSES,
    )  # fmt: skip


@DATASETS.register
def mnist(root=None, split="train", *, mean=None, std=None) -> ImageDataset:
    """MNIST (LeCun et al. 1998): 60k/10k 28x28 grey digits, 10 classes.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; default: the
            ``MTKD_MNIST_ROOT`` environment variable (there is no system copy).
        split: ``"train"`` or ``"test"``.
        mean, std: override the published train statistics (0.1307, 0.3081).

    Example YAML:
        data: {name: mnist, kwargs: {root: /data/mnist}}
    """
    root = root or os.environ.get("MTKD_MNIST_ROOT")
    how = (
        "Download the four IDX files (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/) into a folder "
        "and pass root= or set MTKD_MNIST_ROOT."
    )
    if not root:
        raise DataNotFoundError(f"mnist needs root= (or the MTKD_MNIST_ROOT environment variable); got neither. {how}")
    return _load_mnist_like(
        "mnist", Path(root), split, how,
        mean=mean or MNIST_STATS[0], std=std or MNIST_STATS[1], class_names=[str(d) for d in range(10)],
    )  # fmt: skip
