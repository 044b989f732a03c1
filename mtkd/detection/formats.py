"""Detection annotations in their standard files: COCO ``instances_*.json`` and Pascal VOC
``Annotations/*.xml``.

Both readers return a :class:`DetectionFiles`: one :class:`DetectionRecord` per image (its file,
size, boxes in continuous pixel coordinates, contiguous class ids, and the boxes evaluation ignores:
COCO's ``iscrowd``, VOC's ``difficult``). Every annotation is checked when the file is read; a box
outside its image (by more than ``tolerance`` pixels), an unknown category and a degenerate box
(no width or height) are refused with one line naming the file and the annotation.

Conventions: a COCO ``bbox`` ``[x, y, w, h]`` is the box ``(x, y, x + w, y + h)``; categories map to
``0..K-1`` in increasing id order. A VOC ``bndbox`` holds 1-based inclusive pixel indices, so
``xmin..xmax`` is ``(xmin - 1, xmax)``; classes are the 20 VOC object classes (no background).

Training reads them through the registered sets ``coco`` and ``pascal_voc_det``
(:mod:`mtkd.data.det_files`: letterboxed or augmented batches, a fixed number of box slots per image).
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from mtkd.data.dataset import DataError, DataNotFoundError
from mtkd.detection.boxes import pack_targets

__all__ = ["VOC_DET_CLASSES", "DetectionFiles", "DetectionRecord", "read_coco", "read_voc"]

VOC_DET_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


@dataclass
class DetectionRecord:
    """One annotated image.

    Attributes:
        image_id: the file's image id (COCO ``id``; VOC: the position in the split list).
        path: the image file.
        width, height: its size, as the annotation says.
        boxes: ``[n, 4]`` float32 xyxy.
        labels: ``[n]`` int64 in ``[0, K)``.
        ignore: ``[n]`` bool, boxes that are neither trained on nor scored (crowd, difficult).
        names: ``[n]`` how the file names each annotation (for messages).
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor
    ignore: torch.Tensor
    names: list[str] = field(default_factory=list)


@dataclass
class DetectionFiles:
    """An annotated split.

    Attributes:
        name: ``"coco"`` or ``"pascal_voc"``.
        source: the annotation file (COCO) or folder (VOC).
        records: one per image, in the file's (COCO) or list's (VOC) order.
        class_names: K names.
        category_ids: K ids of the file (COCO; VOC: ``0..K-1``), to write results back.
    """

    name: str
    source: Path
    records: list[DetectionRecord]
    class_names: list[str]
    category_ids: list[int]

    task = "detection"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def targets(self, index: Sequence[int], min_rows: int = 0) -> torch.Tensor:
        """Packed targets ``[B, N, 5]`` of records ``index``, without their ignored boxes."""
        picked = [self.records[int(i)] for i in index]
        return pack_targets([r.boxes[~r.ignore] for r in picked], [r.labels[~r.ignore] for r in picked], min_rows)

    def read_image(self, i: int) -> torch.Tensor:
        """Record ``i``'s image as uint8 ``[3, H, W]`` RGB; refused if its size is not the annotated one."""
        import numpy as np
        from PIL import Image

        record = self.records[i]
        if not record.path.is_file():
            raise DataNotFoundError(f"{self.name}: image {record.path} (image {record.image_id}, annotated in "
                                    f"{self.source}) is missing")
        try:
            with Image.open(record.path) as im:
                array = np.asarray(im.convert("RGB"))
        except OSError as err:  # Pillow's UnidentifiedImageError, a truncated file...
            raise DataError(f"{self.name}: image {record.path} (image {record.image_id}) is not a readable image "
                            f"({err}); expected a JPEG or PNG") from None
        if array.shape[:2] != (record.height, record.width):
            raise DataError(f"{self.name}: image {record.path} is {array.shape[1]}x{array.shape[0]} (WxH) but "
                            f"{self.source} says {record.width}x{record.height}")
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _check_box(where: str, what: str, box: Sequence[float], width: int, height: int, tolerance: float) -> list[float]:
    """``(x0, y0, x1, y1)`` checked against its image; slightly outside (within ``tolerance``) is clipped."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        raise DataError(f"{where}: {what}: box {list(box)} is not finite")
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: {what}: degenerate box (x0, y0, x1, y1) = {list(box)}; width and height must be > 0")
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise DataError(f"{where}: {what}: box (x0, y0, x1, y1) = {list(box)} lies outside its "
                        f"{width}x{height} image")
    return [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]


def _record(image_id, path, width, height, boxes, labels, ignore, names) -> DetectionRecord:
    return DetectionRecord(int(image_id), Path(path), int(width), int(height),
                           torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                           torch.tensor(labels, dtype=torch.int64), torch.tensor(ignore, dtype=torch.bool), names)


# ---- COCO ----------------------------------------------------------------------------------------


def read_coco(annotation_file: str | Path, image_dir: str | Path | None = None, tolerance: float = 1.0,
              keep_empty: bool = True) -> DetectionFiles:
    """Read a COCO detection file (``instances_*.json``).

    Args:
        annotation_file: the JSON file.
        image_dir: the folder of its images (default: next to the file, ``../<split>`` as COCO ships:
            ``annotations/instances_val2017.json`` -> ``val2017/``).
        tolerance: pixels a box may stick out of its image (clipped); beyond that it is refused.
        keep_empty: keep images without annotations (COCO's evaluation scores them).

    Returns:
        :class:`DetectionFiles` with ``name = "coco"``.

    Raises:
        DataNotFoundError: the file is missing.
        DataError: unreadable JSON, a missing key, an annotation of an unknown image or category, a
            degenerate box or one outside its image (naming the file and the annotation id).
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise DataNotFoundError(f"coco: annotation file {path} is missing")
    try:
        data = json.loads(path.read_text())
        images, annotations, categories = data["images"], data["annotations"], data["categories"]
    except (OSError, ValueError) as err:
        raise DataError(f"coco: {path} is not readable JSON ({err})") from None
    except (KeyError, TypeError) as err:
        raise DataError(f"coco: {path} lacks {err}; expected the keys images, annotations, categories") from None
    if image_dir is None:
        image_dir = path.parent.parent / path.stem.removeprefix("instances_")
    try:
        cat_ids = sorted(int(c["id"]) for c in categories)
        names = {int(c["id"]): str(c["name"]) for c in categories}
        by_image = {int(im["id"]): (str(im["file_name"]), int(im["width"]), int(im["height"])) for im in images}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"coco: {path}: a category or image entry lacks {err} (or it is not a number)") from None
    contiguous = {cid: k for k, cid in enumerate(cat_ids)}
    rows: dict[int, list] = {i: [] for i in by_image}
    for n, ann in enumerate(annotations):
        what = f"annotation {ann.get('id', f'#{n}')}"
        try:
            image_id, category, bbox = int(ann["image_id"]), int(ann["category_id"]), ann["bbox"]
            x, y, w, h = (float(v) for v in bbox)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"coco: {path}: {what}: needs image_id, category_id and bbox [x, y, w, h] ({err})") from None
        if image_id not in by_image:
            raise DataError(f"coco: {path}: {what}: unknown image_id {image_id}")
        if category not in contiguous:
            raise DataError(f"coco: {path}: {what} (image {image_id}): unknown category_id {category}; "
                            f"the file's categories are {cat_ids}")
        _, width, height = by_image[image_id]
        box = _check_box(f"coco: {path}", f"{what} (image {image_id})", [x, y, x + w, y + h], width, height, tolerance)
        rows[image_id].append((box, contiguous[category], bool(ann.get("iscrowd", 0)), what))
    records = []
    for image_id, (file_name, width, height) in by_image.items():
        found = rows[image_id]
        if not found and not keep_empty:
            continue
        records.append(_record(image_id, Path(image_dir) / file_name, width, height, [r[0] for r in found],
                               [r[1] for r in found], [r[2] for r in found], [r[3] for r in found]))
    return DetectionFiles("coco", path, records, [names[c] for c in cat_ids], cat_ids)


# ---- Pascal VOC ----------------------------------------------------------------------------------


def _voc_root(root: Path) -> Path:
    for candidate in (root, root / "VOC2012", root / "VOC2007", root / "VOCdevkit" / "VOC2012",
                      root / "VOCdevkit" / "VOC2007"):
        if (candidate / "Annotations").is_dir():
            return candidate
    raise DataNotFoundError(f"pascal_voc: {root} has no Annotations/ folder (nor VOC2012/, VOC2007/, VOCdevkit/)")


def _voc_number(node: ET.Element | None, tag: str, where: str) -> float:
    text = None if node is None else node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DataError(f"{where}: <{tag}> is {text!r}; expected a number") from None


def read_voc_file(xml_file: Path, class_names: Sequence[str] = VOC_DET_CLASSES, image_id: int = 0,
                  tolerance: float = 1.0) -> DetectionRecord:
    """One VOC annotation file -> :class:`DetectionRecord` (image path ``../JPEGImages/<filename>``).

    Raises:
        DataError: unparsable XML, a missing size, an unknown class name, a degenerate box or one outside
            the image (naming the file and the object: its index and class).
    """
    try:
        root = ET.parse(xml_file).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"pascal_voc: {xml_file} is not readable XML ({err})") from None
    where = f"pascal_voc: {xml_file}"
    size = root.find("size")
    width, height = int(_voc_number(size, "width", where)), int(_voc_number(size, "height", where))
    lookup = {name: k for k, name in enumerate(class_names)}
    boxes, labels, ignore, names = [], [], [], []
    for n, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        what = f"object {n} ({name or 'no name'})"
        if name not in lookup:
            raise DataError(f"{where}: {what}: unknown class {name!r}; expected one of {list(class_names)}")
        bnd = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (_voc_number(bnd, t, f"{where}: {what}") for t in ("xmin", "ymin", "xmax", "ymax"))
        # 1-based inclusive pixel indices -> continuous coordinates
        boxes.append(_check_box(where, what, [xmin - 1, ymin - 1, xmax, ymax], width, height, tolerance))
        labels.append(lookup[name])
        ignore.append(obj.findtext("difficult", "0").strip() == "1")
        names.append(what)
    filename = root.findtext("filename") or f"{xml_file.stem}.jpg"
    return _record(image_id, xml_file.parent.parent / "JPEGImages" / filename, width, height, boxes, labels, ignore,
                   names)


def read_voc(root: str | Path, split: str = "trainval", class_names: Sequence[str] = VOC_DET_CLASSES,
             tolerance: float = 1.0) -> DetectionFiles:
    """Read a Pascal VOC detection split: ``ImageSets/Main/<split>.txt`` and its ``Annotations/*.xml``.

    Args:
        root: the ``VOC2012``/``VOC2007`` folder, or a folder holding it (or ``VOCdevkit/``).
        split: the list's name (``train``, ``val``, ``trainval``, ``test``).
        class_names: the classes, in id order.
        tolerance: pixels a box may stick out of its image (clipped).

    Returns:
        :class:`DetectionFiles` with ``name = "pascal_voc"`` (``difficult`` boxes marked ignore).
    """
    base = _voc_root(Path(root))
    listing = base / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DataNotFoundError(f"pascal_voc: split list {listing} is missing")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"pascal_voc: split list {listing} is empty")
    records = []
    for i, stem in enumerate(ids):
        xml_file = base / "Annotations" / f"{stem}.xml"
        if not xml_file.is_file():
            raise DataNotFoundError(f"pascal_voc: {xml_file} (listed in {listing}) is missing")
        records.append(read_voc_file(xml_file, class_names, i, tolerance))
    return DetectionFiles("pascal_voc", base, records, list(class_names), list(range(len(class_names))))
