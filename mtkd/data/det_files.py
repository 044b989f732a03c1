"""File-backed detection splits that training reads batch by batch: COCO and Pascal VOC.

Registered in ``DATASETS`` as ``coco`` and ``pascal_voc_det`` (``data.name``; ``pascal_voc`` is the
segmentation set, as ``canvases``/``canvases_det``), with ``task = "detection"``. ``data.root`` is the
folder of the standard layout, read by :mod:`mtkd.detection.formats`:

* ``coco``: ``annotations/instances_<split>.json`` and the images in ``<split>/`` (``train2017``,
  ``val2017``); category ids map to ``0..K-1`` in increasing id order (``DetectionFiles.category_ids``
  keeps the way back);
* ``pascal_voc_det``: a ``VOC2007``/``VOC2012`` folder (or one holding it, or ``VOCdevkit/``):
  ``ImageSets/Main/<split>.txt``, ``Annotations/*.xml``, ``JPEGImages/``; the 20 VOC classes.

A split holds its annotations (boxes, a few numbers per object) and its file list; a batch decodes its
own images (``read_threads`` at a time, Pillow as the segmentation files) and keeps nothing. Every
annotation is checked when the split opens (one line naming the file and the annotation: a box outside
its image, an unknown category, a degenerate box), and so is every image file's presence and each
image's box count against ``max_objects``; an image of another size than annotated, or not an image,
is refused when its batch reads it.

Boxes that are neither trained on nor scored are left out of the targets: COCO's ``iscrowd``, and VOC's
``difficult`` with ``difficult: drop`` (the default; ``keep`` trains and scores them as any object).
The training split of ``coco`` also leaves out images without any annotation (as detector recipes
do); the test split keeps them (their detections are false positives).

How :meth:`DetectionFileSet.load_batch` makes a batch of ``input_size = (h, w)`` images with their
boxes ``[B, N, 5]`` (``N = max_objects``, padding rows class -1):

* **letterbox** (no generator: evaluation, or ``data.augment: false``): the image scaled by
  ``s0 = min(h / H, w / W)`` (bilinear, :mod:`mtkd.data.seg_augment`'s resampling) into the top-left
  corner, the rest padding at the mean (0 once normalised); boxes scaled the same way, none dropped;
* **augmented** (``data.augment``, each sample in batch order from the batch's generator
  ``augment_generator(seed, epoch, k)``): :func:`mtkd.detection.augment.det_augment_batch`'s draws for
  one sample with the scale range ``scale * s0``: a random scale around the letterbox, a random
  ``h x w`` crop (a smaller scaled image lands at a random place in it; ``data.crop_padding`` more pixels
  of slack), a flip with p = 0.5 (``data.hflip``); boxes move with the image, and a box cut below a
  quarter of its area (or thinner than a pixel) becomes padding.

mAP is computed on the letterboxed frame (IoU does not change under the scale); it is the COCO
evaluation of these targets, so a detection on a crowd or dropped difficult box counts as a false
positive where the official tools ignore it (docs/detection.md).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from mtkd.data.augment import normalize
from mtkd.data.dataset import DataError, DataNotFoundError
from mtkd.data.registry import DATASETS
from mtkd.data.seg_augment import SegAugmentConfig, SegAugmentParams, apply_seg_augment, seg_augment_params

if TYPE_CHECKING:
    from mtkd.detection.formats import DetectionFiles

__all__ = ["DetectionFileSet", "fit_scale", "letterbox_params"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEFAULT_SCALE = (0.6, 1.4)  # CenterNet's random scale
DIFFICULT = ("drop", "keep")


def fit_scale(size: tuple[int, int], input_size: tuple[int, int]) -> float:
    """The letterbox scale ``min(h / H, w / W)`` of an ``size = (H, W)`` image in ``input_size = (h, w)``."""
    return min(input_size[0] / size[0], input_size[1] / size[1])


def letterbox_params(size: tuple[int, int], input_size: tuple[int, int]) -> SegAugmentParams:
    """One sample's augmentation parameters of the letterbox: scaled by :func:`fit_scale` (rounded sizes
    ``max(1, round(H * s0))``, as ``seg_augment_params``), at the top-left corner, not flipped."""
    s0 = fit_scale(size, input_size)
    one = lambda v: torch.tensor([int(v)], dtype=torch.int64)  # noqa: E731
    return SegAugmentParams(torch.tensor([s0], dtype=torch.float64), one(max(1, int(size[0] * s0 + 0.5))),
                            one(max(1, int(size[1] * s0 + 0.5))), one(0), one(0), torch.zeros(1, dtype=torch.bool))


class DetectionFileSet:
    """One split of a detection set on disk, in the shape training reads (as ``DetectionSet``).

    It offers what the engine reads of a detection split (``name``, ``split``, ``task``, ``num_classes``,
    ``class_names``, ``mean``, ``std``, ``image_shape``, ``max_objects``, ``digest``, ``len``,
    ``subset``) and :meth:`load_batch`.

    Args:
        files: the split's annotations (:func:`~mtkd.detection.formats.read_coco` / ``read_voc``).
        name, split: registry name and split.
        input_size: ``(h, w)`` (or one int) of every batch's images.
        max_objects: N, box slots per image (an image with more boxes is refused).
        scale: ``(lo, hi)`` random scale of augmented batches, relative to the letterbox.
        mean, std: normalisation (``[0, 1]`` scale; default ImageNet's).
        read_threads: images decoded (and resampled) at once for a batch.

    Raises:
        DataError: a bad option, or an image with more than ``max_objects`` boxes (naming it).
        DataNotFoundError: an image file of the split is missing (naming it and its annotation file).
    """

    task = "detection"

    def __init__(self, files: "DetectionFiles", name: str, split: str, input_size: int | Sequence[int],
                 max_objects: int, scale: Sequence[float] = DEFAULT_SCALE, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, read_threads: int = 4) -> None:
        check_values(name, input_size=input_size, max_objects=max_objects, scale=scale, read_threads=read_threads)
        self.files, self.name, self.split = files, name, split
        self.num_classes, self.class_names = files.num_classes, list(files.class_names)
        self.input_size = _pair(input_size)
        self.max_objects, self.read_threads = int(max_objects), int(read_threads)
        self.scale = (float(scale[0]), float(scale[1]))
        self.mean = tuple(map(float, mean or IMAGENET_STATS[0]))
        self.std = tuple(map(float, std or IMAGENET_STATS[1]))
        self._stats = []  # (file name, bytes, mtime) per image: the digest, without decoding anything
        for record in files.records:
            boxes = int((~record.ignore).sum())
            if boxes > self.max_objects:
                raise DataError(f"{name}: image {record.image_id} ({record.path}, in {files.source}) has {boxes} boxes "
                                f"but data.options.max_objects={self.max_objects}; expected at most max_objects boxes "
                                f"per image (raise max_objects to {boxes} or more)")
            try:
                stat = record.path.stat()
            except FileNotFoundError:
                raise DataNotFoundError(f"{name}: image file {record.path} (image {record.image_id}, annotated in "
                                        f"{files.source}) is missing") from None
            self._stats.append((record.path.name, stat.st_size, stat.st_mtime_ns))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, h, w)``: the input size, what networks are built and checked for."""
        return (3, *self.input_size)

    @cached_property
    def digest(self) -> str:
        """16 hex chars of sha256 over the name, split, settings, each image file's name, size and
        modification time, and the targets (nothing decoded)."""
        h = hashlib.sha256(repr((self.name, self.split, self.input_size, self.scale, self.max_objects,
                                 self.files.category_ids)).encode())
        for (file_name, size, mtime), record in zip(self._stats, self.files.records):
            h.update(f"{file_name}|{size}|{mtime}\n".encode())
            keep = ~record.ignore
            h.update(record.boxes[keep].contiguous().numpy().tobytes())
            h.update(record.labels[keep].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, n: int, seed: int = 0) -> "DetectionFileSet":
        """A seeded random subset of ``n`` images, in the original order (as ``mtkd.data.subset``)."""
        from mtkd.detection.formats import DetectionFiles

        if not 1 <= n <= len(self):
            raise DataError(f"subset: n={n}; expected 1 <= n <= {len(self)} (size of {self.name}/{self.split})")
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        f = self.files
        files = DetectionFiles(f.name, f.source, [f.records[i] for i in index.tolist()], f.class_names, f.category_ids)
        return DetectionFileSet(files, self.name, self.split, self.input_size, self.max_objects, self.scale, self.mean,
                                self.std, self.read_threads)

    def targets(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``[B, N, 5]`` packed boxes of images ``index`` as annotated (image pixels, before any resize)."""
        return self.files.targets([int(i) for i in index], self.max_objects)

    def load_batch(self, index: torch.Tensor | Sequence[int], generator: torch.Generator | None = None,
                   hflip: bool = True, crop_padding: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and prepare images ``index [B]`` (see the module docstring).

        Args:
            index: ``[B]`` image indices.
            generator: the batch's generator: augment; None: letterbox only.
            hflip: with a generator, flip samples with p = 0.5.
            crop_padding: with a generator, extra pixels the random crop may take beyond the scaled image.

        Returns:
            ``(images [B, 3, h, w] float32 normalised, targets [B, N, 5] float32)``.
        """
        from mtkd.detection.augment import move_boxes

        ids = [int(i) for i in index]
        targets = self.targets(ids)
        jobs = []  # (record index, params, config, min_size, min_kept), drawn in sample order
        for i in ids:
            record = self.files.records[i]
            size = (record.height, record.width)
            if generator is None:
                config = SegAugmentConfig(crop_size=self.input_size, hflip=False, fill=self.mean)
                jobs.append((i, letterbox_params(size, self.input_size), config, 0.0, 0.0))
            else:
                s0 = fit_scale(size, self.input_size)
                config = SegAugmentConfig(crop_size=self.input_size, padding=int(crop_padding), hflip=bool(hflip),
                                          scale=(self.scale[0] * s0, self.scale[1] * s0), fill=self.mean)
                jobs.append((i, seg_augment_params(1, size, generator, config), config, 1.0, 0.25))

        def make(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            i, params, config, min_size, min_kept = jobs[b]
            image = self.files.read_image(i)[None]  # [1, 3, H, W] uint8, its size checked against the annotation
            blank = torch.zeros(1, *image.shape[2:], dtype=torch.uint8)  # the resampling reads a mask too
            out, _ = apply_seg_augment(image, blank, params, config)
            return out[0], move_boxes(targets[b:b + 1], params, tuple(image.shape[2:]), self.input_size, min_size,
                                      min_kept)[0]

        if self.read_threads > 1 and len(ids) > 1:
            with ThreadPoolExecutor(min(self.read_threads, len(ids))) as pool:  # Pillow decodes without the GIL
                samples = list(pool.map(make, range(len(ids))))
        else:
            samples = [make(b) for b in range(len(ids))]
        images = torch.stack([s[0] for s in samples])
        return normalize(images, self.mean, self.std), torch.stack([s[1] for s in samples])

    def __repr__(self) -> str:
        return (f"DetectionFileSet(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"input_size={self.input_size}, num_classes={self.num_classes}, max_objects={self.max_objects})")


# ---- options -------------------------------------------------------------------------------------


def _pair(value) -> tuple[int, int]:
    size = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    return int(size[0]), int(size[1])


def check_values(name: str, **options) -> None:
    """Refuse a bad value of a detection file set's option (``DataError`` naming it); files untouched."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if "input_size" in options:
        value = options["input_size"]
        size = [value, value] if is_int(value) else value
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(s) and s >= 1 for s in size):
            raise DataError(f"{name}: data.options.input_size={value!r}; expected [h, w] (or one int) with h, w >= 1")
    if "max_objects" in options and not (is_int(options["max_objects"]) and options["max_objects"] >= 1):
        raise DataError(f"{name}: data.options.max_objects={options['max_objects']!r}; expected an int >= 1 (box "
                        f"slots per image)")
    if "scale" in options:
        value = options["scale"]
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_num(v) for v in value)
        if not ok or not 0 < value[0] <= value[1]:
            raise DataError(f"{name}: data.options.scale={value!r}; expected [lo, hi] with 0 < lo <= hi")
    if "read_threads" in options and not (is_int(options["read_threads"]) and options["read_threads"] >= 1):
        raise DataError(f"{name}: data.options.read_threads={options['read_threads']!r}; expected an int >= 1")
    if "difficult" in options and options["difficult"] not in DIFFICULT:
        raise DataError(f"{name}: data.options.difficult={options['difficult']!r}; expected one of {list(DIFFICULT)}")
    for key in ("train_split", "test_split"):
        if key in options and not (isinstance(options[key], str) and options[key].strip()):
            raise DataError(f"{name}: data.options.{key}={options[key]!r}; expected a split name")


def _no_root(name: str, layout: str) -> DataNotFoundError:
    return DataNotFoundError(f"{name}: no root folder (data.root, or --root of mtkd eval); expected the folder of "
                             f"{layout}")


# ---- the registered sets -------------------------------------------------------------------------

COCO_LAYOUT = "annotations/instances_<split>.json and <split>/ (train2017, val2017)"
VOC_LAYOUT = "VOC2007/ or VOC2012/ (or VOCdevkit/ holding one): ImageSets/Main/<split>.txt, Annotations/, JPEGImages/"


@DATASETS.register(name="coco")
def coco_split(root=None, split="train", *, mean=None, std=None, input_size=(512, 512), max_objects: int = 128,
               scale=DEFAULT_SCALE, train_split: str = "train2017", test_split: str = "val2017",
               read_threads: int = 4) -> DetectionFileSet:
    """COCO detection (``instances_*.json``, K = the file's categories: 80 for COCO-2017) read batch by batch.

    Args:
        root: the folder holding ``annotations/`` and the image folders.
        split: ``"train"`` (``train_split``; images without annotations left out) or ``"test"``
            (``test_split``; all images).
        mean, std: normalisation (default ImageNet's).
        input_size: ``[h, w]`` of every batch (CenterNet's 512x512).
        max_objects: box slots per image, N (CenterNet's 128; COCO-2017's most is 93 with crowds left out).
        scale: ``[lo, hi]`` random scale of augmented batches, relative to the letterbox.
        train_split, test_split: the annotation files' ``<split>``.
        read_threads: images decoded at once.

    Example YAML:
        data: {name: coco, root: /data/coco, options: {input_size: [512, 512], max_objects: 128}}
    """
    from mtkd.detection.formats import read_coco

    check_values("coco", input_size=input_size, max_objects=max_objects, scale=scale, read_threads=read_threads,
                 train_split=train_split, test_split=test_split)
    if root is None:
        raise _no_root("coco", COCO_LAYOUT)
    which = {"train": train_split, "test": test_split}.get(split, split)
    files = read_coco(Path(root) / "annotations" / f"instances_{which}.json", Path(root) / which,
                      keep_empty=split != "train")
    return DetectionFileSet(files, "coco", split, input_size, max_objects, scale, mean, std, read_threads)


@DATASETS.register(name="pascal_voc_det")
def voc_detection_split(root=None, split="train", *, mean=None, std=None, input_size=(384, 384),
                        max_objects: int = 50, scale=DEFAULT_SCALE, train_split: str = "trainval",
                        test_split: str = "test", difficult: str = "drop", read_threads: int = 4) -> DetectionFileSet:
    """Pascal VOC detection (20 classes) read batch by batch.

    Args:
        root: a ``VOC2007``/``VOC2012`` folder, or one holding it (or ``VOCdevkit/``).
        split: ``"train"`` (``train_split``) or ``"test"`` (``test_split``): lists in ``ImageSets/Main``
            (VOC2007: trainval and test; VOC2012, whose test boxes are not public: train and val).
        mean, std: normalisation (default ImageNet's).
        input_size: ``[h, w]`` of every batch (CenterNet's VOC 384x384).
        max_objects: box slots per image, N (CenterNet's 50; VOC's most is 42, VOC2007 trainval).
        scale: ``[lo, hi]`` random scale of augmented batches, relative to the letterbox.
        train_split, test_split: the lists' names.
        difficult: ``drop`` (default: ``difficult`` objects are neither trained on nor in the scored ground
            truth) or ``keep`` (ordinary objects).
        read_threads: images decoded at once.

    Example YAML:
        data: {name: pascal_voc_det, root: /data/VOCdevkit/VOC2007, options: {input_size: [384, 384]}}
    """
    from mtkd.detection.formats import read_voc

    check_values("pascal_voc_det", input_size=input_size, max_objects=max_objects, scale=scale,
                 read_threads=read_threads, train_split=train_split, test_split=test_split, difficult=difficult)
    if root is None:
        raise _no_root("pascal_voc_det", VOC_LAYOUT)
    files = read_voc(root, {"train": train_split, "test": test_split}.get(split, split))
    if difficult == "keep":
        for record in files.records:
            record.ignore = torch.zeros_like(record.ignore)
    return DetectionFileSet(files, "pascal_voc_det", split, input_size, max_objects, scale, mean, std, read_threads)


for _loader, _name in ((coco_split, "coco"), (voc_detection_split, "pascal_voc_det")):
    _loader.task = "detection"  # read by mtkd.tasks.dataset_task before any file is opened
    _loader.check_options = (lambda name: lambda options: check_values(name, **options))(_name)  # by DataConfig
