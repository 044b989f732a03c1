"""The teacher-output cache over a real ``redis-server`` (started here on free ports): hits, the
memory bound, a server killed mid-use, reconnection, ``redis://`` URLs and ``cache.url: local``."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch

from mtkd.cache import OutputLayout, TeacherOutputCache, sample_keys
from mtkd.data import BatchLoader, ImageDataset
from mtkd.engine import seeded
from mtkd.models import Outputs, create_model
from services.cache import LocalRedisServer, RedisServerError, RedisStore, free_port, open_store

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server; make test does)")

REPO = Path(__file__).resolve().parents[2]
KiB, MiB = 1024, 1024 * 1024


# ------------------------------------------------------------------------------- a real teacher
class RealTeacher:
    """A resnet8 (seeded) over a tiny 1x16x16 dataset; counts the batches it computes."""

    def __init__(self):
        self.model = seeded(0, lambda: create_model("resnet8", num_classes=4, in_channels=1)).eval()
        with torch.no_grad():
            self._layout = OutputLayout.of(Outputs(*self.model(torch.zeros(1, 1, 16, 16))))
        self.calls = 0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Outputs:
        self.calls += 1
        return Outputs(*self.model(images))

    def layout(self) -> OutputLayout:
        return self._layout


def dataset(n: int = 32) -> ImageDataset:
    g = torch.Generator().manual_seed(2)
    return ImageDataset(torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8),
                        torch.randint(0, 4, (n,), generator=g), 4, "tiny", "train", (0.5,), (0.25,))


def run_epochs(cache: TeacherOutputCache, teacher: RealTeacher, epochs=range(3), value_dtype="float32") -> list:
    """The teacher outputs of some epochs of an augment-bank loader, through ``cache``."""
    loader = BatchLoader(dataset(), 8, augment=True, crop_padding=2, seed=5, augment_bank=2)
    results = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for batch in loader:
            keys = sample_keys("resnet8-digest", loader.dataset.digest, "cpu-fp32", value_dtype, batch.sample_index,
                               batch.augment, loader.crop_padding)
            results.append(cache.outputs(keys, lambda: teacher(batch.images)))
    return results


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert s.dtype == t.dtype == torch.float32 and torch.equal(s, t)


def reference(teacher: RealTeacher, epochs=range(3)) -> list:
    """The same outputs without any cache."""
    class Off:
        def outputs(self, keys, compute):
            return Outputs(*(t.float() for t in compute()))
    return run_epochs(Off(), teacher, epochs)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(autouse=True)
def one_thread():
    """The teacher is tiny: one torch thread (OpenMP threads crawl on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def server():
    with LocalRedisServer(64) as s:
        yield s


@pytest.fixture
def by_hand(tmp_path):
    """A redis-server started without LocalRedisServer: requires a password, no maxmemory."""
    port = free_port()
    process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no", "--requirepass", "s3cret", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="s3cret")
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.02)
    yield port, process, client
    process.kill()
    process.wait()


# ---------------------------------------------------------------------------------------- tests
def test_local_server_is_private_bounded_and_stopped(server):
    client = redis.Redis.from_url(server.url)
    assert server.url == f"redis://127.0.0.1:{server.port}/0" and server.port != 6379
    config = {k: client.config_get(k)[k] for k in ("bind", "save", "appendonly", "maxmemory", "maxmemory-policy")}
    assert config == {"bind": "127.0.0.1", "save": "", "appendonly": "no", "maxmemory": str(64 * MiB),
                      "maxmemory-policy": "allkeys-lru"}
    pid, port = server.pid, server.port
    server.stop()
    assert gone(pid) and refuses(port)
    server.stop()  # idempotent


def test_a_second_run_hits_for_every_teacher_output(server):
    teacher = RealTeacher()
    first_cache = TeacherOutputCache(RedisStore(server.url), teacher.layout(), "float32")
    first = run_epochs(first_cache, teacher)
    stats = first_cache.take_stats()
    # K = 2: epochs 0 and 1 compute (8 batches of 8), epoch 2 is served by the bank's repeats
    assert teacher.calls == 8 and stats["lookups"] == 3 * 32 and 32 <= stats["hits"] < 3 * 32
    computed = teacher.calls
    # a second run: new store and cache objects, the same data and seed
    second_cache = TeacherOutputCache(RedisStore(server.url), teacher.layout(), "float32")
    second = run_epochs(second_cache, teacher)
    assert teacher.calls == computed  # nothing computed
    value_bytes = teacher.layout().value_bytes("float32")
    assert second_cache.take_stats() == {"lookups": 3 * 32, "hits": 3 * 32, "bytes_read": 3 * 32 * value_bytes,
                                         "bytes_written": 0}
    assert_same(first, second)
    assert_same(second, reference(teacher))  # the same numbers as without a cache, in fp32
    assert RedisStore(server.url).used_bytes() > 2 * 32 * value_bytes  # K = 2 augmentations of 32 samples


def test_bf16_values_are_half_the_bytes_and_the_same_warm_or_cold(server):
    teacher = RealTeacher()
    cache = TeacherOutputCache(RedisStore(server.url), teacher.layout(), torch.bfloat16)
    cold = run_epochs(cache, teacher, value_dtype="bfloat16")
    warm = run_epochs(cache, teacher, value_dtype="bfloat16")
    assert_same(cold, warm)
    stats = cache.take_stats()
    assert stats["bytes_read"] == stats["hits"] * teacher.layout().value_bytes("bfloat16") == stats["hits"] * 2188
    assert stats["hits"] >= 4 * 32 and teacher.calls == 8
    rounded = [Outputs(*(t.to(torch.bfloat16).float() for t in o)) for o in reference(teacher)]
    assert_same(cold, rounded)


def test_get_many_is_chunked_and_keeps_order(server):
    store = RedisStore(server.url, chunk=7)
    items = {f"k{i}": bytes([i]) * (i + 1) for i in range(0, 50, 2)}
    store.put_many(items)
    assert store.get_many([f"k{i}" for i in range(50)]) == [items.get(f"k{i}") for i in range(50)]
    assert store.get_many([]) == [] and store.put_many({}) is None


def test_memory_stays_bounded_by_lru_eviction(caplog):
    with LocalRedisServer(2) as server, caplog.at_level(logging.WARNING):
        store = RedisStore(server.url)
        value = os.urandom(64 * KiB)
        batches = [[f"v{b}-{i}" for i in range(16)] for b in range(40)]  # 40 MiB into 2 MiB
        for keys in batches:
            store.put_many({k: value for k in keys})
            assert store.used_bytes() <= 2 * MiB + 2 * len(value)
        client = redis.Redis.from_url(server.url)
        assert int(client.info("stats")["evicted_keys"]) > 500
        assert client.dbsize() * len(value) <= 2 * MiB
        assert store.get_many(batches[0]) == [None] * 16  # the oldest are gone
        assert sum(v is not None for v in store.get_many(batches[-1])) >= 8  # the newest mostly kept
    assert not caplog.records  # no error, no warning


def test_a_killed_server_warns_once_then_computes_and_is_used_again_when_back(server, caplog):
    teacher = RealTeacher()
    store = RedisStore(server.url, retry_after_s=0.3)
    cache = TeacherOutputCache(store, teacher.layout(), "float32")
    expected = reference(teacher)
    run_epochs(cache, teacher)
    cache.take_stats()
    port, calls = server.port, teacher.calls
    os.kill(server.pid, signal.SIGKILL)  # mid-use
    server.process.wait()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert_same(run_epochs(cache, teacher), expected)
            time.sleep(0.35)  # past retry_after_s: the next pass tries Redis again (and finds it down)
    assert teacher.calls == calls + 2 * 12  # every batch computed
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "services.cache"
    assert f"redis at redis://127.0.0.1:{port}/0 is unreachable" in warnings[0].getMessage()
    assert "computing teacher outputs without the cache" in warnings[0].getMessage()
    assert cache.take_stats()["hits"] == 0 and store.used_bytes() is None and not store.available
    with LocalRedisServer(64, port=port):  # back on the same port (empty)
        time.sleep(0.35)
        calls = teacher.calls
        assert_same(run_epochs(cache, teacher), expected)  # refills
        assert_same(run_epochs(cache, teacher), expected)
        assert teacher.calls == calls + 8 and store.available  # epochs 0 and 1 again, then all hits
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_values_are_never_unpickled(server, tmp_path, monkeypatch):
    teacher = RealTeacher()
    layout = teacher.layout()
    cache = TeacherOutputCache(RedisStore(server.url), layout, "float32")
    keys = sample_keys("t", "d", "cpu-fp32", "float32", torch.arange(4), None, 0)
    images = torch.randn(4, 1, 16, 16)
    cache.outputs(keys, lambda: teacher(images))
    client = redis.Redis.from_url(server.url)
    raw = client.get(keys[1])
    assert raw[:4] == b"MK\x01\x01" and len(raw) == layout.value_bytes("float32")

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    client.set(keys[1], pickle.dumps(Exploit()))

    def refuse(*args, **kwargs):
        raise AssertionError("a cached value was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    out = cache.outputs(keys, lambda: teacher(images))  # a miss, recomputed
    assert torch.equal(out.logits, teacher(images).logits) and not (tmp_path / "pwned").exists()
    assert client.get(keys[1]) == raw


def test_a_redis_url_by_hand_with_a_password_and_a_db(by_hand, caplog):
    port, process, client = by_hand
    url = f"redis://:s3cret@127.0.0.1:{port}/3"
    with caplog.at_level(logging.WARNING), open_store(url, 16) as store:
        assert isinstance(store, RedisStore) and "s3cret" not in repr(store)
        store.put_many({"x": b"abc"})
        assert store.get_many(["x"]) == [b"abc"]
        assert redis.Redis(port=port, password="s3cret", db=3).get("x") == b"abc" and client.get("x") is None
        assert "has no maxmemory" in caplog.text
        process.kill()
        process.wait()
        assert store.get_many(["x"]) == [None]
    assert "is unreachable" in caplog.text and "s3cret" not in caplog.text
    assert pickle.loads(pickle.dumps(store)).url == url  # picklable for Ray actors


def test_open_store_variants(caplog):
    with open_store(None, 16) as store:
        assert store is None
    with open_store("local", 16) as store:
        port = int(store.url.rsplit(":", 1)[1].split("/")[0])
        store.put_many({"a": b"1"})
        assert store.get_many(["a", "b"]) == [b"1", None]
        assert redis.Redis(port=port).config_get("maxmemory")["maxmemory"] == str(16 * MiB)
    assert refuses(port)
    nobody = free_port()
    with caplog.at_level(logging.WARNING), open_store(f"redis://127.0.0.1:{nobody}/0", 16) as store:
        assert store.get_many(["a"]) == [None] and store.used_bytes() is None  # a warning, not an error
        store.put_many({"a": b"1"})
    assert len(caplog.records) == 1 and f"127.0.0.1:{nobody}/0 is unreachable" in caplog.text
    with pytest.raises(ValueError, match=r"cache.url: 'http://h:1'; expected local, redis://host:port\[/db\]"):
        with open_store("http://h:1", 16):
            pass


def test_local_server_errors_name_the_binary(tmp_path, server):
    with pytest.raises(RedisServerError, match="'redis-server-missing' was not found on PATH; install it "
                                               r"\(apt-get install redis-server\)"):
        LocalRedisServer(16, binary="redis-server-missing").start()
    failing = tmp_path / "fake-redis-server"
    failing.write_text("#!/bin/sh\necho 'bad config' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RedisServerError, match=f"{failing} exited with code 3 while starting"):
        LocalRedisServer(16, binary=str(failing)).start()
    with pytest.raises(RedisServerError, match=f"exited with code 1 while starting on 127.0.0.1:{server.port}"):
        LocalRedisServer(16, port=server.port).start()  # taken
    with pytest.raises(ValueError, match="max_memory_mb=0"):
        LocalRedisServer(0)


def test_a_forgotten_local_server_stops_at_interpreter_exit():
    code = ("from services.cache import LocalRedisServer\n"
            "s = LocalRedisServer(16).start()\n"
            "print(s.pid, s.port, flush=True)\n")  # never stopped by the caller
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pid, port = map(int, result.stdout.split())
    assert gone(pid) and refuses(port)


def test_the_password_comes_from_the_environment(by_hand, caplog, monkeypatch):
    """A URL without a password takes $MTKD_REDIS_PASSWORD (so no config or command line holds it);
    a password in the URL wins; the private ``local`` server, which has none, accepts any."""
    port, _, client = by_hand
    url = f"redis://127.0.0.1:{port}/0"
    monkeypatch.setenv("MTKD_REDIS_PASSWORD", "s3cret")
    teacher = RealTeacher()
    with caplog.at_level(logging.WARNING), open_store(url, 16) as store:
        first = run_epochs(TeacherOutputCache(store, teacher.layout(), "float32"), teacher)
        copy = pickle.loads(pickle.dumps(store))  # what a Ray actor gets: no password in it, read again there
        assert copy.url == url and "s3cret" not in repr(pickle.dumps(store))
        calls = teacher.calls
        assert_same(run_epochs(TeacherOutputCache(copy, teacher.layout(), "float32"), teacher), first)
        assert teacher.calls == calls and client.dbsize() > 0  # every output served by the protected Redis
    assert "authentication" not in caplog.text and "unreachable" not in caplog.text
    monkeypatch.setenv("MTKD_REDIS_PASSWORD", "wrong")
    assert RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0").get_many(["x"]) == [None]  # the URL's wins
    assert RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0").ping()
    with open_store("local", 16) as store:
        store.put_many({"a": b"1"})
        assert store.get_many(["a"]) == [b"1"] and store.available
    assert "authentication" not in caplog.text and "unreachable" not in caplog.text


@pytest.mark.parametrize("password", ["wrong", None])
def test_a_refused_password_warns_once_and_the_outputs_are_computed(by_hand, caplog, monkeypatch, password):
    """A wrong or missing password is an outage: one warning that says authentication failed, then
    every output computed, the same numbers as without a cache; the run does not stop."""
    port, _, client = by_hand
    if password is None:
        monkeypatch.delenv("MTKD_REDIS_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("MTKD_REDIS_PASSWORD", password)
    teacher = RealTeacher()
    expected = reference(teacher)
    calls = teacher.calls
    with caplog.at_level(logging.WARNING), open_store(f"redis://127.0.0.1:{port}/0", 16) as store:
        cache = TeacherOutputCache(store, teacher.layout(), "float32")
        assert_same(run_epochs(cache, teacher), expected)
        assert_same(run_epochs(cache, teacher), expected)
        assert cache.take_stats()["hits"] == 0 and not store.available and store.used_bytes() is None
    assert teacher.calls == calls + 2 * 12  # every batch computed, twice
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"redis at redis://127.0.0.1:{port}/0: authentication failed (AuthenticationError" in warnings[0]
    assert "set MTKD_REDIS_PASSWORD" in warnings[0] and "computing teacher outputs without the cache" in warnings[0]
    assert client.dbsize() == 0
