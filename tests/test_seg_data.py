"""Tests of the segmentation data: garment canvases, the standard-format loaders, paired augmentation."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtkd.data.augment import AugmentParams, apply_augment
from mtkd.data.dataset import DataError, DataNotFoundError
from mtkd.data.seg_augment import (IGNORE_INDEX, SegAugmentConfig, SegAugmentParams, apply_seg_augment,
                                   seg_augment_batch, seg_augment_params, seg_augment_sample, seg_collate)
from mtkd.data.seg_formats import (ADE20K_CLASSES, CITYSCAPES_CLASSES, IMAGENET_STATS, VOC_CLASSES, ade20k,
                                   cityscapes, pascal_voc)
from mtkd.errors import UserError

from conftest import needs_fashion

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RNG = np.random.default_rng(0)


# ============================================================================ canvases
@pytest.fixture(scope="module")
def canvases():
    from mtkd.data import canvases as module

    return module


@pytest.fixture(scope="module")
def train_set(canvases):
    ds = canvases.CanvasDataset("train", num_canvases=160, seed=3)
    ds.materialize()
    return ds


def reference_layer(garment: np.ndarray, scale: float, top: float, left: float, size: int) -> np.ndarray:
    """An independent float64 rendering of one placed garment (the module docstring's formula)."""
    padded = np.zeros((30, 30))
    padded[1:29, 1:29] = garment.astype(np.float64) / 255.0

    def axis(offset: float):
        src = np.clip((np.arange(size) + 0.5 - offset) / scale + 0.5, 0, 29)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, 29), src - i0

    r0, r1, wr = axis(top)
    c0, c1, wc = axis(left)
    rows = padded[r0] * (1 - wr)[:, None] + padded[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc)[None] + rows[:, c1] * wc[None]


def reference_canvas(pool, layout, b: int, size: int, threshold: float):
    """Expected mask, the value of the top garment and an ambiguity map (a garment within 1e-4 of its threshold)."""
    mask = np.zeros((size, size), np.int64)
    value = np.zeros((size, size))
    ambiguous = np.zeros((size, size), bool)
    for slot in range(int(layout.count[b])):
        garment = pool.images[int(layout.source[b, slot]), 0].numpy()
        scale, top, left, gain = layout.place[b, slot].tolist()
        v = reference_layer(garment, scale, top, left, size)
        cut = threshold * garment.max() / 255.0
        on = v > cut
        ambiguous |= np.abs(v - cut) < 1e-4
        mask[on] = int(layout.label[b, slot]) + 1
        value[on] = gain * v[on]
    return mask, value, ambiguous


@needs_fashion
def test_canvases_deterministic_and_independent_of_order(canvases, train_set):
    pool = canvases.garment_pool("train")
    picks = [117, 4, 59, 4, 0]  # any order, a repeat, across the 128-canvas chunks
    images, masks, layout = canvases.render_canvases(pool.images, pool.labels, picks, seed=3, split="train")
    assert torch.equal(images, train_set.images[picks]) and torch.equal(masks, train_set.masks[picks])
    assert torch.equal(layout.place[:, :2].nan_to_num(), train_set.layout.place[picks, :2].nan_to_num())
    again = canvases.CanvasDataset("train", num_canvases=160, seed=3)
    assert torch.equal(again.images, train_set.images) and torch.equal(again.masks, train_set.masks)
    other = canvases.CanvasDataset("train", num_canvases=8, seed=4)
    assert not torch.equal(other.images, train_set.images[:8])
    # a canvas does not depend on how many canvases the split has, only on (seed, split, index, params)
    assert torch.equal(canvases.CanvasDataset("train", num_canvases=8, seed=3).masks, train_set.masks[:8])


@needs_fashion
def test_canvas_items_and_class_counts(train_set):
    image, mask = train_set[5]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (64, 64) and mask.dtype == torch.int64
    unit = image * train_set.std[0] + train_set.mean[0]
    assert torch.allclose(unit, train_set.images[5].float() / 255, atol=1e-5)
    count = train_set.layout.count
    assert int(count.min()) >= 2 and int(count.max()) <= 5 and set(count.tolist()) == {2, 3, 4, 5}
    masks = train_set.masks.long()
    assert int(masks.max()) <= 10 and not bool((masks == IGNORE_INDEX).any())
    per_canvas = [set(m.unique().tolist()) for m in masks]
    assert all(0 in s and len(s) >= 2 for s in per_canvas)  # background and at least one garment everywhere
    hist = torch.bincount(masks.flatten(), minlength=11).double() / masks.numel()
    assert bool((hist > 0.005).all()), hist  # every class, none vanishingly rare
    assert 0.4 < hist[0] < 0.9
    assert set(train_set.layout.label[train_set.layout.label >= 0].unique().tolist()) == set(range(10))


@needs_fashion
def test_canvas_masks_exact(canvases, train_set):
    pool = canvases.garment_pool("train")
    checked = 0
    for b in range(0, 160, 7):
        expected, _, ambiguous = reference_canvas(pool, train_set.layout, b, 64, train_set.params.threshold)
        got = train_set.masks[b].long().numpy()
        assert ambiguous.mean() < 0.01
        np.testing.assert_array_equal(got[~ambiguous], expected[~ambiguous])
        checked += (~ambiguous).sum()
    assert checked > 20 * 64 * 64 * 0.99


@needs_fashion
@pytest.mark.parametrize("split", ["train", "test"])
def test_canvas_pixels_come_from_their_split(canvases, split):
    params = canvases.CanvasParams(clutter=(0, 0), background=(0.0, 0.0), noise_std=0.0)
    ds = canvases.CanvasDataset(split, num_canvases=12, seed=1, params=params)
    pool = canvases.garment_pool(split)
    for b in range(12):
        expected, value, ambiguous = reference_canvas(pool, ds.layout, b, 64, params.threshold)
        got = ds.images[b, 0].numpy().astype(np.float64)
        keep = ~ambiguous
        assert np.abs(got - np.round(value * 255))[keep].max() <= 1.0
        assert (got[keep & (expected == 0)] == 0).all()


@needs_fashion
def test_train_and_test_garments_disjoint(canvases):
    def used(split: str) -> set[str]:
        ds = canvases.CanvasDataset(split, num_canvases=150, seed=0)
        pool = canvases.garment_pool(split)
        assert int(ds.layout.source.max()) < len(pool)
        sources = ds.layout.source[ds.layout.source >= 0].unique()
        return {hashlib.sha256(pool.images[i].numpy().tobytes()).hexdigest() for i in sources.tolist()}

    train, test = used("train"), used("test")
    assert len(train) > 300 and len(test) > 300
    assert not train & test


@needs_fashion
def test_canvas_cache_round_trip(canvases, tmp_path, monkeypatch):
    first = canvases.CanvasDataset("test", num_canvases=20, seed=2, cache_dir=tmp_path)
    data = first.materialize()
    assert first.cache_path.is_file() and first.cache_path.parent == tmp_path

    def no_render(*args, **kwargs):
        raise AssertionError("render_canvases called despite a cache file")

    monkeypatch.setattr(canvases, "render_canvases", no_render)
    second = canvases.CanvasDataset("test", num_canvases=20, seed=2, cache_dir=tmp_path)
    cached = second.materialize()
    for a, b in zip((data[0], data[1], *data[2]), (cached[0], cached[1], *cached[2])):
        assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a[a == a], b[b == b])
    monkeypatch.undo()
    bigger = canvases.CanvasDataset("test", num_canvases=20, seed=2, cache_dir=tmp_path,
                                    params=canvases.CanvasParams(size=48))
    assert bigger.cache_path != first.cache_path and bigger.images.shape == (20, 1, 48, 48)
    first.cache_path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="ignoring cache file"):
        again = canvases.CanvasDataset("test", num_canvases=20, seed=2, cache_dir=tmp_path).materialize()
    assert torch.equal(again[0], data[0])


def test_canvas_params_refused():
    from mtkd.data.canvases import CanvasDataset, CanvasParams

    for kwargs, word in [({"garments": (3, 2)}, "garments"), ({"garments": (0, 2)}, "garments"),
                         ({"size": 4}, "size"), ({"threshold": 1.5}, "threshold"), ({"scale": (1.0,)}, "scale"),
                         ({"gain": (0.5, 2.0)}, "gain")]:  # fmt: skip
        with pytest.raises(DataError, match=word):
            CanvasParams(**kwargs)
    with pytest.raises(DataError, match="split"):
        CanvasDataset("val")
    with pytest.raises(DataError, match="num_canvases"):
        CanvasDataset("train", num_canvases=0)


# ============================================================================ standard formats
def save_rgb(path: Path, h: int, w: int) -> np.ndarray:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


def save_mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = values.shape
    img = Image.frombytes("P" if palette else "L", (w, h), values.astype(np.uint8).tobytes())
    if palette:  # the stored values are indices into this (random) palette
        img.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tolist())
    img.save(path)


CITY_RAW = np.array([0, 7, 8, 9, 26, 33, 255, 11, 24, 1])
CITY_MAPPED = np.array([255, 0, 1, 255, 13, 18, 255, 2, 11, 255])


def make_cityscapes(root: Path, split: str = "train") -> list[tuple[Path, Path, np.ndarray]]:
    made = []
    for city, stem in [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")]:
        image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        save_rgb(image, 6, 10)
        picks = RNG.integers(0, len(CITY_RAW), (6, 10))
        mask = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        save_mask(mask, CITY_RAW[picks])
        made.append((image, mask, CITY_MAPPED[picks]))
    return made


def test_cityscapes_layout_and_train_ids(tmp_path):
    made = make_cityscapes(tmp_path)
    ds = cityscapes(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and len(CITYSCAPES_CLASSES) == 19
    for i, (image_path, _, expected) in enumerate(made):
        image, mask = ds[i]
        assert image.shape == (3, 6, 10) and image.dtype == torch.float32
        assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), expected)
        from PIL import Image

        raw = torch.from_numpy(np.array(Image.open(image_path))).permute(2, 0, 1).float() / 255
        mean, std = (torch.tensor(s).view(3, 1, 1) for s in IMAGENET_STATS)
        assert torch.allclose(image * std + mean, raw, atol=1e-5)


def make_ade(root: Path) -> list[np.ndarray]:
    values = []
    for folder, name in [("training", "ADE_train_00000001"), ("training", "ADE_train_00000002"),
                         ("validation", "ADE_val_00000001")]:
        save_rgb(root / "ADEChallengeData2016" / "images" / folder / f"{name}.jpg", 8, 5)
        v = RNG.integers(0, 151, (8, 5))
        v[0, :3] = [0, 1, 150]
        save_mask(root / "ADEChallengeData2016" / "annotations" / folder / f"{name}.png", v)
        values.append(v)
    return values


def test_ade20k_layout_and_ids(tmp_path):
    values = make_ade(tmp_path)
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    train = ade20k(tmp_path, "train")
    also = ade20k(tmp_path / "ADEChallengeData2016", "training")
    assert len(train) == 2 and train.pairs == also.pairs and train.num_classes == 150
    val = ade20k(tmp_path, "val")
    for ds, i, v in [(train, 0, values[0]), (train, 1, values[1]), (val, 0, values[2])]:
        image, mask = ds[i]
        assert image.shape == (3, 8, 5)
        np.testing.assert_array_equal(mask.numpy(), np.where(v == 0, 255, v - 1))
        assert mask[0, :3].tolist() == [255, 0, 149]


def make_voc(root: Path, names=("2007_000032", "2007_000039"), split: str = "train") -> list[np.ndarray]:
    voc = root / "VOCdevkit" / "VOC2012"
    values = []
    for name in names:
        save_rgb(voc / "JPEGImages" / f"{name}.jpg", 7, 9)
        v = RNG.choice(np.array([0, 1, 15, 20, 255]), (7, 9))
        save_mask(voc / "SegmentationClass" / f"{name}.png", v, palette=True)
        values.append(v)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return values


def test_pascal_voc_palette_indices(tmp_path):
    from PIL import Image

    values = make_voc(tmp_path)
    mask_file = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000032.png"
    assert Image.open(mask_file).mode == "P"
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        ds = pascal_voc(root, "train")
        assert len(ds) == 2 and ds.num_classes == 21 and len(VOC_CLASSES) == 21
        for i, v in enumerate(values):
            image, mask = ds[i]
            assert image.shape == (3, 7, 9)
            np.testing.assert_array_equal(mask.numpy(), v)


def _error(call, kind=UserError) -> str:
    with pytest.raises(kind) as info:
        call()
    return str(info.value)


def test_format_loaders_refuse_bad_input(tmp_path):
    # a mask of another size than its image
    made = make_cityscapes(tmp_path / "c1")
    save_mask(made[1][1], np.full((6, 8), 7))
    ds = cityscapes(tmp_path / "c1")
    assert str(made[1][1]) in _error(lambda: ds[1], DataError)
    # a value that maps to no class (Cityscapes labelId 40, ADE20K 151, VOC index 21)
    save_mask(made[0][1], np.full((6, 10), 40))
    assert str(made[0][1]) in _error(lambda: ds[0], DataError)
    make_ade(tmp_path / "a")
    ade_mask = tmp_path / "a" / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000002.png"
    save_mask(ade_mask, np.full((8, 5), 151))
    assert str(ade_mask) in _error(lambda: ade20k(tmp_path / "a")[1], DataError)
    make_voc(tmp_path / "v")
    voc = tmp_path / "v" / "VOCdevkit" / "VOC2012"
    save_mask(voc / "SegmentationClass" / "2007_000039.png", np.full((7, 9), 21), palette=True)
    bad = voc / "SegmentationClass" / "2007_000039.png"
    assert str(bad) in _error(lambda: pascal_voc(tmp_path / "v")[1], DataError)
    # a colour (RGB) mask instead of a palette PNG
    save_rgb(voc / "SegmentationClass" / "2007_000032.png", 7, 9)
    message = _error(lambda: pascal_voc(tmp_path / "v")[0], DataError)
    assert str(voc / "SegmentationClass" / "2007_000032.png") in message and "mode 'RGB'" in message
    # a missing mask file; a missing image file (Cityscapes: a mask without its image; VOC: a listed name)
    made = make_cityscapes(tmp_path / "c2")
    made[0][1].unlink()
    assert str(made[0][1]) in _error(lambda: cityscapes(tmp_path / "c2"), DataNotFoundError)
    made = make_cityscapes(tmp_path / "c3")
    made[1][0].unlink()
    assert str(made[1][0]) in _error(lambda: cityscapes(tmp_path / "c3"), DataNotFoundError)
    (voc / "JPEGImages" / "2007_000039.jpg").unlink()
    assert str(voc / "JPEGImages" / "2007_000039.jpg") in _error(lambda: pascal_voc(tmp_path / "v"), DataNotFoundError)
    (tmp_path / "a" / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    assert "ADE_train_00000001.png" in _error(lambda: ade20k(tmp_path / "a"), DataNotFoundError)
    # empty splits; a split that does not exist
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    empty = voc / "ImageSets" / "Segmentation" / "val.txt"
    assert str(empty) in _error(lambda: pascal_voc(tmp_path / "v", "val"), DataError)
    for sub in ("leftImg8bit", "gtFine"):
        (tmp_path / "c3" / sub / "val").mkdir(parents=True)
    assert "empty" in _error(lambda: cityscapes(tmp_path / "c3", "val"), DataError)
    assert str(tmp_path / "c3" / "leftImg8bit" / "test") in _error(lambda: cityscapes(tmp_path / "c3", "test"))
    assert "test.txt" in _error(lambda: pascal_voc(tmp_path / "v", "test"), DataNotFoundError)
    assert "split" in _error(lambda: ade20k(tmp_path / "a", "test"), DataError)


# ============================================================================ paired augmentation
def coded_pair(batch: int, h: int, w: int, classes: int = 6, block: int = 6):
    """Blocks of ``block`` pixels with random classes; every image channel holds ``(class + 1) * (channel + 1)``."""
    shape = (batch, -(-h // block), -(-w // block))
    coarse = torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(0))
    masks = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w].contiguous()
    images = (masks[:, None].double() + 1) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    return images, masks


def assert_aligned(images: torch.Tensor, masks: torch.Tensor) -> float:
    """Where a mask's 3x3 neighbourhood holds one value, the image holds exactly its code (padding: 0 and 255)."""
    padded = F.pad(masks[:, None].double(), (1, 1, 1, 1), value=-1.0)  # border pixels are never interior
    lo = -F.max_pool2d(-padded, 3, 1)[:, 0]
    hi = F.max_pool2d(padded, 3, 1)[:, 0]
    interior = lo == hi
    channels = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    code = torch.where(masks == IGNORE_INDEX, 0.0, masks.double() + 1)[:, None] * channels
    where = interior[:, None].expand_as(code)
    assert torch.equal(images[where], code[where])
    return interior.double().mean().item()


@pytest.mark.parametrize("config", [
    SegAugmentConfig(crop_size=(24, 20), padding=3, scale=(0.5, 2.0)),
    SegAugmentConfig(padding=4),
    SegAugmentConfig(crop_size=(40, 40), scale=(0.75, 1.25)),  # larger than the image: padded
])  # fmt: skip
def test_seg_augment_keeps_image_and_mask_aligned(config):
    images, masks = coded_pair(16, 32, 28)
    out, out_mask = seg_augment_batch(images, masks, torch.Generator().manual_seed(7), config)
    size = config.crop_size or (32, 28)
    assert out.shape == (16, 3, *size) and out_mask.shape == (16, *size) and out_mask.dtype == torch.int64
    assert assert_aligned(out, out_mask) > 0.3
    assert set(out_mask.unique().tolist()) <= set(range(6)) | {IGNORE_INDEX}
    if config.crop_size == (40, 40):
        assert bool((out_mask == IGNORE_INDEX).any())


def test_seg_augment_deterministic_per_generator():
    images, masks = coded_pair(8, 20, 20)
    config = SegAugmentConfig(crop_size=(16, 16), padding=2, scale=(0.5, 1.5))
    run = lambda seed: seg_augment_batch(images, masks, torch.Generator().manual_seed(seed), config)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    one = seg_augment_sample(images[0], masks[0], torch.Generator().manual_seed(1), config)
    first = seg_augment_batch(images[:1], masks[:1], torch.Generator().manual_seed(1), config)
    assert torch.equal(one[0], first[0][0]) and torch.equal(one[1], first[1][0])


def test_seg_crop_and_flip_match_classification_augment():
    images, masks = coded_pair(10, 12, 12)
    images = images.float()
    generator = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (10,), generator=generator), torch.randint(0, 9, (10,), generator=generator)
    flip = torch.rand(10, generator=generator) < 0.5
    expected = apply_augment(images, AugmentParams(dy, dx, flip), 4)
    config = SegAugmentConfig(padding=4)
    params = SegAugmentParams(torch.ones(10, dtype=torch.float64), torch.full((10,), 12), torch.full((10,), 12),
                              dy - 4, dx - 4, flip)  # fmt: skip
    out, out_mask = apply_seg_augment(images, masks, params, config)
    assert torch.equal(out, expected)
    padding = apply_augment(torch.ones(10, 1, 12, 12), AugmentParams(dy, dx, flip), 4)[:, 0] == 0
    assert torch.equal(out_mask == IGNORE_INDEX, padding)
    moved = apply_augment(masks[:, None], AugmentParams(dy, dx, flip), 4)[:, 0]
    assert torch.equal(out_mask[~padding], moved[~padding])


def test_seg_scale_matches_interpolate():
    images, masks = torch.rand(3, 2, 10, 14), torch.randint(0, 5, (3, 10, 14))
    for factor in (0.5, 1.3, 2.0):
        h, w = round(10 * factor), round(14 * factor)
        config = SegAugmentConfig(crop_size=(h, w), hflip=False, scale=(factor, factor))
        params = seg_augment_params(3, (10, 14), torch.Generator().manual_seed(0), config)
        assert params.top.eq(0).all() and params.height.eq(h).all()
        out, out_mask = apply_seg_augment(images, masks, params, config)
        ref = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        assert torch.allclose(out, ref, atol=1e-5)
        ref_mask = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest-exact")[:, 0].long()
        assert torch.equal(out_mask, ref_mask)
    identity = SegAugmentConfig(hflip=False)
    out, out_mask = seg_augment_batch(images, masks, torch.Generator(), identity)
    assert torch.equal(out, images) and torch.equal(out_mask, masks)


def test_seg_collate_and_bad_configs():
    samples = [(torch.rand(3, h, w), torch.randint(0, 4, (h, w), dtype=torch.uint8)) for h, w in [(9, 12), (15, 7)]]
    config = SegAugmentConfig(crop_size=(8, 8), scale=(0.5, 2))
    images, masks = seg_collate(samples, torch.Generator().manual_seed(0), config)
    assert images.shape == (2, 3, 8, 8) and masks.shape == (2, 8, 8) and masks.dtype == torch.uint8
    assert "crop_size" in _error(lambda: seg_collate(samples, torch.Generator(), SegAugmentConfig()), DataError)
    for kwargs in ({"crop_size": (0, 4)}, {"padding": -1}, {"scale": (2.0, 1.0)}, {"scale": (0.0, 1.0)}):
        with pytest.raises(DataError):
            SegAugmentConfig(**kwargs)
    with pytest.raises(DataError, match="do not match"):
        seg_augment_batch(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 9, dtype=torch.int64), torch.Generator(),
                          SegAugmentConfig())  # fmt: skip


# ============================================================================ file-backed sets in training
LAYOUTS = ("cityscapes", "ade20k", "pascal_voc")
TRAIN_SIZES = [(40, 80), (48, 72), (40, 80), (36, 90)]  # varied, as in ADE20K and VOC
VAL_SIZES = [(40, 80), (30, 60)]


def write_split(kind: str, root: Path, split: str, sizes) -> list[tuple[Path, Path, np.ndarray]]:
    """Image/mask pairs of the given ``(h, w)`` sizes in ``kind``'s layout under ``root``; returns
    ``(image, mask, raw mask values)`` per pair, in the reader's order."""
    made = []
    for j, (h, w) in enumerate(sizes):
        if kind == "cityscapes":
            stem = f"aachen_{j:06d}_000019"
            image = root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png"
            mask = root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png"
            raw = CITY_RAW[RNG.integers(0, len(CITY_RAW), (h, w))]
        elif kind == "ade20k":
            folder = {"train": "training", "val": "validation"}[split]
            image = root / "ADEChallengeData2016" / "images" / folder / f"ADE_{split}_{j:08d}.jpg"
            mask = root / "ADEChallengeData2016" / "annotations" / folder / f"ADE_{split}_{j:08d}.png"
            raw = RNG.integers(0, 151, (h, w))
        else:
            image = root / "VOC2012" / "JPEGImages" / f"{split}_{j:06d}.jpg"
            mask = root / "VOC2012" / "SegmentationClass" / f"{split}_{j:06d}.png"
            raw = RNG.choice(np.array([0, 1, 15, 20, 255]), (h, w))
        save_rgb(image, h, w)
        save_mask(mask, raw, palette=kind == "pascal_voc")
        made.append((image, mask, raw))
    if kind == "pascal_voc":
        lists = root / "VOC2012" / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"{m[0].stem}\n" for m in made))
    return made


def write_layout(kind: str, root: Path) -> tuple[list, list]:
    return write_split(kind, root, "train", TRAIN_SIZES), write_split(kind, root, "val", VAL_SIZES)


def file_data(kind: str, root: Path, *more: str) -> list[str]:
    """Overrides of a tiny run on ``root``: batches of 2 crops of 32x64 (2 steps an epoch)."""
    return [f"data.name={kind}", f"data.root={root}", "data.batch_size=2", "data.eval_batch_size=2",
            "data.options={crop_size: [32, 64], read_threads: 2}", "optim.epochs=1", *more]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_file_backed_sets_train_a_teacher_distil_and_evaluate(kind, tmp_path):
    """`mtkd train-teacher`, `mtkd distill` (in process) and `mtkd eval` on each layout's files."""
    from mtkd.config import ExperimentConfig, TeacherSpec, TeacherTrainConfig, load_config
    from mtkd.runner import run_inprocess
    from mtkd.teacher_training import evaluate_checkpoint, train_teacher

    root = tmp_path / "data"
    write_layout(kind, root)
    teacher = load_config(TeacherTrainConfig, None, ["model=fcn_resnet8", f"output_dir={tmp_path / 'teacher'}",
                                                     "device=cpu", *file_data(kind, root)])
    meta = train_teacher(teacher, progress=False)
    classes = {"cityscapes": 19, "ade20k": 150, "pascal_voc": 21}[kind]
    assert meta["task"] == "segmentation" and meta["input_shape"] == [3, 32, 64] and meta["num_classes"] == classes
    config = load_config(ExperimentConfig, None, [
        f"output_dir={tmp_path / 'run'}", "student=fcn_resnet8", "distill.strategy=mtkd_rl", "distill.warmup_epochs=0",
        "distill.beta=0.1", "agent.agent_step=1", "runtime.runtime=inprocess", "runtime.device=cpu",
        *file_data(kind, root)])
    config.teachers = [TeacherSpec(checkpoint=str(tmp_path / "teacher"))]
    summary = run_inprocess(config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) and s["kd"] > 0 for s in steps)
    assert 0.0 <= summary["test_miou"] <= 1.0
    scores = evaluate_checkpoint(summary["student"], root=str(root), device="cpu")
    assert scores["samples"] == len(VAL_SIZES) and scores["test_miou"] == pytest.approx(summary["test_miou"])


def test_file_batches_are_seeded_and_read_only_their_files(tmp_path):
    from mtkd.data import BatchLoader, train_test

    write_layout("ade20k", tmp_path)
    train, _ = train_test("ade20k", str(tmp_path), crop_size=(24, 32), read_threads=2)

    def batches(seed=5, epoch=0, **kw):
        loader = BatchLoader(train, 2, augment=True, seed=seed, **kw)
        loader.set_epoch(epoch)
        return list(loader)

    def same(a, b):
        return all(torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
                   and torch.equal(x.sample_index, y.sample_index) for x, y in zip(a, b))

    first = batches()
    assert len(first) == 2 and first[0].images.shape == (2, 3, 24, 32) and first[0].labels.shape == (2, 24, 32)
    assert same(first, batches()) and same(first[1:], batches(rank=1, world_size=2))
    assert not same(first, batches(epoch=1)) and not same(first, batches(seed=6))
    in_order = batches(shuffle=False)  # the same samples: only the augmentation differs
    assert same(in_order, batches(shuffle=False)) and not same(in_order, batches(epoch=1, shuffle=False))
    assert not same(in_order, batches(seed=6, shuffle=False))
    reads = []
    read_pair = train.files.read_pair
    train.files.read_pair = lambda i: (reads.append(i), read_pair(i))[1]
    batch = next(iter(BatchLoader(train, 2, augment=True, seed=5)))
    assert sorted(reads) == sorted(batch.sample_index.tolist())  # a batch decodes its own files, no others
    assert not hasattr(train, "images") and not hasattr(train, "labels")


def test_file_batches_hold_the_files_pixels(tmp_path):
    """Crops, flips, centre crops and padded whole images read back the files' exact pixels and classes."""
    from PIL import Image

    from mtkd.data import BatchLoader, train_test

    made, val_made = write_layout("cityscapes", tmp_path)
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in IMAGENET_STATS)
    train_ids = np.full(256, -1)
    train_ids[CITY_RAW] = CITY_MAPPED

    def expected(pair):
        image = torch.from_numpy(np.array(Image.open(pair[0]))).permute(2, 0, 1).float() / 255
        return (image - mean) / std, torch.from_numpy(train_ids[pair[2]])

    def centre(x, fill, h=40, w=80):  # the centre h x w window of x [..., H, W]; outside it: fill
        ys, xs = torch.arange(h) + (x.shape[-2] - h) // 2, torch.arange(w) + (x.shape[-1] - w) // 2
        inside = ((ys >= 0) & (ys < x.shape[-2]))[:, None] & ((xs >= 0) & (xs < x.shape[-1]))[None]
        window = x[..., ys.clamp(0, x.shape[-2] - 1), :][..., xs.clamp(0, x.shape[-1] - 1)]
        return torch.where(inside, window, torch.tensor(fill, dtype=x.dtype))

    # crop = the whole image at scale 1: each sample is its file, flipped or not
    train, test = train_test("cityscapes", str(tmp_path), crop_size=(40, 80), scale=(1.0, 1.0))
    flips = []
    for epoch in range(2):
        loader = BatchLoader(train, 4, augment=True, seed=1, shuffle=False)
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        for b in (0, 2):  # the two 40x80 images
            image, mask = expected(made[b])
            flips.append(not torch.equal(batch.labels[b], mask))
            image, mask = (image.flip(-1), mask.flip(-1)) if flips[-1] else (image, mask)
            assert torch.equal(batch.labels[b], mask) and torch.allclose(batch.images[b], image, atol=1e-5)
    assert set(flips) == {False, True}
    # no augmentation: the centre crop (a smaller image is padded: at the mean, mask 255)
    batch = next(iter(BatchLoader(train, 4, augment=False, shuffle=False)))
    for b in range(len(TRAIN_SIZES)):
        image, mask = expected(made[b])
        assert torch.equal(batch.labels[b], centre(mask, IGNORE_INDEX))
        assert torch.allclose(batch.images[b], centre(image, 0.0), atol=1e-5)
    # evaluation: whole images, a smaller one padded at the bottom and right
    whole = next(iter(BatchLoader(test, 2, shuffle=False)))
    assert whole.images.shape == (2, 3, 40, 80) and test.image_shape == (3, 40, 80)
    for b, (h, w) in enumerate(VAL_SIZES):
        image, mask = expected(val_made[b])
        assert torch.equal(whole.labels[b, :h, :w], mask)
        assert torch.allclose(whole.images[b, :, :h, :w], image, atol=1e-5)
        assert (whole.labels[b, h:] == IGNORE_INDEX).all() and (whole.labels[b, :, w:] == IGNORE_INDEX).all()
        assert (whole.images[b, :, h:] == 0).all() and (whole.images[b, :, :, w:] == 0).all()


def test_file_backed_sets_refuse_bad_input_in_training(tmp_path):
    from mtkd.config import ConfigError, ExperimentConfig, load_config
    from mtkd.session import Session
    from mtkd.teachers import LocalTeacherPool

    base = [f"output_dir={tmp_path / 'run'}", "student=fcn_resnet8", "distill.strategy=ce",
            "runtime.runtime=inprocess", "runtime.device=cpu"]

    def session(*overrides, root=tmp_path / "data"):
        config = load_config(ExperimentConfig, None, [*base, *file_data("cityscapes", root), "data.batch_size=4",
                                                      *overrides])
        return Session.build(config, LocalTeacherPool([]))

    made, _ = write_layout("cityscapes", tmp_path / "data")
    # config: no root, an augment bank, a cache with random crops; a bad crop size
    assert "data.root" in _error(lambda: load_config(ExperimentConfig, None, [*base, "data.name=cityscapes"]),
                                 ConfigError)
    assert "data.augment_bank" in _error(lambda: session("data.augment_bank=2"), ConfigError)
    assert "cache.url" in _error(lambda: session("cache.url=local"), ConfigError)
    assert not session("cache.url=local", "data.augment=false").train_loader.augment  # centre crops: keyed by index
    assert "data.options.crop_size" in _error(lambda: session("data.options={crop_size: [0, 8]}"), DataError)
    # a root without the layout: the path and the layout
    message = _error(lambda: session(root=tmp_path / "nowhere"), DataNotFoundError)
    assert str(tmp_path / "nowhere" / "leftImg8bit" / "train") in message and "gtFine" in message
    # a mask of another size, a class id out of range: the first training step names the file
    save_mask(made[2][1], np.full((40, 81), 7))
    assert str(made[2][1]) in _error(lambda: session().train_epoch(), DataError)
    save_mask(made[2][1], np.full(TRAIN_SIZES[2], 7))
    save_mask(made[1][1], np.full(TRAIN_SIZES[1], 40))
    assert str(made[1][1]) in _error(lambda: session().train_epoch(), DataError)
    # a missing image: refused before training
    made[3][0].unlink()
    assert str(made[3][0]) in _error(lambda: session(), DataNotFoundError)
