"""``image_folder``: ``root/<split>/<class_name>/*.png|jpg|jpeg`` decoded with Pillow into memory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtkd.data.dataset import DataError, DataNotFoundError, ImageDataset, channel_stats
from mtkd.data.registry import DATASETS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_MODES = {1: "L", 3: "RGB"}


def _class_dirs(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataNotFoundError(f"image_folder: no split folder {split_dir}; expected root/<split>/<class>/*.png|jpg")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not names:
        raise DataError(f"image_folder: {split_dir} has no class sub-folders; expected {split_dir}/<class>/*.png|jpg")
    return names


def _list_files(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image paths under ``split_dir`` (sorted per class) and their class indices in ``classes``."""
    unknown = sorted(set(_class_dirs(split_dir)) - set(classes))
    if unknown:
        raise DataError(f"image_folder: {split_dir} has classes {unknown} absent from the train split {classes}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(f"image_folder: no .png/.jpg/.jpeg files under {split_dir}/<class>/")
    return paths, labels


def _decode(paths: list[Path], channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """Decode ``paths`` to ``[N, H, W, C]`` uint8; all must share one size unless ``size`` resizes them."""
    from PIL import Image  # Pillow is a dependency of matplotlib; imported here to keep `import mtkd` light

    arrays, first_size = [], None
    for path in paths:
        try:
            with Image.open(path) as raw:
                img = raw.convert(_MODES[channels])  # decodes the whole image
        except OSError as err:  # Pillow's UnidentifiedImageError, a truncated file...
            raise DataError(f"image_folder: {path} is not a readable image ({err}); expected a PNG or JPEG") from err
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        first_size = first_size or (img.size, path)
        if img.size != first_size[0]:
            raise DataError(
                f"image_folder: {path} is {img.size[0]}x{img.size[1]} (WxH) but {first_size[1]} is "
                f"{first_size[0][0]}x{first_size[0][1]}; expected one size, or pass image_size= to resize"
            )
        arrays.append(np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels))
    return np.stack(arrays)


def _read_split(root: Path, split: str, classes: list[str], channels: int, size) -> tuple[torch.Tensor, torch.Tensor]:
    paths, labels = _list_files(root / split, classes)
    images = torch.from_numpy(_decode(paths, channels, size)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64)


@DATASETS.register
def image_folder(
    root=None,
    split="train",
    *,
    channels: int = 3,
    image_size: int | tuple[int, int] | None = None,
    mean=None,
    std=None,
) -> ImageDataset:
    """A folder of images, one sub-folder per class: ``root/<split>/<class_name>/*.png|jpg|jpeg``.

    Classes are the train split's sub-folders sorted by name (so every split maps names to the
    same indices). mean/std are computed from the train split; loading another split without
    ``mean``/``std`` therefore decodes the train split too (``train_test`` avoids that).

    Args:
        root: the folder holding ``train/``, ``test/``, ...
        split: sub-folder name.
        channels: 3 (RGB) or 1 (L, greyscale); every image is converted.
        image_size: ``S`` or ``(H, W)`` to resize every image (bilinear); ``None`` requires one size.
        mean, std: per-channel statistics in ``[0, 1]`` scale to use instead of computing them.

    Example YAML:
        data: {name: image_folder, kwargs: {root: /data/pets, channels: 3, image_size: 64}}
    """
    if root is None:
        raise DataNotFoundError("image_folder: root= is required; expected a folder root/<split>/<class>/*.png|jpg")
    if channels not in _MODES:
        raise ValueError(f"image_folder: channels={channels}; expected 1 (L) or 3 (RGB)")
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    root = Path(root)
    train_dir = root / "train"
    classes = _class_dirs(train_dir if train_dir.is_dir() else root / split)
    images, labels = _read_split(root, split, classes, channels, size)
    if mean is None or std is None:
        if split != "train" and not train_dir.is_dir():
            raise DataNotFoundError(
                f"image_folder: split {split!r} is normalised with the train split's statistics, but {train_dir} "
                "is missing; pass mean= and std= (per channel, [0, 1] scale)"
            )
        stats_images = images if split == "train" else _read_split(root, "train", classes, channels, size)[0]
        mean, std = channel_stats(stats_images)
    return ImageDataset(images, labels, len(classes), "image_folder", split, mean, std, class_names=classes)
