"""An in-memory detection split in the shape training reads: images, packed boxes, batches that move
the boxes with the images.

:class:`DetectionSet` offers what the engine reads of an ``ImageDataset`` (``name``, ``split``,
``num_classes``, ``class_names``, ``mean``, ``std``, ``image_shape``, ``digest``, ``task``, ``len``,
``subset``) and :meth:`DetectionSet.load_batch` in place of ``images``/``labels`` (a batch's labels
are its packed targets ``[B, N, 5]``, N fixed per set, so every batch has the same N).

A training batch (``BatchLoader`` with ``augment``) draws, sample by sample from the batch's
generator, a pad-and-crop shift of up to ``crop_padding`` pixels, a flip (``hflip``) and, with
``scale``, a random scale (:func:`mtkd.detection.augment.det_augment_batch`); the boxes move by the
same map and a box cut below a quarter of its area becomes padding. These draws have no
``AugmentParams`` (the cache key's name of an augmentation), so a detection batch carries
``augment=None``: a run with a cache of teacher outputs must not augment, and no set takes an
augmentation bank (:class:`mtkd.config.DataConfig`, ``ExperimentConfig``).

COCO and Pascal VOC files are not held in memory: :class:`mtkd.data.det_files.DetectionFileSet` offers
the same interface and reads each batch's images from their files.
"""
from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Sequence

import torch

from mtkd.data.augment import normalize
from mtkd.data.dataset import DataError
from mtkd.data.seg_augment import SegAugmentConfig
from mtkd.detection.augment import det_augment_batch
from mtkd.detection.boxes import target_valid

__all__ = ["DetectionSet"]


class DetectionSet:
    """One detection split held in memory.

    Args:
        images: ``[S, C, H, W]`` uint8.
        targets: ``[S, N, 5]`` float32 packed boxes ``(class, x0, y0, x1, y1)``, class -1 for padding.
        num_classes: K (no background class).
        name, split: registry name and split.
        mean, std: per-channel normalisation in ``[0, 1]`` scale (the train split's).
        class_names: K names, or None.
        scale: ``(lo, hi)`` random scale of augmented training batches, or None (shift and flip only).
        content_key: what determines the split (hashed into :attr:`digest` with the targets' shape).
    """

    task = "detection"

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, num_classes: int, name: str, split: str,
                 mean: Sequence[float], std: Sequence[float], class_names: Sequence[str] | None = None,
                 scale: Sequence[float] | None = None, content_key: str = "") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{name}/{split}: images must be uint8 [S, C, H, W]; got {images.dtype} "
                            f"{list(images.shape)}")
        if targets.ndim != 3 or targets.shape[-1] != 5 or targets.shape[0] != images.shape[0]:
            raise DataError(f"{name}/{split}: targets {list(targets.shape)}; expected [{images.shape[0]}, N, 5]")
        valid = target_valid(targets)
        if valid.any() and int(targets[..., 0][valid].max()) >= num_classes:
            raise DataError(f"{name}/{split}: a box of class {int(targets[..., 0][valid].max())}; expected classes "
                            f"0..{num_classes - 1}")
        if scale is not None and (len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1])):
            raise DataError(f"{name}: data.options.augment_scale={list(scale)!r}; expected [lo, hi] with 0 < lo <= hi, "
                            f"or null")
        self.images, self.targets = images, targets.to(torch.float32)
        self.num_classes, self.name, self.split = int(num_classes), name, split
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.class_names = list(class_names) if class_names is not None else None
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.content_key = content_key

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def max_objects(self) -> int:
        """N, the object slots of every sample (and so of every batch)."""
        return self.targets.shape[1]

    @cached_property
    def digest(self) -> str:
        """16 hex chars of sha256 over the content key (or the image bytes), the targets and the scale."""
        h = hashlib.sha256(f"{self.name}|{self.split}|{list(self.images.shape)}|{self.scale}".encode())
        h.update(self.content_key.encode() if self.content_key else self.images.contiguous().numpy().tobytes())
        h.update(self.targets.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, n: int, seed: int = 0) -> "DetectionSet":
        """A seeded random subset of ``n`` samples, in the original order (as ``mtkd.data.subset``)."""
        if not 1 <= n <= len(self):
            raise DataError(f"subset: n={n}; expected 1 <= n <= {len(self)} (size of {self.name}/{self.split})")
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return DetectionSet(self.images[index].contiguous(), self.targets[index].contiguous(), self.num_classes,
                            self.name, self.split, self.mean, self.std, self.class_names, self.scale,
                            f"{self.content_key}|subset:{index.tolist()}" if self.content_key else "")

    def load_batch(self, index: torch.Tensor, generator: torch.Generator | None = None, hflip: bool = True,
                   crop_padding: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``index [B]`` -> ``(images [B, C, H, W] float32 normalised, targets [B, N, 5])``.

        With a ``generator`` each sample is augmented (see the module docstring): shifted by up to
        ``crop_padding`` pixels (padding black, as the classification crop), flipped with p = 0.5 when
        ``hflip``, scaled when the set has a ``scale``; its boxes move with it. None: as stored.
        """
        images, targets = self.images[index], self.targets[index]
        if generator is not None:
            config = SegAugmentConfig(crop_size=None, padding=int(crop_padding), hflip=bool(hflip), scale=self.scale)
            images, targets = det_augment_batch(images, targets, generator, config)
        return normalize(images, self.mean, self.std), targets

    def __repr__(self) -> str:
        return (f"DetectionSet(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={list(self.image_shape)}, num_classes={self.num_classes}, max_objects={self.max_objects})")
