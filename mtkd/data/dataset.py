"""The in-memory dataset every loader returns, and helpers on it (subset, channel statistics)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import torch

from mtkd.errors import UserError

Stats = tuple[float, ...]


class DataError(UserError, ValueError):
    """A dataset file is corrupt or unreadable, or asks for what the data cannot give (a subset
    larger than the split, labels out of range)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset's files, or the folder that should hold them, are missing."""


@dataclass(eq=False)
class ImageDataset:
    """A whole split of an image dataset, held in memory: classification (a label per image) or
    semantic segmentation (a mask per image).

    Attributes:
        images: ``[N, C, H, W]`` uint8 pixels.
        labels: ``[N]`` int64 class indices in ``[0, num_classes)`` (classification), or ``[N, H, W]``
            uint8 masks with values in ``[0, num_classes)`` or ``IGNORE_INDEX`` (255, pixels that take no
            part: segmentation).
        num_classes: number of classes.
        name: registry name of the dataset (``"fashion_mnist"``, ...).
        split: ``"train"``, ``"test"`` or an image-folder split name.
        mean: per-channel mean in ``[0, 1]`` scale, from the *train* split (also for test).
        std: per-channel standard deviation in ``[0, 1]`` scale, from the train split.
        class_names: optional ``num_classes`` human-readable names.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    split: str
    mean: Stats
    std: Stats
    class_names: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        _check_images_labels(self.images, self.labels, self.num_classes, f"{self.name}/{self.split}")
        channels = self.images.shape[1]
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}/{self.split}: mean/std have {len(self.mean)}/{len(self.std)} entries; "
                f"expected one per channel ({channels})"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}/{self.split}: {len(self.class_names)} class names; expected {self.num_classes}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i`` as ``(image [C, H, W] uint8, label [] int64)``."""
        return self.images[i], self.labels[i]

    @property
    def task(self) -> str:
        """``"segmentation"`` when the labels are masks, else ``"classification"``."""
        return "segmentation" if self.labels.dim() == 3 else "classification"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @cached_property
    def digest(self) -> str:
        """First 16 hex chars of sha256 over shapes, image bytes and label bytes (content identity)."""
        h = hashlib.sha256(f"images{list(self.images.shape)}labels{list(self.labels.shape)}".encode())
        h.update(self.images.contiguous().numpy())
        h.update(self.labels.contiguous().numpy())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={list(self.image_shape)}, num_classes={self.num_classes})"
        )


IGNORE_INDEX = 255
"""Mask value of pixels that take no part in losses and metrics (padding, unlabelled)."""


def _check_images_labels(images: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"{what}: images must be uint8 [N, C, H, W]; got {images.dtype} {list(images.shape)}")
    if labels.dim() == 3:
        _check_masks(images, labels, num_classes, what)
        return
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise ValueError(f"{what}: labels must be int64 [N]; got {labels.dtype} {list(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{what}: {images.shape[0]} images but {labels.shape[0]} labels; expected equal counts")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what}: labels span [{int(labels.min())}, {int(labels.max())}]; expected [0, {num_classes - 1}]"
        )


def _check_masks(images: torch.Tensor, masks: torch.Tensor, num_classes: int, what: str) -> None:
    if masks.dtype != torch.uint8:
        raise ValueError(f"{what}: masks must be uint8 [N, H, W]; got {masks.dtype}")
    if masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
        raise ValueError(f"{what}: masks {list(masks.shape)} do not match images {list(images.shape)}; expected "
                         f"[N, H, W] = [{images.shape[0]}, {images.shape[2]}, {images.shape[3]}]")
    if num_classes > IGNORE_INDEX:
        raise ValueError(f"{what}: {num_classes} classes; masks hold at most {IGNORE_INDEX}")
    values = torch.unique(masks)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.numel():
        raise ValueError(f"{what}: mask value {int(bad[0])} is out of range; expected [0, {num_classes - 1}] or "
                         f"{IGNORE_INDEX} (ignored)")


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[Stats, Stats]:
    """Per-channel mean and std of uint8 images in ``[0, 1]`` scale, in float64 chunks.

    Args:
        images: ``[N, C, H, W]`` uint8.
        chunk: samples per chunk (bounds the float64 temporary).

    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    if images.shape[0] == 0:
        raise ValueError("channel_stats: got 0 images; expected at least one")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def subset(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """A seeded random subset of ``n`` samples (kept in the original order), for small demos.

    The subset keeps the parent's name, split, mean and std; its ``digest`` differs.

    Args:
        dataset: the parent dataset (a file-backed segmentation split returns its own subset of files).
        n: number of samples, ``1 <= n <= len(dataset)``.
        seed: seed of the ``torch.Generator`` that picks the samples.
    """
    if not isinstance(dataset, ImageDataset):  # a split read from files takes its own subset
        return dataset.subset(n, seed)
    if not 1 <= n <= len(dataset):
        raise DataError(f"subset: n={n}; expected 1 <= n <= {len(dataset)} (size of {dataset.name}/{dataset.split})")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:n].sort().values
    return ImageDataset(
        images=dataset.images[index].contiguous(),
        labels=dataset.labels[index].contiguous(),
        num_classes=dataset.num_classes,
        name=dataset.name,
        split=dataset.split,
        mean=dataset.mean,
        std=dataset.std,
        class_names=dataset.class_names,
    )
