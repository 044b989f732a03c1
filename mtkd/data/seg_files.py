"""File-backed segmentation splits that training reads batch by batch: Cityscapes, ADE20K, Pascal VOC.

Registered in ``DATASETS`` as ``cityscapes``, ``ade20k`` and ``pascal_voc`` (``data.name``, with
``data.root`` the folder of the standard layout, see :mod:`mtkd.data.seg_formats`). A split holds
its file list only: a batch decodes its own files (``read_threads`` at a time) and keeps nothing,
so a split of any size never sits in memory. The registry's ``train`` split is the set's
``train_split`` option (default ``train``), its ``test`` split the ``test_split`` option (default
``val``: the test masks of these sets are not public).

How :meth:`SegmentationFileSet.load_batch` makes a batch:

* training split, augmented (``data.augment``): each sample in batch order, drawn from the batch's
  generator (``augment_generator(seed, epoch, k)``, so a batch depends only on seed, epoch and its
  index): a random scale in ``scale`` (image bilinear, mask nearest), a random crop of
  ``crop_size`` (a scaled image smaller than the crop lands at a random place in it; the rest is
  padding: the image at its mean, the mask 255), a flip with p = 0.5 (``data.hflip``);
* training split, not augmented: the centre crop of ``crop_size`` of each image (padded alike);
* evaluation split: whole images at their own resolution; a batch of different sizes is padded at
  the bottom and right to its largest image (padding labelled 255: never scored).

So the networks' input size (``image_shape``) is ``(3, *crop_size)`` on both splits.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Sequence

import torch

from mtkd.data.augment import normalize
from mtkd.data.dataset import DataError, DataNotFoundError
from mtkd.data.registry import DATASETS
from mtkd.data.seg_augment import IGNORE_INDEX, SegAugmentConfig, SegAugmentParams, apply_seg_augment, seg_collate
from mtkd.data.seg_formats import SegmentationFiles, ade20k, cityscapes, pascal_voc

DEFAULT_SCALE = (0.5, 2.0)


class SegmentationFileSet:
    """One split of a segmentation set on disk, in the shape training expects of a dataset.

    It offers what the engine reads of an in-memory ``ImageDataset`` (``name``, ``split``,
    ``num_classes``, ``class_names``, ``mean``, ``std``, ``image_shape``, ``digest``, ``task``,
    ``len``) and :meth:`load_batch` in place of ``images``/``labels``.

    Args:
        files: the split's image/mask pairs (a reader of :mod:`mtkd.data.seg_formats`).
        crop_size: ``(h, w)`` (or one int) of training crops.
        scale: ``(lo, hi)`` range of the random scale of augmented training crops.
        whole_images: True for an evaluation split (whole images), False for a training split (crops).
        read_threads: files decoded at once for a batch (1: one after the other).
    """

    task = "segmentation"
    ignore_index = IGNORE_INDEX

    def __init__(self, files: SegmentationFiles, crop_size: int | Sequence[int], scale: Sequence[float] = DEFAULT_SCALE,
                 *, whole_images: bool = False, read_threads: int = 4) -> None:
        self.files = files
        self.name, self.split = files.name, files.split
        self.num_classes, self.class_names = files.num_classes, list(files.class_names)
        self.mean, self.std = files.mean, files.std
        self.crop_size = _pair(crop_size, files.name)
        self.scale = _scale(scale, files.name)
        self.whole_images = bool(whole_images)
        if isinstance(read_threads, bool) or not isinstance(read_threads, int) or read_threads < 1:
            raise DataError(f"{self.name}: data.options.read_threads={read_threads!r}; expected an int >= 1")
        self.read_threads = read_threads

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, h, w)``: the crop size, the input size networks are built and checked for."""
        return (3, *self.crop_size)

    @cached_property
    def digest(self) -> str:
        """16 hex chars of sha256 over the name, split, crop settings and each file's name, size and
        modification time (a stat per file, nothing decoded): what keys cached teacher outputs."""
        h = hashlib.sha256(repr((self.name, self.split, self.crop_size, self.scale, self.whole_images)).encode())
        for pair in self.files.pairs:
            for path in pair:
                stat = path.stat()
                h.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def subset(self, n: int, seed: int = 0) -> "SegmentationFileSet":
        """A seeded random subset of ``n`` pairs, in the original order (as ``mtkd.data.subset``)."""
        if not 1 <= n <= len(self):
            raise DataError(f"subset: n={n}; expected 1 <= n <= {len(self)} (size of {self.name}/{self.split})")
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        f = self.files
        files = SegmentationFiles(f.name, f.split, [f.pairs[i] for i in index.tolist()], f.num_classes,
                                  f.class_names, f.table, f.expected, mean=f.mean, std=f.std)
        return SegmentationFileSet(files, self.crop_size, self.scale, whole_images=self.whole_images,
                                   read_threads=self.read_threads)

    def read(self, index: torch.Tensor | Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pairs ``index`` as read (``image [3, H, W] uint8``, ``mask [H, W] uint8``), in order;
        an unreadable file, a mask of another size or a value of no class raises ``DataError``."""
        ids = [int(i) for i in index]
        if self.read_threads > 1 and len(ids) > 1:
            with ThreadPoolExecutor(min(self.read_threads, len(ids))) as pool:  # Pillow decodes without the GIL
                pairs = list(pool.map(self.files.read_pair, ids))
        else:
            pairs = [self.files.read_pair(i) for i in ids]
        return [(image, mask.to(torch.uint8)) for image, mask in pairs]  # class ids and 255 fit a byte

    def load_batch(self, index: torch.Tensor | Sequence[int], generator: torch.Generator | None = None,
                   hflip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and prepare the samples ``index`` (see the module docstring).

        Args:
            index: ``[B]`` sample indices.
            generator: the batch's generator: augment (training split only); None: no augmentation.
            hflip: with a generator, flip samples with p = 0.5.

        Returns:
            ``(images [B, 3, h, w] float32 normalised, masks [B, h, w] int64, 255 ignored)``: ``(h, w)``
            the crop size, or for an evaluation split the largest image of the batch.
        """
        pairs = self.read(index)
        if self.whole_images:
            return self._whole(pairs)
        config = SegAugmentConfig(crop_size=self.crop_size, hflip=bool(hflip), scale=self.scale, fill=self.mean)
        if generator is not None:
            images, masks = seg_collate(pairs, generator, config)
        else:
            crops = [apply_seg_augment(image[None], mask[None], centre_crop(mask.shape, self.crop_size), config)
                     for image, mask in pairs]
            images, masks = torch.cat([c[0] for c in crops]), torch.cat([c[1] for c in crops])
        return normalize(images, self.mean, self.std), masks.long()

    def _whole(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        height = max(mask.shape[0] for _, mask in pairs)
        width = max(mask.shape[1] for _, mask in pairs)
        images = torch.zeros(len(pairs), 3, height, width)  # 0: the mean, once normalised
        masks = torch.full((len(pairs), height, width), IGNORE_INDEX, dtype=torch.int64)
        for b, (image, mask) in enumerate(pairs):
            h, w = mask.shape
            images[b, :, :h, :w] = normalize(image[None], self.mean, self.std)[0]
            masks[b, :h, :w] = mask
        return images, masks

    def __repr__(self) -> str:
        return (f"SegmentationFileSet(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"crop_size={self.crop_size}, whole_images={self.whole_images})")


def centre_crop(size: tuple[int, int], crop: tuple[int, int]) -> SegAugmentParams:
    """The centre ``crop`` of an ``size = (H, W)`` image as the parameters of one sample (no scale,
    no flip; an image smaller than the crop sits in its middle, padded)."""
    one = lambda v: torch.tensor([int(v)], dtype=torch.int64)  # noqa: E731
    (h, w), (ch, cw) = size, crop
    return SegAugmentParams(torch.ones(1, dtype=torch.float64), one(h), one(w), one((h - ch) // 2),
                            one((w - cw) // 2), torch.zeros(1, dtype=torch.bool))


def _pair(value, name: str) -> tuple[int, int]:
    size = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise DataError(f"{name}: data.options.crop_size={value!r}; expected [h, w] (or one int) with h, w >= 1")
    return int(size[0]), int(size[1])


def _scale(value, name: str) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not 0 < value[0] <= value[1]:
        raise DataError(f"{name}: data.options.scale={value!r}; expected [lo, hi] with 0 < lo <= hi")
    return float(value[0]), float(value[1])


def _open(reader, name: str, layout: str, root, split: str, train_split: str, test_split: str, mean, std,
          crop_size, scale, read_threads) -> SegmentationFileSet:
    if root is None:
        raise DataNotFoundError(f"{name}: no root folder (data.root, or --root of mtkd eval); expected the folder "
                                f"of {layout}")
    files = reader(root, {"train": train_split, "test": test_split}.get(split, split), mean=mean, std=std)
    return SegmentationFileSet(files, crop_size, scale, whole_images=split != "train", read_threads=read_threads)


@DATASETS.register(name="cityscapes")
def cityscapes_split(root=None, split="train", *, mean=None, std=None, crop_size=(512, 1024), scale=DEFAULT_SCALE,
                     train_split="train", test_split="val", read_threads=4) -> SegmentationFileSet:
    """Cityscapes fine annotations (19 classes) read from ``root`` batch by batch.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"`` (``train_split``: crops) or ``"test"`` (``test_split``: whole images).
        mean, std: normalisation (default ImageNet's).
        crop_size: ``[h, w]`` of training crops (CIRKD's 512x1024).
        scale: ``[lo, hi]`` random scale of augmented crops.
        train_split, test_split: the folders under ``leftImg8bit/`` of the two splits.
        read_threads: files decoded at once.

    Example YAML:
        data: {name: cityscapes, root: /data/cityscapes, options: {crop_size: [512, 1024]}}
    """
    return _open(cityscapes, "cityscapes", "leftImg8bit/{split}/{city}/*.png and gtFine/{split}/{city}/*.png", root,
                 split, train_split, test_split, mean, std, crop_size, scale, read_threads)


@DATASETS.register(name="ade20k")
def ade20k_split(root=None, split="train", *, mean=None, std=None, crop_size=(512, 512), scale=DEFAULT_SCALE,
                 train_split="train", test_split="val", read_threads=4) -> SegmentationFileSet:
    """ADE20K / SceneParsing (150 classes) read from ``root`` batch by batch; arguments as ``cityscapes``
    (``root``: ``ADEChallengeData2016`` or its parent; splits ``train``/``val``)."""
    return _open(ade20k, "ade20k", "ADEChallengeData2016/{images,annotations}/{training,validation}/", root, split,
                 train_split, test_split, mean, std, crop_size, scale, read_threads)


@DATASETS.register(name="pascal_voc")
def pascal_voc_split(root=None, split="train", *, mean=None, std=None, crop_size=(512, 512), scale=DEFAULT_SCALE,
                     train_split="train", test_split="val", read_threads=4) -> SegmentationFileSet:
    """Pascal VOC 2012 segmentation (21 classes) read from ``root`` batch by batch; arguments as
    ``cityscapes`` (``root``: ``VOC2012`` or a folder holding it; splits: lists in ``ImageSets/Segmentation``)."""
    return _open(pascal_voc, "pascal_voc", "VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}", root,
                 split, train_split, test_split, mean, std, crop_size, scale, read_threads)


for _loader in (cityscapes_split, ade20k_split, pascal_voc_split):
    _loader.task = "segmentation"  # read by mtkd.tasks.dataset_task before any file is opened
    _loader.file_backed = True  # read by DataConfig: needs data.root, no augment bank
