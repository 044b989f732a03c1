"""COCO and Pascal VOC detection sets read from files batch by batch (mtkd/data/det_files.py), on small
files written here: letterboxed batches against an independent resize, augmented batches against
`det_augment_batch` per sample (and each moved box over its own colour), a batch reads only its files,
every bad input refused by name, and a 1-epoch in-process run on COCO files reaching mAP."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtkd.config import ConfigError, ExperimentConfig, TeacherSpec, load_config
from mtkd.data import BatchLoader, DataError, DataNotFoundError, augment_generator, load_dataset, train_test
from mtkd.data.det_files import IMAGENET_STATS, DetectionFileSet
from mtkd.data.seg_augment import SegAugmentConfig, seg_augment_params
from mtkd.detection.augment import det_augment_batch
from mtkd.detection.formats import VOC_DET_CLASSES
from mtkd.errors import UserError

# class key -> (COCO category id, name), and the VOC class of the same key
COCO_CATEGORIES = [(1, "person"), (3, "car"), (7, "kite")]  # contiguous ids 0, 1, 2 (increasing COCO id)
VOC_NAMES = ["person", "car", "dog"]
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # a box is painted in its class key's colour
# (file, COCO image id, (H, W), [(class key, (x0, y0, x1, y1) continuous pixels, crowd / difficult)])
TRAIN = [
    ("a.png", 1, (30, 40), [(2, (2, 3, 14, 13), 0), (0, (20, 8, 36, 26), 0), (1, (0, 20, 6, 30), 1)]),
    ("b.jpg", 2, (36, 24), [(1, (4, 6, 18, 26), 0)]),
    ("c.png", 5, (32, 32), [(0, (1, 1, 11, 11), 0), (2, (16, 14, 28, 28), 0)]),
    ("d.png", 6, (20, 50), [(1, (30, 2, 45, 17), 0)]),
    ("e.png", 9, (24, 24), []),  # no annotation: left out of COCO's training split
]
VAL = [
    ("f.png", 11, (40, 30), [(0, (3, 3, 13, 15), 0)]),
    ("g.png", 12, (28, 28), []),
    ("h.jpg", 13, (30, 45), [(2, (5, 5, 25, 17), 0), (1, (28, 10, 40, 25), 1)]),
]
SIZE = 32
OPTIONS = {"input_size": [SIZE, SIZE], "max_objects": 4, "read_threads": 2}
MEAN, STD = (torch.tensor(s).view(3, 1, 1) for s in IMAGENET_STATS)


def write_image(path: Path, hw: tuple[int, int], objects, seed: int) -> None:
    """Noise in [0, 60] with each non-crowd box painted in its class colour."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 61, (*hw, 3), dtype=np.uint8)
    for key, (x0, y0, x1, y1), flag in objects:
        if not flag:
            pixels[y0:y1, x0:x1] = PALETTE[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_coco(root: Path, split: str = "train2017", images=TRAIN) -> Path:
    """``root/annotations/instances_<split>.json`` and ``root/<split>/*``; returns the JSON file."""
    annotations = []
    for file_name, image_id, hw, objects in images:
        write_image(root / split / file_name, hw, objects, image_id)
        for key, (x0, y0, x1, y1), crowd in objects:
            annotations.append({"id": 100 + len(annotations), "image_id": image_id,
                                "category_id": COCO_CATEGORIES[key][0], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "iscrowd": crowd, "area": (x1 - x0) * (y1 - y0)})
    data = {"images": [{"id": i, "file_name": f, "width": hw[1], "height": hw[0]} for f, i, hw, _ in images],
            "annotations": annotations, "categories": [{"id": c, "name": name} for c, name in COCO_CATEGORIES]}
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def voc_xml(file_name: str, hw, objects) -> str:
    body = "".join(f"<object><name>{VOC_NAMES[key]}</name><difficult>{flag}</difficult><bndbox><xmin>{x0 + 1}</xmin>"
                   f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                   for key, (x0, y0, x1, y1), flag in objects)  # 1-based inclusive pixel indices
    return (f"<annotation><filename>{file_name}</filename><size><width>{hw[1]}</width><height>{hw[0]}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


def write_voc(root: Path) -> Path:
    """``root/VOCdevkit/VOC2007``: trainval = TRAIN, test = VAL; returns the VOC2007 folder."""
    base = root / "VOCdevkit" / "VOC2007"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, images in (("trainval", TRAIN), ("test", VAL)):
        for file_name, image_id, hw, objects in images:
            write_image(base / "JPEGImages" / file_name, hw, objects, image_id)
            (base / "Annotations" / f"{Path(file_name).stem}.xml").write_text(voc_xml(file_name, hw, objects))
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{Path(f).stem}\n" for f, *_ in images))
    return base


def smoke_coco(root: Path) -> dict:
    """Both COCO splits under ``root``; the loader options (tests/test_data.py's smoke test)."""
    write_coco(root, "train2017", TRAIN)
    write_coco(root, "val2017", VAL)
    return dict(OPTIONS)


def smoke_voc(root: Path) -> dict:
    write_voc(root)
    return dict(OPTIONS)


def expected_targets(kind: str, images, keep_flagged: bool = False, slots: int = 4) -> torch.Tensor:
    """``[S, slots, 5]`` packed targets straight from the spec (flagged boxes left out unless kept)."""
    out = torch.zeros(len(images), slots, 5)
    out[..., 0] = -1
    for s, (_, _, _, objects) in enumerate(images):
        rows = [((key if kind == "coco" else VOC_DET_CLASSES.index(VOC_NAMES[key])), *box)
                for key, box, flag in objects if keep_flagged or not flag]
        if rows:
            out[s, :len(rows)] = torch.tensor(rows, dtype=torch.float32)
    return out


def read_pixels(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def _error(call, kind=UserError) -> str:
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("kind", ["coco", "pascal_voc_det"])
def test_letterboxed_batches_are_an_independent_resize(kind, tmp_path):
    """Evaluation batches: each image resized by min(h / H, w / W) (F.interpolate, bilinear) into the
    top-left corner, padding at the mean; boxes scaled by the same sizes; contiguous class ids."""
    folder = (tmp_path / "val2017") if kind == "coco" else write_voc(tmp_path) / "JPEGImages"
    options = smoke_coco(tmp_path) if kind == "coco" else dict(OPTIONS)
    train, test = train_test(kind, str(tmp_path), **options)
    assert isinstance(test, DetectionFileSet) and test.task == "detection" and test.image_shape == (3, SIZE, SIZE)
    assert train.num_classes == (3 if kind == "coco" else 20) and test.max_objects == 4
    assert len(train) == (4 if kind == "coco" else 5) and len(test) == 3  # COCO trains on annotated images only
    batch = next(iter(BatchLoader(test, 3, shuffle=False)))
    targets = expected_targets(kind, VAL)
    for b, (file_name, _, (h, w), _) in enumerate(VAL):
        s0 = min(SIZE / h, SIZE / w)
        nh, nw = math.floor(h * s0 + 0.5), math.floor(w * s0 + 0.5)
        image = read_pixels(folder / file_name).float()[None] / 255
        resized = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False)[0]
        expected = MEAN.expand(3, SIZE, SIZE).clone()
        expected[:, :nh, :nw] = resized
        assert torch.allclose(batch.images[b], (expected - MEAN) / STD, atol=1e-5)
        boxes = targets[b].clone()
        valid = boxes[:, 0] >= 0
        boxes[valid, 1::2] *= nw / w
        boxes[valid, 2::2] *= nh / h
        assert torch.allclose(batch.labels[b], boxes, atol=1e-5)
    # not augmented, the training split is letterboxed too; VOC keeps difficult boxes when asked
    if kind == "pascal_voc_det":
        kept, _ = train_test(kind, str(tmp_path), **options, difficult="keep")
        assert (kept.targets([0])[0, :, 0] >= 0).sum() == 3 and (train.targets([0])[0, :, 0] >= 0).sum() == 2
        assert torch.equal(train.targets(range(5)), expected_targets(kind, TRAIN))


def test_augmented_batches_move_boxes_with_their_images_and_read_only_their_files(tmp_path):
    """A training batch = `det_augment_batch` of each sample in order, from the batch's generator, with
    the scale range times the letterbox scale; every kept box lies over its own colour; a batch decodes
    its own files and nothing else; the same seed, epoch and index give the same batch."""
    smoke_coco(tmp_path)
    options = {**OPTIONS, "scale": [0.8, 1.2]}
    train, _ = train_test("coco", str(tmp_path), **options)
    records = train.files.records
    assert [r.path.name for r in records] == [f for f, *_ in TRAIN[:4]]
    annotated = expected_targets("coco", TRAIN[:4])
    assert torch.equal(train.targets(range(4)), annotated)
    reads = []
    read_image = train.files.read_image
    train.files.read_image = lambda i: (reads.append(i), read_image(i))[1]
    flipped, boxes_seen = set(), 0
    for epoch in range(3):
        loader = BatchLoader(train, 2, augment=True, crop_padding=2, seed=4, drop_last=True)
        loader.set_epoch(epoch)
        for batch in loader:
            index = loader.sample_indices(batch.index)
            assert sorted(reads) == sorted(index.tolist()) and batch.augment is None
            reads.clear()
            generator = augment_generator(4, epoch, batch.index)
            for b, i in enumerate(index.tolist()):
                h, w = TRAIN[i][2]
                s0 = min(SIZE / h, SIZE / w)
                config = SegAugmentConfig(crop_size=(SIZE, SIZE), padding=2, hflip=True, scale=(0.8 * s0, 1.2 * s0),
                                          fill=tuple(IMAGENET_STATS[0]))
                state = generator.get_state()
                image, target = det_augment_batch(read_pixels(records[i].path)[None], annotated[i:i + 1], generator,
                                                  config)
                flipped.add(bool(seg_augment_params(1, (h, w), torch.Generator().set_state(state), config).flip))
                assert torch.allclose(batch.images[b], (image[0] - MEAN) / STD, atol=1e-5)
                assert torch.equal(batch.labels[b], target[0])
                pixels = batch.images[b] * STD + MEAN
                for row in target[0][target[0, :, 0] >= 0]:
                    cls, x0, y0, x1, y1 = row.tolist()
                    if min(x1 - x0, y1 - y0) >= 4:  # the centre pixel lies well inside the box's colour
                        colour = torch.tensor(PALETTE[int(cls)], dtype=torch.float32) / 255
                        assert torch.allclose(pixels[:, int((y0 + y1) / 2), int((x0 + x1) / 2)], colour, atol=0.2)
                        boxes_seen += 1
    assert boxes_seen >= 10 and flipped == {False, True}
    again = BatchLoader(train, 2, augment=True, crop_padding=2, seed=4, drop_last=True)
    again.set_epoch(2)
    assert all(torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) for x, y in zip(loader, again))
    assert not hasattr(train, "images") and train.subset(2, seed=1).digest != train.digest


# ------------------------------------------------------------------------------ bad input
def _coco_json(root: Path) -> tuple[Path, dict]:
    path = root / "annotations" / "instances_train2017.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("annotation, message", [
    ({"id": 901, "image_id": 1, "category_id": 1, "bbox": [35, 2, 10, 5]},
     r"annotation 901 \(image 1\): box .* lies outside its 40x30 image"),
    ({"id": 902, "image_id": 5, "category_id": 2, "bbox": [3, 3, 5, 5]},
     r"annotation 902 \(image 5\): unknown category_id 2"),
    ({"id": 903, "image_id": 6, "category_id": 3, "bbox": [3, 3, 0, 5]}, r"annotation 903 \(image 6\): degenerate box"),
])  # fmt: skip
def test_coco_refuses_bad_annotations_by_file_and_annotation(tmp_path, annotation, message):
    import re

    smoke_coco(tmp_path)
    path, data = _coco_json(tmp_path)
    data["annotations"].append(annotation)
    path.write_text(json.dumps(data))
    text = _error(lambda: load_dataset("coco", str(tmp_path), "train", **OPTIONS), DataError)
    assert str(path) in text and re.search(message, text), text


def test_coco_and_voc_refuse_bad_files_by_name(tmp_path):
    coco, voc = tmp_path / "coco", tmp_path / "voc"
    smoke_coco(coco)
    base = write_voc(voc)
    # a missing image: refused when the split opens, naming the file, its image and the annotation file
    (coco / "train2017" / "c.png").unlink()
    text = _error(lambda: load_dataset("coco", str(coco), "train", **OPTIONS), DataNotFoundError)
    assert str(coco / "train2017" / "c.png") in text and "image 5" in text and "instances_train2017.json" in text
    (base / "JPEGImages" / "d.png").unlink()
    text = _error(lambda: load_dataset("pascal_voc_det", str(voc), "train", **OPTIONS), DataNotFoundError)
    assert str(base / "JPEGImages" / "d.png") in text
    # more boxes than slots: the image and the option
    smoke_coco(coco)
    text = _error(lambda: load_dataset("coco", str(coco), "train", **{**OPTIONS, "max_objects": 1}), DataError)
    assert "image 1" in text and "a.png" in text and "has 2 boxes" in text and "max_objects=1" in text
    # VOC objects: outside, unknown class, degenerate (the file and the object)
    cases = [(("dog", (3, 3, 45, 9)), "object 0 (dog): box"), (("dragon", (3, 3, 9, 9)), "object 0 (dragon): unknown "
             "class 'dragon'"), (("cat", (8, 3, 7, 9)), "object 0 (cat): degenerate box")]
    xml = base / "Annotations" / "b.xml"
    for (name, (x0, y0, x1, y1)), message in cases:
        xml.write_text(f"<annotation><filename>b.jpg</filename><size><width>24</width><height>36</height></size>"
                       f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                       f"<ymax>{y1}</ymax></bndbox></object></annotation>")
        text = _error(lambda: load_dataset("pascal_voc_det", str(voc), "test", **{**OPTIONS, "test_split": "trainval"}),
                      DataError)
        assert str(xml) in text and message in text, text
    # an image of another size than annotated, a file that is no image: the batch that reads it names it
    train = load_dataset("coco", str(coco), "train", **OPTIONS)
    write_image(coco / "train2017" / "b.jpg", (35, 24), [], 0)
    text = _error(lambda: train.load_batch([1]), DataError)
    assert str(coco / "train2017" / "b.jpg") in text and "says 24x36" in text
    (coco / "train2017" / "d.png").write_bytes(b"not a png")
    text = _error(lambda: train.load_batch([3], torch.Generator().manual_seed(0)), DataError)
    assert str(coco / "train2017" / "d.png") in text and "image 6" in text and "not a readable image" in text
    # no root; bad options refused at load, before any file is read
    assert "data.root" in _error(lambda: load_dataset("coco", None, "train"), DataNotFoundError)
    base_cfg = ["data.name=coco", "data.root=/nowhere", "student=centernet_resnet8", "runtime.runtime=inprocess"]
    for option, key in [("{input_size: [0, 8]}", "input_size"), ("{max_objects: 0}", "max_objects"),
                        ("{scale: [1.2, 0.8]}", "scale"), ("{read_threads: 0}", "read_threads"),
                        ("{difficult: maybe}", "the 'coco' loader does not take")]:
        assert key in _error(lambda: load_config(ExperimentConfig, None, [*base_cfg, f"data.options={option}"]),
                             ConfigError)
    assert "data.options.difficult" in _error(lambda: load_config(ExperimentConfig, None, [
        *base_cfg, "data.name=pascal_voc_det", "data.options={difficult: maybe}"]), ConfigError)


# ------------------------------------------------------------------------------ a run
def test_one_epoch_in_process_run_on_coco_files_reaches_map(tmp_path):
    """`mtkd distill` (in process) on the written COCO files with an untrained teacher saved to tmp:
    a run folder with mAP, the exported student scored the same by `mtkd eval`'s function."""
    from mtkd.models import create_model
    from mtkd.runner import run_inprocess
    from mtkd.teacher_training import evaluate_checkpoint
    from mtkd.teachers import save_teacher

    root = tmp_path / "coco"
    smoke_coco(root)
    torch.manual_seed(0)
    model = create_model("centernet_resnet8", num_classes=3, in_channels=3)
    save_teacher(tmp_path / "teacher", model, {
        "model": "centernet_resnet8", "num_classes": 3, "in_channels": 3, "input_shape": [3, SIZE, SIZE],
        "task": "detection", "dataset": {"name": "coco", "mean": list(IMAGENET_STATS[0]),
                                         "std": list(IMAGENET_STATS[1])}})
    config = load_config(ExperimentConfig, None, [
        f"output_dir={tmp_path / 'run'}", "student=centernet_resnet8", "data.name=coco", f"data.root={root}",
        "data.batch_size=2", "data.eval_batch_size=2", f"data.options={json.dumps(OPTIONS)}", "optim.epochs=1",
        "distill.strategy=mtkd_rl", "distill.units=object", "distill.warmup_epochs=0", "distill.beta=0.5",
        "agent.agent_step=1", "runtime.runtime=inprocess", "runtime.device=cpu", "runtime.threads=1",
        "runtime.teacher_precision=fp32"])
    config.teachers = [TeacherSpec(checkpoint=str(tmp_path / "teacher"))]
    summary = run_inprocess(config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) and s["kd"] > 0 for s in steps)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= metrics["test/map"] <= 1.0 and metrics["test/map"] == summary["test_map"]
    scores = evaluate_checkpoint(summary["student"], root=str(root), device="cpu")
    assert scores["samples"] == len(VAL) and scores["test_map"] == pytest.approx(summary["test_map"])
