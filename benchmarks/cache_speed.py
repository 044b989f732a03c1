"""Step time with the Redis cache of teacher outputs: cold (first run) against warm (a second run
over the same data and seed, every teacher output read from the cache) and against no cache.

In process, three engines (``Distiller.train_epoch``, the engine ``run_inprocess`` drives; 1 torch
thread unless ``--threads`` says otherwise, as every Ray worker, and steadier on a shared machine) train
the same student from the same teachers on the same batches: ``cold`` and ``warm`` look their
teachers' outputs up in one private ``redis-server`` (``services.cache.LocalRedisServer``), ``none``
has no cache. They take turns epoch by epoch: ``cold`` trains epoch e first (misses, and stores the
outputs), then ``warm`` trains the same epoch e (the same crops and flips, so every batch is a hit:
a second run, interleaved with the first), and ``none``, before or after ``warm`` in turn. The
first epoch is a warm-up; the others are timed (s/step = the engine's ``time/epoch_s`` / steps,
median over the timed epochs).

On Ray (``--ray``; on by default in full mode), three ``run_ray`` runs on one private local Ray,
where the teacher actors do the lookups: ``none``, ``cold``, then ``warm`` (a run cannot be
interleaved with another), each a warm-up epoch plus the timed ones.

Reported: s/step of cold, warm and none, the ratios warm/cold and warm/none, and
``cache/hit_rate`` of every epoch of every run. Teachers: untrained (seeded random weights)
resnet20, vgg8 and wrn_16_2 written with ``mtkd.teachers.save_teacher`` (``--quick``: resnet8 and
vgg8), or ``--teachers DIR...``. ``--teacher-precision`` (default fp32: values stored as 4 bytes;
bf16 teachers store 2-byte values). Prints one JSON object.

    .venv/bin/python benchmarks/cache_speed.py            # ~5 min on 2 cores (in process and Ray)
    .venv/bin/python benchmarks/cache_speed.py --quick    # in process only, under a minute (CI)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtkd.cache import CacheContext, dataset_cache_id
from mtkd.engine import Distiller
from mtkd.experiment import load_data, train_loader
from mtkd.runner import load_local_pool
from mtkd.teachers import LocalTeacherPool
from services.cache import LocalRedisServer, RedisStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import (DEFAULT_TEACHERS, QUICK_TEACHERS, experiment, load_average, print_report,  # noqa: E402
                       random_teachers, teacher_models)

# set before Ray starts: Ray Train polls its workers every 2 s by default, and a short epoch would wait for it
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

RUNS = ("cold", "warm", "none")


def overrides(args, epochs: int) -> list[str]:
    return [f"student={args.student}", f"distill.strategy={args.strategy}", f"data.batch_size={args.batch_size}",
            f"data.train_subset={args.batch_size * args.steps}", f"data.test_subset={args.batch_size}",
            "data.crop_padding=2", f"optim.epochs={epochs}", "optim.milestones=[]", "agent.agent_step=1000",
            "runtime.device=cpu", f"runtime.teacher_precision={args.teacher_precision}", "runtime.address=local"]


def summarise(times: dict[str, list[float]], hit_rates: dict[str, list[float | None]]) -> dict:
    med = {name: statistics.median(values) for name, values in times.items()}
    return {
        "seconds_per_step": {name: round(value, 5) for name, value in med.items()},
        "ratios": {"warm/cold": round(med["warm"] / med["cold"], 4), "warm/none": round(med["warm"] / med["none"], 4),
                   "cold/none": round(med["cold"] / med["none"], 4)},
        "timed_epochs_seconds_per_step": {name: [round(v, 5) for v in values] for name, values in times.items()},
        "cache_hit_rate_per_epoch": hit_rates,
    }


def in_process(args, teacher_dirs: list[str], store: RedisStore, tmp: Path) -> dict:
    """The three engines, epoch by epoch; the first epoch of each is a warm-up."""
    config = experiment(tmp / "inprocess", teacher_dirs, [*overrides(args, 1 + args.timed_epochs),
                                                          "runtime.runtime=inprocess"])
    train_set, _ = load_data(config.data, config.seed)
    teachers = load_local_pool(config).teachers  # one set of teacher models, shared by the three pools
    context = CacheContext(dataset_cache_id(train_set), config.data.crop_padding, config.cache.value_dtype)
    engines = {}
    for name in RUNS:
        pool = LocalTeacherPool(teachers)
        if name != "none":
            pool.use_cache(store, context)
        torch.manual_seed(config.seed)
        engines[name] = (Distiller(config, pool, train_set.num_classes, train_set.image_shape),
                         train_loader(train_set, config.data, config.seed))
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    hit_rates: dict[str, list[float | None]] = {name: [] for name in RUNS}
    for epoch in range(1 + args.timed_epochs):
        order = ("cold", "warm", "none") if epoch % 2 == 0 else ("cold", "none", "warm")  # cold fills, warm reads
        for name in order:
            distiller, loader = engines[name]
            metrics = distiller.train_epoch(loader)
            hit_rates[name].append(metrics.get("cache/hit_rate"))
            if epoch:
                times[name].append(metrics["time/epoch_s"] / len(loader))
    return summarise(times, hit_rates) | {"torch_threads": torch.get_num_threads(),
                                          "redis_used_bytes": store.used_bytes()}


def on_ray(args, teacher_dirs: list[str], server: LocalRedisServer, tmp: Path) -> dict:
    """``run_ray`` without a cache, then cold, then warm, on one private local Ray."""
    import ray

    from services.learner.driver import ensure_ray, run_ray

    times: dict[str, list[float]] = {}
    hit_rates: dict[str, list[float | None]] = {}
    base = [*overrides(args, 1 + args.timed_epochs), "runtime.runtime=ray"]
    started = ensure_ray(experiment(tmp / "probe", teacher_dirs, base))
    try:
        for name in ("none", "cold", "warm"):
            cache = [] if name == "none" else [f"cache.url={server.url}"]
            history = run_ray(experiment(tmp / f"ray-{name}", teacher_dirs, [*base, *cache]), progress=False)["history"]
            steps = history[0]["step"]
            times[name] = [m["time/epoch_s"] / steps for m in history[1:]]
            hit_rates[name] = [m.get("cache/hit_rate") for m in history]
    finally:
        if started:
            ray.shutdown()
    return summarise({name: times[name] for name in RUNS}, {name: hit_rates[name] for name in RUNS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", dest="teacher_dirs",
                        help="teacher checkpoint folders (default: untrained resnet20, vgg8, wrn_16_2)")
    parser.add_argument("--teacher-precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                        help="runtime.teacher_precision (default: fp32)")
    parser.add_argument("--strategy", default="mtkd_rl")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process engines (default: 1, as every Ray worker)")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch (default: 20)")
    parser.add_argument("--timed-epochs", type=int, default=3, help="timed epochs after the warm-up (default: 3)")
    parser.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure on Ray (default: on, off with --quick)")
    parser.add_argument("--quick", action="store_true", help="resnet8 + vgg8, batch 16, 4 steps, 2 timed epochs (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.timed_epochs = 16, 4, 2
    use_ray = (not args.quick) if args.ray is None else args.ray
    torch.set_num_threads(args.threads)
    load_before = load_average()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtkd-cache-speed-") as tmp:
        tmp = Path(tmp)
        teacher_dirs = args.teacher_dirs or random_teachers(tmp / "teachers", QUICK_TEACHERS if args.quick
                                                            else DEFAULT_TEACHERS)
        report = {
            "benchmark": "cache_speed", "quick": args.quick, "cpu_cores": os.cpu_count(), "student": args.student,
            "strategy": args.strategy, "teachers": teacher_models(teacher_dirs),
            "teacher_weights": "given checkpoints" if args.teacher_dirs else "untrained (seeded random weights)",
            "teacher_precision": args.teacher_precision, "cache_value_dtype": "auto (the teacher's output dtype)",
            "batch_size": args.batch_size, "steps_per_epoch": args.steps, "timed_epochs": args.timed_epochs,
        }
        with LocalRedisServer(max_memory_mb=2048) as server:
            store = RedisStore(server.url)
            try:
                report["inprocess"] = in_process(args, teacher_dirs, store, tmp)
                if use_ray:
                    store.client.flushdb()  # Ray's cold run starts from an empty cache
                    report["ray"] = on_ray(args, teacher_dirs, server, tmp)
            finally:
                store.close()
    return print_report(report, began, load_before)


if __name__ == "__main__":
    sys.exit(main())
