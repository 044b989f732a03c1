"""Tests of mtkd.cache: content-addressed keys, the value codec, and TeacherOutputCache over an
in-memory store (the Redis store is tested in tests/services/test_redis_cache.py)."""
from __future__ import annotations

import logging
import pickle

import pytest
import torch

from mtkd.cache import (MemoryStore, OutputLayout, OutputStore, TeacherOutputCache, decode_samples,
                        encode_samples, resolve_value_dtype, sample_keys)
from mtkd.data import AugmentParams, BatchLoader, ImageDataset
from mtkd.models import Outputs

LAYOUT = OutputLayout(10, 16, (8, 3, 3))


def outputs(b: int = 6, layout: OutputLayout = LAYOUT, dtype=torch.float32, seed: int = 0) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=g) * 7).to(dtype)  # noqa: E731
    return Outputs(make(b, layout.num_classes), make(b, layout.embedding_dim), make(b, *layout.feature_shape))


def assert_same(a: Outputs, b: Outputs) -> None:
    for x, y in zip(a, b):
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)


# ----------------------------------------------------------------------------------------- keys
def keys(index=(3, 4, 5), dy=(2, 0, 4), dx=(2, 1, 3), flip=(False, True, True), padding=2, **context) -> list[str]:
    ctx = {"teacher_digest": "a" * 64, "dataset_digest": "0123abcd", "numerics": "cpu-fp32", "value_dtype": "float32"}
    ctx.update(context)
    params = None if dy is None else AugmentParams(torch.tensor(dy), torch.tensor(dx), torch.tensor(flip))
    return sample_keys(sample_index=torch.tensor(index), augment=params, crop_padding=padding, **ctx)


def test_keys_are_short_deterministic_and_one_per_sample():
    first = keys()
    assert first == keys() and len(first) == len(set(first)) == 3
    assert all(k.startswith("mtkd:t1:") and len(k) < 64 for k in first)
    assert keys(index=torch.tensor([3, 4, 5], dtype=torch.int32).tolist()) == first


@pytest.mark.parametrize("change", [
    {"teacher_digest": "b" * 64}, {"dataset_digest": "0123abce"}, {"numerics": "cpu-bf16"},
    {"value_dtype": "bfloat16"}, {"index": (3, 4, 6)}, {"dy": (2, 0, 3)}, {"dx": (2, 1, 4)},
    {"flip": (False, True, False)},
])
def test_every_part_of_the_content_changes_the_key(change):
    before, after = keys(), keys(**change)
    per_sample = next(iter(change)) in ("index", "dy", "dx", "flip")  # these change the third sample only
    assert [a == b for a, b in zip(before, after)] == ([True, True, False] if per_sample else [False] * 3)


def test_keys_name_the_image_not_the_padding():
    # dy = padding + shift: the same shifted crop under padding 2 and 4 is the same image, the same key
    assert keys(dy=(2, 0, 4), dx=(2, 1, 3), padding=2) == keys(dy=(4, 2, 6), dx=(4, 3, 5), padding=4)
    assert keys(dy=(2, 0, 4), padding=2) != keys(dy=(2, 0, 4), padding=3)
    # the identity augmentation is no augmentation
    assert keys(dy=(2, 2, 2), dx=(2, 2, 2), flip=(False,) * 3)[0] == keys(dy=None)[0]


def test_key_argument_errors():
    with pytest.raises(ValueError, match=r"augment tensors of shapes \[\[2\], \[3\], \[3\]\]; expected \[3\]"):
        keys(dy=(1, 2))
    with pytest.raises(ValueError, match=r"crop offsets outside \[0, 4\]"):
        keys(dy=(5, 0, 0))
    with pytest.raises(ValueError, match="value dtype 'float64'; expected one of float32, float16, bfloat16"):
        keys(value_dtype="float64")
    with pytest.raises(ValueError, match=r"sample_index is torch.float32 \[3\]; expected int64 \[B\]"):
        sample_keys("t", "d", "n", "float32", torch.tensor([1.0, 2.0, 3.0]), None, 0)


def _tiny(n=40) -> ImageDataset:
    g = torch.Generator().manual_seed(3)
    return ImageDataset(torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8),
                        torch.randint(0, 3, (n,), generator=g), 3, "tiny", "train", (0.5,), (0.25,))


def _epoch_keys(loader: BatchLoader, epoch: int) -> set[str]:
    loader.set_epoch(epoch)
    return {k for b in loader
            for k in sample_keys("t", loader.dataset.digest, "cpu-fp32", "float32", b.sample_index, b.augment,
                                 loader.crop_padding)}


def test_loader_batches_give_repeating_keys_with_an_augment_bank():
    ds = _tiny()
    bank = BatchLoader(ds, 8, augment=True, crop_padding=2, seed=1, augment_bank=3)
    seen = set().union(*(_epoch_keys(bank, e) for e in range(3)))
    assert len(seen) <= 3 * len(ds)
    assert all(_epoch_keys(bank, e) <= seen for e in range(3, 9))  # from epoch K on: all known
    fresh = BatchLoader(ds, 8, augment=True, crop_padding=2, seed=1)
    known = set().union(*(_epoch_keys(fresh, e) for e in range(3)))
    assert len(_epoch_keys(fresh, 3) - known) > len(ds) // 2  # without a bank, new augmentations
    plain = BatchLoader(ds, 8, augment=False, seed=1)
    assert _epoch_keys(plain, 0) == _epoch_keys(plain, 1) and len(_epoch_keys(plain, 0)) == len(ds)


# ---------------------------------------------------------------------------------------- codec
def test_values_are_header_plus_raw_bytes():
    out = outputs(2)
    values = encode_samples(out, torch.float32)
    assert [len(v) for v in values] == [LAYOUT.value_bytes("float32")] * 2 == [4 + 4 * (10 + 16 + 72)] * 2
    expected = b"MK\x01\x01" + out.logits[1].numpy().tobytes() + out.embedding[1].numpy().tobytes() + \
        out.feature[1].numpy().tobytes()
    assert values[1] == expected
    bf16 = encode_samples(out, torch.bfloat16)[0]
    assert bf16[:4] == b"MK\x01\x03" and len(bf16) == 4 + 2 * 98
    assert bf16[4:24] == out.logits[0].to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(values[0])  # raw bytes, not a pickle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_in_the_teachers_own_dtype(dtype):
    out = outputs(5, dtype=dtype)
    decoded = decode_samples(encode_samples(out, dtype), LAYOUT, dtype)
    assert_same(decoded, Outputs(*(t.float() for t in out)))
    assert all(t.is_contiguous() for t in decoded)


def test_float32_round_trip_keeps_every_bit():
    out = outputs(3)
    out.logits[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    out.feature[2, 0, 0, 0] = torch.finfo(torch.float32).tiny / 4  # subnormal
    decoded = decode_samples(encode_samples(out, "float32"), LAYOUT, "float32")
    for a, b in zip(decoded, out):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compact_dtypes_round_to_nearest(dtype):
    out = outputs(4)
    decoded = decode_samples(encode_samples(out, dtype), LAYOUT, dtype)
    assert_same(decoded, Outputs(*(t.to(dtype).float() for t in out)))
    assert not torch.equal(decoded.feature, out.feature)  # lossy for float32 outputs, as documented


def test_strided_inputs_encode_in_logical_order():
    out = outputs(3, dtype=torch.bfloat16)
    channels_last = Outputs(out.logits, out.embedding, out.feature.contiguous(memory_format=torch.channels_last))
    assert encode_samples(channels_last, torch.bfloat16) == encode_samples(out, torch.bfloat16)


def test_decode_refuses_corrupt_values():
    values = encode_samples(outputs(3), torch.float16)
    with pytest.raises(ValueError, match=r"value 1 is 5 bytes starting b'MK\\x01\\x02'; expected 200 bytes"):
        decode_samples([values[0], values[1][:5], values[2]], LAYOUT, torch.float16)
    with pytest.raises(ValueError, match=r"value 0 is 200 bytes starting b'MK\\x01\\x02'; expected 200 bytes "
                                         r"starting b'MK\\x01\\x03' \(bfloat16"):
        decode_samples(values, LAYOUT, torch.bfloat16)  # same length, other dtype
    with pytest.raises(ValueError, match="value 2 is None"):
        decode_samples([values[0], values[1], None], LAYOUT, torch.float16)
    empty = decode_samples([], LAYOUT, torch.float16)
    assert empty.feature.shape == (0, 8, 3, 3)


def test_dense_logit_maps_round_trip():
    """A segmentation teacher's logit map ``[C, h, w]`` at its own stride is stored whole, bit for bit."""
    dense = Outputs(torch.randn(3, 11, 6, 5), torch.randn(3, 16), torch.randn(3, 8, 3, 3))
    layout = OutputLayout.of(dense)
    assert layout.logit_size == (6, 5) and layout.values_per_sample == 11 * 30 + 16 + 72
    assert layout == OutputLayout.from_description({"num_classes": 11, "embedding_dim": 16, "feature_shape": [8, 3, 3],
                                                    "logit_size": [6, 5]})
    back = decode_samples(encode_samples(dense, torch.float32), layout, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(dense, back))
    half = decode_samples(encode_samples(dense, torch.bfloat16), layout, torch.bfloat16)
    assert torch.equal(half.logits, dense.logits.to(torch.bfloat16))


def test_layouts_and_dtypes():
    assert OutputLayout.of(outputs(2)) == LAYOUT
    assert OutputLayout.from_description({"num_classes": 10, "embedding_dim": 16, "feature_shape": [8, 3, 3]}) == LAYOUT
    with pytest.raises(ValueError, match=r"feature_shape=\(8, 3\)"):
        OutputLayout(10, 16, (8, 3))
    with pytest.raises(ValueError, match=r"expected \[B, C\] \(or \[B, C, h, w\]\), \[B, D\], \[B, K, H, W\] with one B"):
        encode_samples(Outputs(torch.zeros(2, 3), torch.zeros(3, 4), torch.zeros(2, 1, 1, 1)), torch.float32)
    with pytest.raises(ValueError, match=r"logit_size=\(5,\)"):
        OutputLayout(10, 16, (8, 3, 3), (5,))
    with pytest.raises(ValueError, match="without feature"):
        encode_samples(Outputs(torch.zeros(2, 3), torch.zeros(2, 4), None), torch.float32)
    assert resolve_value_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_value_dtype("auto", torch.float32) == torch.float32
    assert resolve_value_dtype("float16", torch.bfloat16) == torch.float16
    with pytest.raises(ValueError, match="value dtype torch.float64"):
        resolve_value_dtype("auto", torch.float64)
    assert isinstance(MemoryStore(), OutputStore)


# ------------------------------------------------------------------------------ the cache
class RecordingStore(MemoryStore):
    """A MemoryStore that records the keys written and can be made to fail."""

    def __init__(self):
        super().__init__()
        self.written: list[list[str]] = []
        self.fail = False

    def get_many(self, keys):
        if self.fail:
            raise ConnectionError("store down")
        return super().get_many(keys)

    def put_many(self, items):
        if self.fail:
            raise ConnectionError("store down")
        self.written.append(list(items))
        super().put_many(items)


class Teacher:
    """Counts its calls; its outputs depend only on the samples' keys (like a real teacher)."""

    def __init__(self, dtype=torch.float32):
        self.calls, self.dtype = 0, dtype

    def __call__(self, batch_keys: list[str]) -> Outputs:
        self.calls += 1
        parts = [outputs(1, dtype=self.dtype, seed=int(k.rsplit(":", 4)[1])) for k in batch_keys]
        return Outputs(*(torch.cat(p) for p in zip(*parts)))


def batch_keys(indices) -> list[str]:
    return sample_keys("t", "d", "cpu-fp32", "float32", torch.tensor(indices), None, 0)


def test_second_pass_hits_for_every_sample():
    store, teacher = RecordingStore(), Teacher()
    cache = TeacherOutputCache(store, LAYOUT, torch.float32, name="t0")
    k = batch_keys(range(8))
    first = cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 1 and cache.take_stats() == {"lookups": 8, "hits": 0, "bytes_read": 0,
                                                         "bytes_written": 8 * LAYOUT.value_bytes("float32")}
    second = cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 1  # served from the store
    assert_same(first, second)
    assert_same(second, teacher(k))
    assert cache.take_stats() == {"lookups": 8, "hits": 8, "bytes_read": 8 * LAYOUT.value_bytes("float32"),
                                  "bytes_written": 0}
    assert cache.take_stats() == dict.fromkeys(("lookups", "hits", "bytes_read", "bytes_written"), 0)


def test_a_partial_hit_computes_the_batch_and_stores_only_the_missing():
    store, teacher = RecordingStore(), Teacher()
    cache = TeacherOutputCache(store, LAYOUT, torch.float32)
    cache.outputs(batch_keys([0, 1, 2]), lambda: teacher(batch_keys([0, 1, 2])))
    k = batch_keys([2, 3, 0, 4])
    mixed = cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 2 and store.written[-1] == [k[1], k[3]]
    assert_same(mixed, teacher(k))
    cache.take_stats()
    cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 3 and cache.take_stats()["hits"] == 4  # (the 3rd call was the check above)


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
def test_numbers_do_not_depend_on_the_cache_state(value_dtype):
    """Lossy storage of float32 outputs: a miss returns what a hit will return."""
    teacher, k = Teacher(), batch_keys(range(6))
    cold = TeacherOutputCache(MemoryStore(), LAYOUT, value_dtype)
    miss = cold.outputs(k, lambda: teacher(k))
    hit = cold.outputs(k, lambda: teacher(k))
    failing = RecordingStore()
    failing.fail = True
    down = TeacherOutputCache(failing, LAYOUT, value_dtype).outputs(k, lambda: teacher(k))
    assert teacher.calls == 2
    assert_same(miss, hit)
    assert_same(miss, down)
    assert_same(miss, Outputs(*(t.to(value_dtype).float() for t in teacher(k))))


def test_own_16_bit_outputs_come_back_exactly():
    teacher, k = Teacher(torch.bfloat16), batch_keys(range(5))
    cache = TeacherOutputCache(MemoryStore(), LAYOUT, resolve_value_dtype("auto", torch.bfloat16))
    miss, hit = cache.outputs(k, lambda: teacher(k)), cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 1
    assert_same(miss, hit)
    assert_same(hit, Outputs(*(t.float() for t in teacher(k))))


def test_a_failing_store_warns_once_and_computes(caplog):
    store, teacher, k = RecordingStore(), Teacher(), batch_keys(range(4))
    cache = TeacherOutputCache(store, LAYOUT, torch.float32, name="vgg8")
    store.fail = True
    with caplog.at_level(logging.WARNING, logger="mtkd.cache"):
        for _ in range(3):
            assert_same(cache.outputs(k, lambda: teacher(k)), teacher(k))
    assert teacher.calls == 6
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "teacher vgg8: the output cache failed to read (ConnectionError: store down)" in \
        warnings[0]
    store.fail = False  # back: used again, and a later outage warns again
    cache.outputs(k, lambda: teacher(k))
    assert cache.outputs(k, lambda: teacher(k)) is not None and teacher.calls == 7
    store.fail = True
    with caplog.at_level(logging.WARNING, logger="mtkd.cache"):
        cache.outputs(k, lambda: teacher(k))
    assert len(caplog.records) == 2


def test_a_store_answering_the_wrong_count_is_a_failure(caplog):
    class Short(MemoryStore):
        def get_many(self, keys):
            return [None]

    teacher, k = Teacher(), batch_keys(range(3))
    with caplog.at_level(logging.WARNING, logger="mtkd.cache"):
        assert_same(TeacherOutputCache(Short(), LAYOUT, "float32").outputs(k, lambda: teacher(k)), teacher(k))
    assert "get_many returned 1 values for 3 keys" in caplog.text


@pytest.mark.parametrize("spoil", ["truncated", "foreign", "other_dtype", "pickle"])
def test_corrupt_values_are_misses_and_are_replaced(spoil, caplog):
    store, teacher, k = MemoryStore(), Teacher(), batch_keys(range(4))
    cache = TeacherOutputCache(store, LAYOUT, torch.bfloat16)
    good = cache.outputs(k, lambda: teacher(k))
    original = store.values[k[2]]
    store.values[k[2]] = {
        "truncated": original[:-2],
        "foreign": b"\x00" * len(original),  # right length, not ours
        "other_dtype": encode_samples(Teacher()([k[2]]), torch.float16)[0],  # right length, float16
        "pickle": pickle.dumps(torch.zeros(3)),
    }[spoil]
    with caplog.at_level(logging.WARNING, logger="mtkd.cache"):
        again = cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 2 and "not bfloat16 outputs" in caplog.text
    assert_same(again, good)
    assert store.values[k[2]] == original  # overwritten with the right value
    cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 2


def test_computed_outputs_of_another_layout_are_an_error():
    cache = TeacherOutputCache(MemoryStore(), LAYOUT, torch.float32, name="wrn")
    k = batch_keys(range(2))
    with pytest.raises(ValueError, match=r"teacher wrn: computed outputs of OutputLayout\(num_classes=10, "
                                         r"embedding_dim=16, feature_shape=\(4, 3, 3\), logit_size=\(\)\)"):
        cache.outputs(k, lambda: outputs(2, OutputLayout(10, 16, (4, 3, 3))))


def test_outputs_in_the_stored_dtype_for_shipping():
    teacher, k = Teacher(torch.bfloat16), batch_keys(range(4))
    cache = TeacherOutputCache(MemoryStore(), LAYOUT, torch.bfloat16, output_dtype=torch.bfloat16)
    miss, hit = cache.outputs(k, lambda: teacher(k)), cache.outputs(k, lambda: teacher(k))
    assert teacher.calls == 1
    for a, b, own in zip(miss, hit, teacher(k)):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, own) and torch.equal(b, own)
    with pytest.raises(ValueError, match="output_dtype=torch.float16; expected torch.float32 or the value dtype "
                                         "torch.bfloat16"):
        TeacherOutputCache(MemoryStore(), LAYOUT, torch.bfloat16, output_dtype=torch.float16)
    empty = cache.outputs([], lambda: outputs(0))
    assert empty.feature.shape == (0, 8, 3, 3)


def test_the_library_cache_imports_without_redis_ray_and_grpc():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "for name in ('redis', 'ray', 'grpc', 'google.protobuf'):\n"
            "    sys.modules[name] = None\n"
            "import mtkd.cache\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
