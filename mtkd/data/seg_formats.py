"""Semantic-segmentation datasets in their standard layouts, read lazily with Pillow.

* ``cityscapes``: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
  ``gtFine/{split}/{city}/*_gtFine_labelIds.png``; the 34 labelIds map to the 19 train ids of the
  official table (``CITYSCAPES_LABEL_TO_TRAIN``), every other labelId to 255.
* ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; 150 classes, pixel value 0 -> 255, ``v`` -> ``v - 1``.
* ``pascal_voc``: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNG: the palette
  index is the class; 255 stays 255) and the lists ``ImageSets/Segmentation/{split}.txt``; 21 classes.

Every dataset yields ``(image [3, H, W] float32 normalised, mask [H, W] int64)`` with mask values
in ``[0, num_classes)`` or 255 (ignore). Missing files and empty splits are refused when the
dataset is built; a mask of another size than its image, or a value that maps to no class, when
the pair is read. Every error names the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mtkd.data.augment import normalize
from mtkd.data.dataset import DataError, DataNotFoundError
from mtkd.data.seg_augment import IGNORE_INDEX

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""The usual normalisation of RGB segmentation data (ImageNet's train statistics, ``[0, 1]`` scale)."""
_INVALID = -1  # a raw mask value that maps to no class

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
"""labelId -> trainId of cityscapesScripts' ``labels.py``; labelIds 0-33 not listed are ignored (255)."""
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]  # fmt: skip
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def _table(pairs: dict[int, int]) -> torch.Tensor:
    """A ``[256]`` int64 lookup table of raw mask values: ``pairs``, every other value ``_INVALID``."""
    table = torch.full((256,), _INVALID, dtype=torch.int64)
    for raw, mapped in pairs.items():
        table[raw] = mapped
    return table


CITYSCAPES_TABLE = _table({**{i: IGNORE_INDEX for i in range(34)}, **CITYSCAPES_LABEL_TO_TRAIN, 255: IGNORE_INDEX})
ADE20K_TABLE = _table({0: IGNORE_INDEX, **{v: v - 1 for v in range(1, 151)}})
VOC_TABLE = _table({**{i: i for i in range(21)}, 255: IGNORE_INDEX})


class SegmentationFiles(torch.utils.data.Dataset):
    """Image/mask file pairs of one split, decoded on access.

    Attributes:
        name: ``"cityscapes"``, ``"ade20k"`` or ``"pascal_voc"``.
        split: the split asked for.
        pairs: ``(image_path, mask_path)`` per sample, in a fixed (sorted) order.
        num_classes: classes of the masks (ignore pixels are 255).
        class_names: ``num_classes`` names.
        table: ``[256]`` int64 raw mask value -> class id or 255 (-1: no class, refused).
        expected: what a mask file should be (for error messages).
        mean, std: per-channel normalisation of the RGB images, ``[0, 1]`` scale.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, name: str, split: str, pairs: Sequence[tuple[Path, Path]], num_classes: int,
                 class_names: Sequence[str], table: torch.Tensor, expected: str, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:  # fmt: skip
        self.name, self.split, self.pairs = name, split, list(pairs)
        self.num_classes, self.class_names = num_classes, list(class_names)
        self.table, self.expected = table, expected
        self.mean = tuple(map(float, mean or IMAGENET_STATS[0]))
        self.std = tuple(map(float, std or IMAGENET_STATS[1]))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``i`` as ``(image [3, H, W] float32 normalised, mask [H, W] int64 in [0, num_classes) or 255)``."""
        image, mask = self.read_pair(i)
        return normalize(image[None], self.mean, self.std)[0], mask

    def read_pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``i`` as read: ``(image [3, H, W] uint8 RGB, mask [H, W] int64)``; a mask of another
        size than its image is refused (naming both files)."""
        image = self.read_image(i)
        mask = self.read_mask(i)
        if image.shape[1:] != mask.shape:
            image_path, mask_path = self.pairs[i]
            raise DataError(
                f"{self.name}: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{image_path} is {image.shape[2]}x{image.shape[1]}; expected the same size"
            )
        return image, mask

    def read_image(self, i: int) -> torch.Tensor:
        """Image ``i`` as ``[3, H, W]`` uint8 RGB (greyscale and CMYK files are converted)."""
        from PIL import Image

        path = self.pairs[i][0]
        try:
            with Image.open(path) as raw:
                img = raw.convert("RGB")
        except OSError as err:  # Pillow's UnidentifiedImageError, a truncated file...
            raise DataError(f"{self.name}: {path} is not a readable image ({err}); expected a PNG or JPEG") from err
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def read_mask(self, i: int) -> torch.Tensor:
        """Mask ``i`` as ``[H, W]`` int64 class ids (raw values mapped through ``table``)."""
        from PIL import Image

        path = self.pairs[i][1]
        try:
            with Image.open(path) as raw:
                if raw.mode not in ("L", "P"):
                    raise DataError(f"{self.name}: mask {path} has mode {raw.mode!r}; expected {self.expected}")
                raw.load()
                values = np.asarray(raw, dtype=np.uint8)  # a palette image gives its indices
        except OSError as err:
            message = f"{self.name}: mask {path} is not a readable PNG ({err}); expected {self.expected}"
            raise DataError(message) from err
        mask = self.table[torch.from_numpy(values.astype(np.int64))]
        bad = mask == _INVALID
        if bool(bad.any()):
            raw_values = sorted(set(torch.from_numpy(values.astype(np.int64))[bad].tolist()))
            raise DataError(
                f"{self.name}: mask {path} has values {raw_values[:8]} that map to no class; expected {self.expected}"
            )
        return mask

    def __repr__(self) -> str:
        return (f"SegmentationFiles(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes})")  # fmt: skip


def _need_dir(path: Path, name: str, layout: str) -> Path:
    if not path.is_dir():
        raise DataNotFoundError(f"{name}: folder {path} does not exist; expected {layout}")
    return path


def _refuse_empty(pairs: list, name: str, split: str, where: Path, layout: str) -> None:
    if not pairs:
        raise DataError(f"{name}: split {split!r} is empty: no images in {where}; expected {layout}")


def cityscapes(root: str | os.PathLike, split: str = "train", *, mean=None, std=None) -> SegmentationFiles:
    """Cityscapes (Cordts et al. 2016) fine annotations: 19 classes, labelIds mapped to train ids.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (a folder name under both).
        mean, std: per-channel normalisation; default ImageNet's.

    Returns:
        The split's pairs, sorted by city then file name.
    """
    layout = "root/leftImg8bit/{split}/{city}/*_leftImg8bit.png and root/gtFine/{split}/{city}/*_gtFine_labelIds.png"
    root = Path(root)
    image_dir = _need_dir(root / "leftImg8bit" / split, "cityscapes", layout)
    mask_dir = _need_dir(root / "gtFine" / split, "cityscapes", layout)
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    _refuse_empty(images, "cityscapes", split, image_dir, layout)
    pairs = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        pairs.append((image, mask_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"))
    masks = sorted(mask_dir.glob("*/*_gtFine_labelIds.png"))
    orphans = [image_dir / m.parent.name / f"{m.name[: -len('_gtFine_labelIds.png')]}_leftImg8bit.png" for m in masks]
    _check_files(pairs, orphans, "cityscapes")
    expected = "a *_gtFine_labelIds.png (8-bit labelIds 0-33)"
    return SegmentationFiles("cityscapes", split, pairs, 19, CITYSCAPES_CLASSES, CITYSCAPES_TABLE, expected,
                             mean=mean, std=std)  # fmt: skip


def _check_files(pairs: list[tuple[Path, Path]], expected_images: list[Path], name: str) -> None:
    """Refuse a pair whose mask (or image) is missing, and a mask whose image is missing."""
    for image, mask in pairs:
        if not image.is_file():
            raise DataNotFoundError(f"{name}: image file {image} is missing (its mask is {mask})")
        if not mask.is_file():
            raise DataNotFoundError(f"{name}: mask file {mask} is missing (for image {image})")
    for image in expected_images:
        if not image.is_file():
            raise DataNotFoundError(f"{name}: image file {image} is missing (a mask for it exists)")


_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def ade20k(root: str | os.PathLike, split: str = "train", *, mean=None, std=None) -> SegmentationFiles:
    """ADE20K / SceneParsing (Zhou et al. 2017), the 150-class challenge release.

    Args:
        root: ``ADEChallengeData2016`` itself or the folder holding it.
        split: ``"train"`` (``training``) or ``"val"`` (``validation``).
        mean, std: per-channel normalisation; default ImageNet's.

    Returns:
        The split's pairs sorted by file name; mask value 0 (other) is ignored, ``v`` is class ``v - 1``.
    """
    layout = "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"
    if split not in _ADE_SPLITS:
        raise DataError(f"ade20k: unknown split {split!r}; expected one of {sorted(_ADE_SPLITS)}")
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    folder = _ADE_SPLITS[split]
    image_dir = _need_dir(root / "images" / folder, "ade20k", layout)
    mask_dir = _need_dir(root / "annotations" / folder, "ade20k", layout)
    images = sorted(image_dir.glob("*.jpg"))
    _refuse_empty(images, "ade20k", split, image_dir, layout)
    pairs = [(image, mask_dir / f"{image.stem}.png") for image in images]
    orphans = [image_dir / f"{m.stem}.jpg" for m in sorted(mask_dir.glob("*.png"))]
    _check_files(pairs, orphans, "ade20k")
    expected = "an 8-bit PNG of values 0-150 (0 = other)"
    return SegmentationFiles("ade20k", split, pairs, 150, ADE20K_CLASSES, ADE20K_TABLE, expected, mean=mean, std=std)


def pascal_voc(root: str | os.PathLike, split: str = "train", *, mean=None, std=None) -> SegmentationFiles:
    """Pascal VOC 2012 segmentation (Everingham et al. 2010): 21 classes (0 = background).

    Args:
        root: ``VOC2012`` (holding ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/``), or a
            folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``.
        split: a list in ``ImageSets/Segmentation/`` (``"train"``, ``"val"``, ``"trainval"``).
        mean, std: per-channel normalisation; default ImageNet's.

    Returns:
        The split's pairs in list order; masks are palette indices (255 = boundary, ignored).
    """
    layout = "root/JPEGImages/*.jpg, root/SegmentationClass/*.png and root/ImageSets/Segmentation/{split}.txt"
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if candidate.is_dir():
            root = candidate
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise DataNotFoundError(f"pascal_voc: split list {list_file} does not exist; expected {layout}")
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    _refuse_empty(names, "pascal_voc", split, list_file, layout)
    pairs = [(root / "JPEGImages" / f"{n}.jpg", root / "SegmentationClass" / f"{n}.png") for n in names]
    _check_files(pairs, [], "pascal_voc")
    expected = "a palette (mode P) PNG whose indices are classes 0-20 or 255"
    return SegmentationFiles("pascal_voc", split, pairs, 21, VOC_CLASSES, VOC_TABLE, expected, mean=mean, std=std)
