"""Datasets (in-memory uint8 splits), seeded batch augmentation and a shardable batch loader.

Importing this package registers every loader in ``DATASETS``:
``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``image_folder``, ``canvases``
(segmentation: masks as labels), the file-backed segmentation sets ``cityscapes``, ``ade20k``
and ``pascal_voc`` (read batch by batch: :mod:`mtkd.data.seg_files`), ``canvases_det`` (detection:
packed boxes as labels, :mod:`mtkd.data.det_canvases`) and the file-backed detection sets ``coco`` and
``pascal_voc_det`` (read batch by batch: :mod:`mtkd.data.det_files`).
"""
from mtkd.data import (canvases, cifar, det_canvases, det_files, folder, idx,  # noqa: F401  (registers the loaders)
                       seg_files)
from mtkd.data.augment import AugmentParams, apply_augment, augment_batch, augment_params, normalize
from mtkd.data.cifar import RestrictedUnpickler, UnsafePickleError
from mtkd.data.dataset import IGNORE_INDEX, DataError, DataNotFoundError, ImageDataset, channel_stats, subset
from mtkd.data.idx import read_idx
from mtkd.data.loader import (Batch, BatchLoader, augment_bank_table, augment_generator, bank_slots, derive_seed,
                              epoch_order)
from mtkd.data.registry import DATASETS, load_dataset, train_test
from mtkd.data.seg_files import SegmentationFileSet

__all__ = [
    "DATASETS",
    "AugmentParams",
    "Batch",
    "BatchLoader",
    "IGNORE_INDEX",
    "DataError",
    "DataNotFoundError",
    "ImageDataset",
    "RestrictedUnpickler",
    "SegmentationFileSet",
    "UnsafePickleError",
    "apply_augment",
    "augment_bank_table",
    "augment_batch",
    "augment_generator",
    "augment_params",
    "bank_slots",
    "channel_stats",
    "derive_seed",
    "epoch_order",
    "load_dataset",
    "normalize",
    "read_idx",
    "subset",
    "train_test",
]
