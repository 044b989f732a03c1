"""Tests of mtkd.data: loaders on small files written here, augmentation, BatchLoader, real Fashion-MNIST."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd.data import (
    DATASETS,
    AugmentParams,
    Batch,
    BatchLoader,
    ImageDataset,
    UnsafePickleError,
    apply_augment,
    augment_bank_table,
    augment_batch,
    augment_generator,
    augment_params,
    bank_slots,
    derive_seed,
    epoch_order,
    load_dataset,
    normalize,
    subset,
    train_test,
)
from mtkd.data.idx import FASHION_MNIST_ROOT, IMAGES_MAGIC, LABELS_MAGIC
from mtkd.registry import UnknownNameError

from test_seg_data import write_layout  # noqa: E402  (files in the standard segmentation layouts)
from test_det_files import smoke_coco, smoke_voc  # noqa: E402  (COCO and VOC detection files)

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- file builders
def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> Path:
    header = magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_root(root: Path, gz: bool, sizes=(("train", 12), ("t10k", 5)), hw=(6, 7)) -> dict:
    """IDX files for both splits in root; returns {split_prefix: (images [N,H,W], labels [N])}."""
    root.mkdir(parents=True, exist_ok=True)
    content = {}
    for prefix, n in sizes:
        images = RNG.integers(0, 256, (n, *hw), dtype=np.uint8)
        labels = RNG.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, IMAGES_MAGIC, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, LABELS_MAGIC, gz)
        content[prefix] = (images, labels)
    return content


class Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 did for the real CIFAR files: bytes and str as STRING opcodes,
    numpy's ``_reconstruct`` under its old module ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def make_cifar_root(root: Path, hundred: bool, per_file: int = 4) -> dict:
    """A cifar-10-batches-py or cifar-100-python folder under root; returns {file: (data, labels)}."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = b"fine_labels" if hundred else b"labels"
    content = {}
    for name in files:
        data = RNG.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 100 if hundred else 10, per_file).tolist()
        dump_py2({b"batch_label": b"x", b"data": data, key: labels}, folder / name)
        content[name] = (data, labels)
    if hundred:
        dump_py2({b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)]}, folder / "meta")
    return content


def make_image_folder(root: Path, sizes=None) -> dict:
    """PNGs under root/{train,test}/{cat,dog}; returns {(split, cls): [arrays HxWx3]}."""
    from PIL import Image

    content = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("dog", "cat"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            arrays = []
            for i in range(n):
                h, w = (sizes or {}).get((split, cls, i), (5, 4))
                array = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(array, "RGB").save(folder / f"{i}.png")
                arrays.append(array)
            content[(split, cls)] = arrays
    return content


def tiny_dataset(n=50, c=3, h=8, w=8, num_classes=5) -> ImageDataset:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageDataset(images, labels, num_classes, "tiny", "train", (0.5,) * c, (0.25,) * c)


# Every registered dataset gets a smoke test: a builder of small files and the loader kwargs.
SMOKE_BUILDERS = {
    "fashion_mnist": lambda root: make_idx_root(root, gz=True) and {},
    "mnist": lambda root: make_idx_root(root, gz=False) and {},
    "cifar10": lambda root: make_cifar_root(root, hundred=False) and {},
    "cifar100": lambda root: make_cifar_root(root, hundred=True) and {},
    "image_folder": lambda root: make_image_folder(root) and {"channels": 3},
    "canvases": lambda root: make_idx_root(root, gz=True, hw=(28, 28)) and {"num_canvases": 6, "size": 16},
    "canvases_det": lambda root: make_idx_root(root, gz=True, hw=(28, 28)) and {"num_canvases": 6, "size": 16},
    # read from files batch by batch (their own tests: tests/test_seg_data.py)
    **{kind: (lambda kind: lambda root: write_layout(kind, root) and {"crop_size": [32, 64]})(kind)
       for kind in ("cityscapes", "ade20k", "pascal_voc")},
    "coco": smoke_coco,  # detection files read batch by batch (their own tests: tests/test_det_files.py)
    "pascal_voc_det": smoke_voc,
}


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_loads(name, tmp_path):
    assert name in SMOKE_BUILDERS, f"dataset {name!r} has no smoke builder in tests/test_data.py"
    kwargs = SMOKE_BUILDERS[name](tmp_path)
    train, test = train_test(name, str(tmp_path), **kwargs)
    if not isinstance(train, ImageDataset):  # a file-backed or detection split: no in-memory tensors
        assert len(train) > 0 and len(test) > 0 and train.name == name and train.task == test.task
        assert test.mean == train.mean and len(train.mean) == train.image_shape[0] and test.digest != train.digest
        batch = next(iter(BatchLoader(train, 2, augment=True)))
        assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == train.image_shape
        label_shape = (train.max_objects, 5) if train.task == "detection" else train.image_shape[1:]
        assert batch.labels.shape == (2, *label_shape)
        return
    for ds, split in ((train, "train"), (test, "test")):
        assert (ds.name, ds.split) == (name, split)
        assert ds.images.dtype == torch.uint8 and ds.images.dim() == 4
        assert len(ds) == ds.labels.shape[0] > 0
        assert len(ds.mean) == len(ds.std) == ds.images.shape[1]
        image, label = ds[0]
        assert image.shape == ds.images.shape[1:]
        if ds.task == "segmentation":  # a mask per image: its classes, or 255 (ignored)
            assert ds.labels.dtype == torch.uint8 and label.shape == image.shape[1:]
            assert bool(((label < ds.num_classes) | (label == 255)).all())
        else:
            assert ds.labels.dtype == torch.int64 and 0 <= int(label) < ds.num_classes
    assert test.mean == train.mean and test.std == train.std
    assert len(test.digest) == 16 and test.digest != train.digest
    batch = next(iter(BatchLoader(train, 4, augment=True, crop_padding=2)))
    assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == train.images.shape[1:]
    assert batch.labels.dtype == torch.int64 and batch.labels.shape[1:] == train.labels.shape[1:]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError, match="did you mean 'cifar10'"):
        load_dataset("cifar1O")


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_loads_gzip_and_raw(tmp_path, gz):
    content = make_idx_root(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("fashion_mnist", tmp_path, split)
        images, labels = content[prefix]
        assert ds.images.shape == (len(images), 1, 6, 7)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist()
        assert ds.mean == (0.2860,) and ds.num_classes == 10 and ds.class_names[9] == "Ankle boot"


def test_mnist_root_from_env(tmp_path, monkeypatch):
    make_idx_root(tmp_path, gz=False)
    monkeypatch.setenv("MTKD_MNIST_ROOT", str(tmp_path))
    assert len(load_dataset("mnist")) == 12
    monkeypatch.delenv("MTKD_MNIST_ROOT")
    with pytest.raises(FileNotFoundError, match="MTKD_MNIST_ROOT"):
        load_dataset("mnist")


def _corrupt(kind: str, root: Path) -> tuple[Path, str]:
    """Spoil one file of an IDX root; returns (file, expected message pattern)."""
    images_path = root / "train-images-idx3-ubyte"
    labels_path = root / "train-labels-idx1-ubyte"
    if kind == "magic":
        data = bytearray(images_path.read_bytes())
        data[3] = 0x01
        images_path.write_bytes(bytes(data))
        return images_path, r"magic 0x00000801; expected IDX3 uint8 images \(magic 0x00000803\)"
    if kind == "truncated":
        images_path.write_bytes(images_path.read_bytes()[:-10])
        return images_path, "truncated"
    if kind == "header":
        labels_path.write_bytes(b"\x00\x00")
        return labels_path, r"too short.*magic 0x00000801"
    if kind == "count":
        write_idx(labels_path, np.zeros(11, np.uint8), LABELS_MAGIC, gz=False)
        return labels_path, "12 images .* 11 labels"
    if kind == "label_range":
        write_idx(labels_path, np.full(12, 10, np.uint8), LABELS_MAGIC, gz=False)
        return labels_path, r"max label 10; expected \[0, 9\]"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["magic", "truncated", "header", "count", "label_range"])
def test_idx_corrupt_files_name_the_file(tmp_path, kind):
    make_idx_root(tmp_path, gz=False)
    path, pattern = _corrupt(kind, tmp_path)
    with pytest.raises(ValueError, match=pattern) as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_idx_corrupt_gzip(tmp_path):
    make_idx_root(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt gzip") as info:
        load_dataset("fashion_mnist", tmp_path)
    assert str(path) in str(info.value)


def test_idx_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion_mnist", tmp_path, "test")
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(info.value)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("fashion_mnist", tmp_path, "val")


# ----------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_loads_from_parent_or_folder(tmp_path, hundred):
    content = make_cifar_root(tmp_path, hundred)
    folder = tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    name = "cifar100" if hundred else "cifar10"
    for root in (tmp_path, folder):
        train = load_dataset(name, root, "train")
        test = load_dataset(name, root, "test")
        assert train.num_classes == (100 if hundred else 10)
        assert len(train) == (4 if hundred else 20) and train.images.shape[1:] == (3, 32, 32)
        data, labels = content["test" if hundred else "test_batch"]
        assert torch.equal(test.images, torch.from_numpy(data).view(-1, 3, 32, 32))
        assert test.labels.tolist() == labels
    if hundred:
        assert train.class_names[7] == "c07"
    else:
        first = content["data_batch_1"][0]
        assert torch.equal(train.images[:4], torch.from_numpy(first).view(-1, 3, 32, 32))
        assert train.class_names[0] == "airplane"


def test_cifar_missing_and_corrupt_files(tmp_path):
    make_cifar_root(tmp_path, hundred=False)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable pickle.*expected a CIFAR python batch") as info:
        load_dataset("cifar10", tmp_path, "test")
    assert str(folder / "test_batch") in str(info.value)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"b'data' is uint8 \[2, 100\]"):
        load_dataset("cifar10", tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="root= is required"):
        load_dataset("cifar10")


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_python3_pickle_loads(tmp_path):
    make_cifar_root(tmp_path, hundred=False)
    data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": np.array([1, 2, 3])}, f, protocol=4)  # str keys, ndarray labels
    test = load_dataset("cifar10", tmp_path, "test")
    assert torch.equal(test.images.flatten(1), torch.from_numpy(data)) and test.labels.tolist() == [1, 2, 3]


@pytest.mark.parametrize("dump", ["py2", "protocol4"])
def test_cifar_pickle_with_forbidden_global_is_refused(tmp_path, dump):
    make_cifar_root(tmp_path, hundred=True)
    marker, path = tmp_path / "pwned", tmp_path / "cifar-100-python" / "test"
    exploit = {b"data": _Exploit(marker), b"fine_labels": [0]}
    if dump == "py2":
        dump_py2(exploit, path)
    else:
        path.write_bytes(pickle.dumps(exploit, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"refusing global (posix|nt|os)\.system") as info:
        load_dataset("cifar100", tmp_path, "test")
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol, needs", [(2, "_codecs.encode"), (5, "_frombuffer")])
def test_other_protocols_are_refused_with_advice(tmp_path, protocol, needs):
    make_cifar_root(tmp_path, hundred=False)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, f, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=f"refusing global .*{needs}.*protocol 3 or 4"):
        load_dataset("cifar10", tmp_path, "test")


# ----------------------------------------------------------------------------- image folder
def test_image_folder_classes_pixels_and_stats(tmp_path):
    content = make_image_folder(tmp_path)
    train, test = train_test("image_folder", tmp_path)
    assert train.class_names == ["cat", "dog"] and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 1, 1]
    assert train.images.shape == (6, 3, 5, 4)
    assert torch.equal(train.images[3], torch.from_numpy(content[("train", "dog")][0]).permute(2, 0, 1))
    pixels = np.stack(content[("train", "cat")] + content[("train", "dog")]) / 255.0
    assert np.allclose(train.mean, pixels.mean(axis=(0, 1, 2)))
    assert np.allclose(train.std, pixels.std(axis=(0, 1, 2)))
    assert load_dataset("image_folder", tmp_path, "test").mean == train.mean == test.mean
    grey = load_dataset("image_folder", tmp_path, channels=1)
    assert grey.images.shape == (6, 1, 5, 4) and len(grey.mean) == 1


def test_image_folder_size_mismatch_and_resize(tmp_path):
    make_image_folder(tmp_path, sizes={("train", "dog", 1): (9, 4)})
    with pytest.raises(ValueError, match=r"dog/1\.png is 4x9 \(WxH\).* 4x5.*image_size") as info:
        load_dataset("image_folder", tmp_path)
    assert str(tmp_path / "train" / "dog" / "1.png") in str(info.value)
    resized = load_dataset("image_folder", tmp_path, image_size=(6, 3))
    assert resized.images.shape == (6, 3, 6, 3)


def test_image_folder_test_class_unknown_to_train(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"classes \['zebra'\] absent from the train split"):
        load_dataset("image_folder", tmp_path, "test")


# ----------------------------------------------------------------------------- augmentation
def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` [C, H, W] moved by (dy, dx) with zero fill: out[y, x] = image[y + dy, x + dx]."""
    _, h, w = image.shape
    out = torch.zeros_like(image)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    yd, xd = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    out[:, ys, xs] = image[:, yd, xd]
    return out


def test_augment_is_seeded_and_differs_across_batches():
    images = tiny_dataset(32).images
    a = augment_batch(images, augment_generator(0, 3, 7), 4, True)
    b = augment_batch(images, augment_generator(0, 3, 7), 4, True)
    c = augment_batch(images, augment_generator(0, 3, 8), 4, True)
    assert a.dtype == torch.float32 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert derive_seed("augment", 0, 3, 7) != derive_seed("augment", 0, 3, 8)
    assert derive_seed("order", 0, 1) == derive_seed("order", np.int64(0), 1) == 2069645012966396817  # pinned


def test_crop_is_a_zero_filled_shift():
    images = tiny_dataset(64).images
    out = augment_batch(images, torch.Generator().manual_seed(5), crop_padding=2, hflip=False)
    shifts = set()
    for image, cropped in zip(images, out):
        matches = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
            if torch.equal(_shift(image, dy, dx).float() / 255, cropped)
        ]  # fmt: skip
        assert matches, "a cropped sample is not a shift of its input"
        shifts.add(matches[0])
    assert len(shifts) > 5  # per-sample offsets


def test_flip_is_per_sample_with_half_probability():
    images = tiny_dataset(256).images.float() / 255
    out = augment_batch(images, torch.Generator().manual_seed(0), crop_padding=0, hflip=True)
    same = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 90 < int(flipped.sum()) < 166
    no_flip = augment_batch(images, torch.Generator().manual_seed(0), crop_padding=0, hflip=False)
    assert torch.equal(no_flip, images)


def test_normalize_uint8_and_float_agree():
    images = tiny_dataset(4).images
    expected = (images.float() / 255 - 0.5) / 0.25
    # normalize fuses to x * scale + shift: float32 rounding of the terms (~2), hence atol
    assert torch.allclose(normalize(images, (0.5,) * 3, (0.25,) * 3), expected, atol=1e-6)
    assert torch.allclose(normalize(images.float() / 255, (0.5,) * 3, (0.25,) * 3), expected, atol=1e-6)
    with pytest.raises(ValueError, match="1 means"):
        normalize(images, (0.5,), (0.25,))


# ----------------------------------------------------------------------------- BatchLoader
def _epoch(loader: BatchLoader, epoch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return {b.index: (b.images, b.labels) for b in loader}


def test_loader_is_deterministic_and_epochs_differ():
    ds = tiny_dataset(50)
    make = lambda: BatchLoader(ds, 8, augment=True, seed=3)  # noqa: E731
    first, again = _epoch(make(), 1), _epoch(make(), 1)
    assert first.keys() == again.keys() == set(range(7))
    assert all(torch.equal(first[k][0], again[k][0]) for k in first)
    other = _epoch(make(), 2)
    assert not torch.equal(first[0][1], other[0][1])
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))


def test_loader_without_shuffle_or_augment_is_the_normalised_dataset():
    ds = tiny_dataset(20)
    batches = list(BatchLoader(ds, 8, shuffle=False))
    assert [b.index for b in batches] == [0, 1, 2] and [len(b.labels) for b in batches] == [8, 8, 4]
    images = torch.cat([b.images for b in batches])
    assert torch.allclose(images, (ds.images.float() / 255 - 0.5) / 0.25, atol=1e-6)
    assert torch.equal(torch.cat([b.labels for b in batches]), ds.labels)
    assert len(BatchLoader(ds, 8, drop_last=True)) == 2


def test_loader_follows_the_documented_reproducibility_rule():
    ds = tiny_dataset(50)
    loader = BatchLoader(ds, 8, augment=True, crop_padding=3, seed=11)
    loader.set_epoch(5)
    for batch in loader:
        index = epoch_order(50, 11, 5)[batch.index * 8 : (batch.index + 1) * 8]
        assert torch.equal(index, loader.sample_indices(batch.index))
        augmented = augment_batch(ds.images[index], augment_generator(11, 5, batch.index), 3, True)
        assert torch.allclose(batch.images, normalize(augmented, ds.mean, ds.std), atol=1e-6)
        assert torch.equal(batch.labels, ds.labels[index])


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_is_round_robin_and_matches_single_worker(world_size):
    ds = tiny_dataset(50)  # 7 global batches of 8
    single = _epoch(BatchLoader(ds, 8, augment=True, seed=9), 4)
    union = {}
    for rank in range(world_size):
        loader = BatchLoader(ds, 8, augment=True, seed=9, rank=rank, world_size=world_size)
        batches = _epoch(loader, 4)
        assert len(batches) == len(loader) == 7 // world_size
        assert all(k % world_size == rank for k in batches)
        union.update(batches)
    assert sorted(union) == list(range(7 - 7 % world_size))  # truncated to a multiple of world_size
    for k, (images, labels) in union.items():
        assert torch.equal(images, single[k][0]) and torch.equal(labels, single[k][1])


def test_loader_argument_errors():
    ds = tiny_dataset(10)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        BatchLoader(ds, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer global batches than world_size=4"):
        BatchLoader(ds, 4, world_size=4)
    with pytest.raises(ValueError, match="batch_size=0"):
        BatchLoader(ds, 0)


# ----------------------------------------------------------------------------- what a cache key needs
def _pixels(batch: Batch) -> torch.Tensor:
    """The uint8 pixels behind a tiny_dataset batch (mean 0.5, std 0.25), exact."""
    return torch.round((batch.images * 0.25 + 0.5) * 255).to(torch.uint8)


def test_loader_without_a_bank_is_unchanged():
    """Numbers of the fresh-draw path (augment_bank=0), pinned from the code before the bank existed:
    exact resume and the Ray/in-process equivalence rely on them."""
    import hashlib

    loader = BatchLoader(tiny_dataset(50), 8, augment=True, crop_padding=2, seed=7, drop_last=True)
    pinned = {0: ("5ba2d58005806ea6f887b49eb988417bfacebb62618a20c0b6d69837c4e57209", [1, 3, 1, 1, 4, 2, 2, 2]),
              3: ("79704840622f753785d44fbd6e2e3753f79e506774b3568d3c24be2b8f313537", [3, 1, 0, 4, 1, 1, 0, 4])}
    for epoch, (digest, first_labels) in pinned.items():
        loader.set_epoch(epoch)
        batches = list(loader)
        h = hashlib.sha256()
        for batch in batches:
            h.update(_pixels(batch).numpy().tobytes())
        assert h.hexdigest() == digest and batches[0].labels.tolist() == first_labels
    first = batches[0]  # epoch 3, batch 0
    assert first.sample_index.tolist() == [30, 18, 2, 10, 4, 46, 20, 43]
    assert first.augment.dy.tolist() == [0, 2, 1, 3, 0, 2, 0, 0]
    assert first.augment.dx.tolist() == [3, 1, 0, 4, 2, 1, 4, 0]
    assert first.augment.flip.tolist() == [True, True, True, False, True, True, True, True]


@pytest.mark.parametrize("augment, bank", [(False, 0), (True, 0), (True, 3), (False, 3)])
def test_batches_say_which_samples_and_augmentations_they_hold(augment, bank):
    ds = tiny_dataset(50)
    loader = BatchLoader(ds, 8, augment=augment, crop_padding=3, seed=5, augment_bank=bank)
    for epoch in (0, 4):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            index = batch.sample_index
            assert index.dtype == torch.int64 and index.shape == batch.labels.shape
            assert torch.equal(batch.labels, ds.labels[index])
            raw = ds.images[index]
            if augment:
                params = batch.augment
                assert isinstance(params, AugmentParams) and params.dy.dtype == params.dx.dtype == torch.int64
                assert params.flip.dtype == torch.bool and all(t.shape == index.shape for t in params)
                assert 0 <= int(params.dy.min()) and int(params.dx.max()) <= 6
                raw = apply_augment(raw, params, 3)
            else:
                assert batch.augment is None
            assert torch.equal(batch.images, normalize(raw, ds.mean, ds.std))  # rebuilt exactly
            seen.append(index)
        assert sorted(torch.cat(seen).tolist()) == list(range(50))  # each sample once per epoch
    assert loader.augment_bank == (bank if augment else 0)


def test_hand_built_batches_keep_working():
    batch = Batch(3, torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
    assert batch.sample_index is None and batch.augment is None
    k, images, labels, *_ = batch
    assert k == 3 and images.shape == (2, 1, 4, 4)


def _augmentations_by_sample(loader: BatchLoader, epoch: int) -> dict[int, tuple[int, int, bool]]:
    loader.set_epoch(epoch)
    found = {}
    for batch in loader:
        for i, dy, dx, flip in zip(batch.sample_index.tolist(), *(t.tolist() for t in batch.augment)):
            found[i] = (dy, dx, flip)
    return found


def test_augment_bank_reuses_exactly_k_augmentations_per_sample():
    ds, k = tiny_dataset(50), 3
    loader = BatchLoader(ds, 8, augment=True, crop_padding=4, seed=2, augment_bank=k)
    table = augment_bank_table(50, k, 2, 4, True)
    assert table.dy.shape == table.dx.shape == table.flip.shape == (k, 50)
    columns = {i: [(int(table.dy[j, i]), int(table.dx[j, i]), bool(table.flip[j, i])) for j in range(k)]
               for i in range(50)}
    assert sum(len(set(c)) == k for c in columns.values()) > 40  # the K slots of a sample differ
    epochs = [_augmentations_by_sample(loader, e) for e in range(4 * k)]
    for cycle in range(4):  # each cycle of K epochs uses each of a sample's K slots once
        for i in range(50):
            used = sorted(epochs[cycle * k + j][i] for j in range(k))
            assert used == sorted(columns[i]), (cycle, i)
    for i in range(50):  # over 4K epochs: only the bank's augmentations, and all of them
        assert {epochs[e][i] for e in range(4 * k)} == set(columns[i])
    assert any(epochs[e] != epochs[e + k] for e in range(k))  # the order within a cycle changes
    # from epoch K on, every (sample, augmentation) pair -- a teacher-output cache key -- was seen before
    keys = [{(i, aug) for i, aug in epoch.items()} for epoch in epochs]
    assert len(set().union(*keys[:k])) == sum(len(set(c)) for c in columns.values())
    assert all(keys[e] <= set().union(*keys[:k]) for e in range(k, 4 * k))


def test_augment_bank_images_repeat_and_ignore_batch_layout():
    ds = tiny_dataset(50)
    single = BatchLoader(ds, 8, augment=True, crop_padding=2, seed=4, augment_bank=2)

    def images_by_sample(loader, epoch):
        loader.set_epoch(epoch)
        return {i: image for batch in loader for i, image in zip(batch.sample_index.tolist(), batch.images)}

    epoch0, epoch1, epoch2, epoch3 = (images_by_sample(single, e) for e in range(4))
    for i in range(50):
        # K = 2: epochs 2 and 3 show each sample the two images of epochs 0 and 1, in some order
        assert any(torch.equal(epoch2[i], x) for x in (epoch0[i], epoch1[i]))
        assert any(torch.equal(epoch3[i], x) for x in (epoch0[i], epoch1[i]))
    # a sample's augmentation depends on (seed, epoch, sample), not on the batch size or the rank
    other = BatchLoader(ds, 16, augment=True, crop_padding=2, seed=4, augment_bank=2, rank=1, world_size=3)
    for i, image in images_by_sample(other, 2).items():
        assert torch.equal(image, epoch2[i])
    reseeded = images_by_sample(BatchLoader(ds, 8, augment=True, crop_padding=2, seed=5, augment_bank=2), 2)
    assert sum(torch.equal(reseeded[i], epoch2[i]) for i in range(50)) < 25


def test_augment_bank_is_the_documented_draw():
    gen = torch.Generator().manual_seed(derive_seed("augment-bank", 9))
    drawn = augment_params(4 * 30, gen, 2, True)
    table = augment_bank_table(30, 4, 9, 2, True)
    assert torch.equal(table.dy.long(), drawn.dy.view(4, 30)) and torch.equal(table.flip, drawn.flip.view(4, 30))
    for epoch in (0, 5, 11):
        gen = torch.Generator().manual_seed(derive_seed("augment-bank-slot", 9, epoch // 4))
        expected = torch.rand(30, 4, generator=gen).argsort(dim=1)[:, epoch % 4]
        assert torch.equal(bank_slots(30, 4, 9, epoch), expected)
    assert bank_slots(30, 1, 9, 7).tolist() == [0] * 30
    loader = BatchLoader(tiny_dataset(30), 10, augment=True, crop_padding=2, seed=9, augment_bank=4)
    loader.set_epoch(5)
    slots = bank_slots(30, 4, 9, 5)
    for batch in loader:
        slot = slots[batch.sample_index]
        assert torch.equal(batch.augment.dx, table.dx[slot, batch.sample_index].long())


def test_augment_bank_argument_errors():
    ds = tiny_dataset(10)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"augment_bank={bad!r}; expected an int >= 0"):
            BatchLoader(ds, 4, augment=True, augment_bank=bad)
    with pytest.raises(ValueError, match="size=0"):
        bank_slots(10, 0, 0, 0)


# ----------------------------------------------------------------------------- dataset helpers
def test_subset_is_seeded_and_has_its_own_digest():
    ds = tiny_dataset(50)
    a, b, c = subset(ds, 10, seed=1), subset(ds, 10, seed=1), subset(ds, 10, seed=2)
    assert len(a) == 10 and a.digest == b.digest != c.digest != ds.digest
    assert a.mean == ds.mean and a.name == ds.name
    with pytest.raises(ValueError, match="n=51"):
        subset(ds, 51)


def test_image_dataset_validates():
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageDataset(images, torch.zeros(2, dtype=torch.int64), 2, "x", "train", (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"labels span \[0, 5\]; expected \[0, 1\]"):
        ImageDataset(images, torch.tensor([0, 1, 5]), 2, "x", "train", (0.5,), (0.5,))
    with pytest.raises(ValueError, match="one per channel"):
        ImageDataset(images, torch.tensor([0, 1, 1]), 2, "x", "train", (0.5, 0.5), (0.5,))


# ----------------------------------------------------------------------------- real data
FMNIST_PRESENT = (Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not FMNIST_PRESENT, reason=f"Fashion-MNIST absent from {FASHION_MNIST_ROOT} "
                    "(apt-get install dataset-fashion-mnist)")  # fmt: skip
def test_real_fashion_mnist():
    train, test = train_test("fashion_mnist")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape[1:] == (1, 28, 28) and train.num_classes == 10
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert abs(train.images.float().mean().item() / 255 - train.mean[0]) < 1e-3
