"""Explicit interfaces: the local and the Ray teacher pools both are a
:class:`mtkd.teachers.TeacherPool` (no Ray started), and the errors of registry, devices and
services are :class:`mtkd.errors.UserError` while still their old builtin."""
from __future__ import annotations

import argparse
import importlib

import pytest

from mtkd import errors
from mtkd.cli import run
from mtkd.teachers import LocalTeacherPool, TeacherPool

MEMBERS = ("describe", "submit", "collect", "take_stats", "close", "accepts_device_batches")


def test_members_are_the_documented_ones():
    assert all(callable(getattr(TeacherPool, name)) for name in MEMBERS[:-1])
    assert TeacherPool.__annotations__ == {"accepts_device_batches": "bool"}  # an attribute, no default


def test_local_pool_is_a_teacher_pool():
    pool = LocalTeacherPool([])
    assert isinstance(pool, TeacherPool)
    assert pool.accepts_device_batches is True
    assert pool.describe() == [] and pool.take_stats() == {}
    pool.close()


def test_ray_pool_is_a_teacher_pool_without_starting_ray():
    ray = pytest.importorskip("ray")
    from services.teacher_server.pool import RayTeacherPool

    assert all(hasattr(RayTeacherPool, name) for name in MEMBERS)
    assert RayTeacherPool.accepts_device_batches is False
    pool = RayTeacherPool([])  # no handles: nothing is asked of Ray
    assert isinstance(pool, TeacherPool)
    assert pool.take_stats() == {}
    pool.close()
    assert not ray.is_initialized()


def test_a_pool_missing_a_member_is_not_a_teacher_pool():
    class NoStats:
        accepts_device_batches = False

        def describe(self):
            return []

        def submit(self, batch):
            return batch

        def collect(self, ticket):
            return []

        def close(self):
            pass

    assert not isinstance(NoStats(), TeacherPool)


@pytest.mark.parametrize("where, name, builtin", [
    ("mtkd.registry", "UnknownNameError", KeyError),
    ("mtkd.registry", "UnknownNameError", ValueError),
    ("mtkd.devices", "DeviceError", ValueError),
    ("services.cache", "RedisServerError", ValueError),
    ("services.convert", "HalfPrecisionOverflow", ValueError),
    ("services.grpc_common", "RpcFailure", Exception),
])
def test_user_errors_keep_their_builtin_and_exit_2(where, name, builtin, capsys):
    if where.startswith("services."):
        pytest.importorskip("grpc")
        pytest.importorskip("redis")
    cls = getattr(importlib.import_module(where), name)
    error = cls(*((0, "refused\nsecond line") if name == "RpcFailure" else ("refused\nsecond line",)))
    assert isinstance(error, errors.UserError) and isinstance(error, builtin)
    assert errors.exit_code(error) == errors.USER_EXIT and errors.error_class(name) is cls

    def fail(_args):
        raise error

    parser = argparse.ArgumentParser(prog="mtkd")
    parser.set_defaults(func=fail)
    assert run(parser, []) == 2
    assert capsys.readouterr().err == "mtkd: error: refused; second line\n"


def test_an_unknown_precision_is_a_device_error():
    import torch

    from mtkd.devices import DeviceError, resolve_precision

    with pytest.raises(DeviceError, match=r"unknown precision 'fp8' \(valid: auto, fp32, bf16, fp16\)"):
        resolve_precision("fp8", torch.device("cpu"))


def test_teacher_spec_and_cache_url_mistakes_are_config_errors(tmp_path):
    pytest.importorskip("ray")
    from mtkd.config import ConfigError, TeacherSpec
    from services.cache import open_store
    from services.teacher_server.pool import teacher_source

    with pytest.raises(ConfigError, match="give exactly one of checkpoint and address"):
        teacher_source(TeacherSpec(name="t"))
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        teacher_source(TeacherSpec(address="127.0.0.1:1", token_file=str(tmp_path / "token")))
    with pytest.raises(ConfigError, match="cache.url: 'http://h:1'"):
        with open_store("http://h:1", 64):
            pass
