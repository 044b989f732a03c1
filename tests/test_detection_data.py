"""Detection data: canvas boxes from the visible masks, COCO and VOC files, augmentation moving boxes."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import needs_fashion
from mtkd.data.dataset import DataError, DataNotFoundError
from mtkd.data.seg_augment import SegAugmentConfig, apply_seg_augment, seg_augment_params
from mtkd.detection.augment import det_augment_batch
from mtkd.detection.boxes import target_valid
from mtkd.detection.formats import VOC_DET_CLASSES, read_coco, read_voc


@pytest.fixture(scope="module")
def canvases():
    from mtkd.data.canvases import CanvasParams, garment_pool
    from mtkd.detection.canvas_boxes import DetectionCanvases, canvas_instances

    data = DetectionCanvases("train", num_canvases=48, params=CanvasParams(size=48))
    c = data.canvases
    instance, coverage = canvas_instances(garment_pool("train").images, c.layout, c.params)
    return data, instance, coverage


# ---- canvases ------------------------------------------------------------------------------------


@needs_fashion
def test_instance_map_gives_back_the_canvas_masks(canvases):
    data, instance, _ = canvases
    label = data.canvases.layout.label
    classes = torch.where(instance >= 0, label.gather(1, instance.clamp(min=0).flatten(1)).view_as(instance) + 1, 0)
    assert torch.equal(classes, data.canvases.masks.long())
    assert (instance >= 0).any() and len(set(instance.unique().tolist())) > 3


@needs_fashion
def test_canvas_boxes_are_the_tight_boxes_of_the_visible_garments(canvases):
    data, instance, coverage = canvases
    targets, layout = data.targets, data.canvases.layout
    assert targets.shape == (48, 5, 5)
    kept = dropped = 0
    for b in range(48):
        for g in range(int(layout.count[b])):
            ys, xs = np.nonzero(instance[b].numpy() == g)
            row = targets[b, g].tolist()
            if ys.size == 0 or ys.size < 0.3 * int(coverage[b, g]):
                assert row == [-1, 0, 0, 0, 0]
                dropped += 1
                continue
            assert row == [int(layout.label[b, g]), xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            kept += 1
        assert (targets[b, int(layout.count[b]):, 0] == -1).all()
    assert kept > 100 and dropped > 0


@needs_fashion
def test_canvas_boxes_are_deterministic_and_cached(tmp_path, canvases):
    from mtkd.data.canvases import CanvasParams
    from mtkd.detection.canvas_boxes import DetectionCanvases

    data, _, _ = canvases
    fewer = DetectionCanvases("train", num_canvases=20, params=CanvasParams(size=48), cache_dir=tmp_path)
    assert torch.equal(fewer.targets, data.targets[:20])
    again = DetectionCanvases("train", num_canvases=20, params=CanvasParams(size=48), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("canvas-boxes-*.safetensors"))) == 1
    assert torch.equal(again.targets, data.targets[:20])
    looser = DetectionCanvases("train", num_canvases=20, params=CanvasParams(size=48), min_visible=0.0)
    assert target_valid(looser.targets).sum() >= target_valid(fewer.targets).sum()
    images, targets = fewer.batch(torch.tensor([3, 1]))
    assert images.shape == (2, 1, 48, 48) and images.dtype == torch.float32 and torch.equal(targets, fewer.targets[[3, 1]])


@needs_fashion
def test_augmentation_moves_boxes_with_the_image(canvases):
    data, instance, _ = canvases
    config = SegAugmentConfig(crop_size=(40, 44), padding=4, hflip=True, scale=(0.7, 1.5))
    images, targets = data.canvases.images[:32], data.targets[:32]
    out, moved = det_augment_batch(images, targets, torch.Generator().manual_seed(5), config, min_kept=0.0)
    params = seg_augment_params(32, (48, 48), torch.Generator().manual_seed(5), config)
    same_images, moved_instances = apply_seg_augment(images, (instance[:32] + 1).to(torch.uint8), params, config)
    assert torch.equal(out, same_images) and out.shape == (32, 1, 40, 44)
    assert params.flip.any() and (~params.flip).any()
    checked = contained = 0
    for b in range(32):
        for g in range(5):
            if targets[b, g, 0] < 0:
                continue
            ys, xs = np.nonzero(moved_instances[b].numpy() == g + 1)
            if moved[b, g, 0] < 0:
                assert ys.size <= 44  # dropped: at most a sliver thinner than a pixel stays
                continue
            mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            box = moved[b, g, 1:].numpy()
            # nearest sampling moves a mask edge by less than one output pixel; a box cut by the crop
            # contains what is left of the garment (its visible pixels need not reach the cut)
            assert (box[:2] <= mask_box[:2] + 1 + 1e-6).all() and (box[2:] >= mask_box[2:] - 1 - 1e-6).all()
            if 0 < box[0] and 0 < box[1] and box[2] < 44 and box[3] < 40:
                np.testing.assert_allclose(box, mask_box, atol=1.0 + 1e-6)
                checked += 1
            assert moved[b, g, 0] == targets[b, g, 0]
            contained += 1
    assert checked > 12 and contained > 60


def test_augmentation_without_changes_keeps_boxes_and_drops_cropped_ones():
    targets = torch.tensor([[[2.0, 1, 2, 9, 7], [0, 30, 30, 40, 40], [-1, 0, 0, 0, 0]]])
    images = torch.rand(1, 3, 16, 16)
    out, moved = det_augment_batch(images, targets, torch.Generator().manual_seed(0), SegAugmentConfig(hflip=False))
    assert torch.equal(out, images) and torch.equal(moved[0, 0], targets[0, 0])
    assert moved[0, 1:, 0].tolist() == [-1, -1]  # outside the 16 x 16 image: dropped


# ---- COCO ----------------------------------------------------------------------------------------


def write_coco(folder, annotations=None, images=None) -> str:
    path = folder / "annotations" / "instances_val2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "images": images or [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                             {"id": 11, "file_name": "b.png", "width": 20, "height": 20},
                             {"id": 12, "file_name": "c.png", "width": 20, "height": 20}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "person"}],
        "annotations": annotations or [
            {"id": 7, "image_id": 10, "category_id": 3, "bbox": [2.5, 4, 10, 6], "iscrowd": 0},
            {"id": 8, "image_id": 10, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},
            {"id": 9, "image_id": 11, "category_id": 1, "bbox": [5, 5, 15.5, 2]},
        ],
    }
    path.write_text(json.dumps(data))
    return str(path)


def test_coco_reader(tmp_path):
    files = read_coco(write_coco(tmp_path))
    assert files.class_names == ["person", "cat"] and files.category_ids == [1, 3]
    a, b, c = files.records
    assert (a.image_id, a.width, a.height) == (10, 40, 30)
    assert a.path == tmp_path / "val2017" / "a.png"
    assert a.boxes.tolist() == [[2.5, 4, 12.5, 10], [0, 0, 40, 30]] and a.labels.tolist() == [1, 0]
    assert a.ignore.tolist() == [False, True] and b.boxes.tolist() == [[5, 5, 20, 7]] and c.boxes.shape == (0, 4)
    targets = files.targets([0, 1, 2])
    assert targets.shape == (3, 1, 5) and targets[0, 0].tolist() == [1, 2.5, 4, 12.5, 10]  # the crowd box left out
    assert len(read_coco(write_coco(tmp_path), keep_empty=False)) == 2


@pytest.mark.parametrize("annotation, message", [
    ({"id": 21, "image_id": 10, "category_id": 5, "bbox": [1, 1, 5, 5]},
     r"annotation 21 \(image 10\): unknown category_id 5; the file's categories are \[1, 3\]"),
    ({"id": 22, "image_id": 10, "category_id": 1, "bbox": [30, 1, 15, 5]},
     r"annotation 22 \(image 10\): box .* = \[30.0, 1.0, 45.0, 6.0\] lies outside its 40x30"),
    ({"id": 23, "image_id": 11, "category_id": 1, "bbox": [-3, 1, 5, 5]},
     r"annotation 23 \(image 11\): box .* outside its 20x20"),
    ({"id": 24, "image_id": 10, "category_id": 3, "bbox": [3, 1, 0, 5]}, r"annotation 24 \(image 10\): degenerate box"),
    ({"id": 25, "image_id": 10, "category_id": 3, "bbox": [3, 1, 4, -2]}, r"annotation 25 \(image 10\): degenerate box"),
    ({"id": 26, "image_id": 99, "category_id": 3, "bbox": [3, 1, 4, 2]}, "annotation 26: unknown image_id 99"),
    ({"id": 27, "image_id": 10, "category_id": 3}, "annotation 27: needs image_id, category_id and bbox"),
])  # fmt: skip
def test_coco_reader_refuses_bad_annotations_by_name(tmp_path, annotation, message):
    path = write_coco(tmp_path, annotations=[annotation])
    with pytest.raises(DataError, match=re.escape(f"coco: {path}: ") + message) as info:
        read_coco(path)
    assert "\n" not in str(info.value)


def test_coco_reader_refuses_broken_files(tmp_path):
    broken = tmp_path / "instances_x.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=f"{broken} is not readable JSON"):
        read_coco(broken)
    broken.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="lacks 'annotations'"):
        read_coco(broken)


def test_coco_image_reading_checks_the_size(tmp_path):
    from PIL import Image

    files = read_coco(write_coco(tmp_path))
    (tmp_path / "val2017").mkdir()
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(tmp_path / "val2017" / "a.png")
    Image.fromarray(np.zeros((21, 20, 3), np.uint8)).save(tmp_path / "val2017" / "b.png")
    image = files.read_image(0)
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8 and int(image[1, 3, 3]) == 7
    with pytest.raises(DataError, match="b.png is 20x21 .* says 20x20"):
        files.read_image(1)


# ---- Pascal VOC ----------------------------------------------------------------------------------


def voc_xml(objects, width=50, height=40) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, difficult, (x0, y0, x1, y1) in objects)
    return (f"<annotation><filename>img.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


def write_voc(root, files: dict[str, str], split=("one", "two")):
    base = root / "VOCdevkit" / "VOC2012"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for stem, text in files.items():
        (base / "Annotations" / f"{stem}.xml").write_text(text)
    (base / "ImageSets" / "Main" / "val.txt").write_text("\n".join(split) + "\n")
    return base


def test_voc_reader(tmp_path):
    base = write_voc(tmp_path, {"one": voc_xml([("dog", 0, (1, 1, 50, 40)), ("person", 1, (10, 5, 10, 9))]),
                                "two": voc_xml([("tvmonitor", 0, (3, 4, 20, 30))], 60, 45)})
    files = read_voc(tmp_path, "val")
    assert files.source == base and files.num_classes == 20 and len(files) == 2
    one, two = files.records
    # 1-based inclusive indices: xmin..xmax covers [xmin - 1, xmax)
    assert one.boxes.tolist() == [[0, 0, 50, 40], [9, 4, 10, 9]]
    assert one.labels.tolist() == [VOC_DET_CLASSES.index("dog"), VOC_DET_CLASSES.index("person")]
    assert one.ignore.tolist() == [False, True] and (two.width, two.height) == (60, 45)
    assert one.path == base / "JPEGImages" / "img.jpg"
    assert files.targets([0]).shape == (1, 1, 5)  # the difficult box is not a training target


@pytest.mark.parametrize("objects, message", [
    ([("dog", 0, (1, 1, 5, 5)), ("dragon", 0, (1, 1, 5, 5))], r"object 1 \(dragon\): unknown class 'dragon'"),
    ([("cat", 0, (10, 1, 52, 5))], r"object 0 \(cat\): box .* outside its 50x40 image"),
    ([("cat", 0, (10, -1, 20, 5))], r"object 0 \(cat\): box .* outside its 50x40 image"),
    ([("cat", 0, (10, 8, 9, 20))], r"object 0 \(cat\): degenerate box"),
])  # fmt: skip
def test_voc_reader_refuses_bad_objects_by_name(tmp_path, objects, message):
    base = write_voc(tmp_path, {"one": voc_xml([("dog", 0, (1, 1, 5, 5))]), "two": voc_xml(objects)})
    with pytest.raises(DataError, match=re.escape(f"pascal_voc: {base / 'Annotations' / 'two.xml'}: ") + message) as info:
        read_voc(tmp_path, "val")
    assert "\n" not in str(info.value)


def test_voc_reader_refuses_missing_files(tmp_path):
    write_voc(tmp_path, {"one": voc_xml([])}, split=("one", "three"))
    with pytest.raises(DataNotFoundError, match=r"three.xml \(listed in .*val.txt\) is missing"):
        read_voc(tmp_path, "val")
    with pytest.raises(DataNotFoundError, match="has no Annotations"):
        read_voc(tmp_path / "nowhere", "val")
