"""The dataset registry and the two entry points that use it.

Every entry is a loader ``f(root=None, split="train", *, mean=None, std=None, **kwargs)`` returning an
in-memory ``ImageDataset``, or a split read from files batch by batch (``SegmentationFileSet``) or a
detection split (``DetectionSet``): each has ``name``, ``split``, ``task``, ``num_classes``,
``image_shape``, ``mean``/``std``, ``digest`` and ``subset``, and the batch loader takes them all.
``mean``/``std`` override the normalisation statistics (``train_test`` uses them to hand the
train split's statistics to the test split without recomputing them).
"""
from __future__ import annotations

from typing import Callable

from mtkd.data.dataset import ImageDataset
from mtkd.registry import Registry

DatasetLoader = Callable[..., ImageDataset]

DATASETS: Registry[DatasetLoader] = Registry("dataset")


def load_dataset(name: str, root: str | None = None, split: str = "train", **kwargs) -> ImageDataset:
    """Load one split of a registered dataset.

    Args:
        name: registry name (``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``image_folder``).
        root: folder holding the files; ``None`` uses the loader's default where it has one.
        split: ``"train"`` or ``"test"`` (image folders: any sub-folder name).
        **kwargs: loader-specific options (e.g. ``channels``, ``image_size`` for ``image_folder``).

    Returns:
        The split as an ``ImageDataset`` (uint8 ``[N, C, H, W]`` images, int64 ``[N]`` labels).

    Example YAML:
        data: {name: fashion_mnist, kwargs: {root: /usr/share/datasets/fashion-mnist}}
    """
    return DATASETS.get(name)(root=root, split=split, **kwargs)


def train_test(name: str, root: str | None = None, **kwargs) -> tuple[ImageDataset, ImageDataset]:
    """Load the ``train`` and ``test`` splits; the test split carries the train split's mean/std."""
    train = load_dataset(name, root, "train", **kwargs)
    kwargs = {**kwargs, "mean": train.mean, "std": train.std}
    return train, load_dataset(name, root, "test", **kwargs)
