"""Samples/s of the teacher-serving layer with 1, 2 and 4 replicas of a latency-bound teacher.

The teacher is latency-bound by construction: :class:`LatencyBoundTeacher`, a Ray actor with the
verbs of ``services.teacher_server.actor.TeacherActor`` (``describe``, ``infer(images, fields,
half, keys=None)`` returning the same wire dict, through ``outputs_to_wire``), runs a small real
teacher (an untrained resnet8, fp32, 1 torch thread) and then sleeps, so that every batch takes a
fixed wall time (``--latency-ms``, default 200 ms). Each replica asks Ray for 0.01 CPU, so the
replicas do not queue for the 2 cores; what scales is the serving layer (``RayTeacherPool``:
round-robin over replicas, batches requested ahead), not the hardware.

The learner is ``mtkd.engine.Distiller`` in this process (``aver``, a resnet8 student, 1 torch
thread as a Ray learner worker, ``--threads``) with ``RayTeacherPool`` over the first R replicas and ``runtime.prefetch = R``, so
that every replica has a batch to work on. Batches: Fashion-MNIST, augmented, the same for every R.
Each R trains a warm-up epoch, then the R settings take turns for ``--repeats`` epochs each;
samples/s = samples / the engine's ``time/epoch_s`` (median over the repeats).

The ideal for R replicas is ``min(R * batch / latency, batch / learner step)``; the learner's own
step time is measured in the same rounds, on the same batches with the teacher outputs computed
beforehand (no waiting). Also measured in the same rounds: the serving layer alone (the engine's
request pipeline, ``batches_with_teachers``, over an epoch with no training step), whose ideal is
``R * batch / latency``. Each epoch starts with an empty pipeline (the first batch waits a whole
latency), and the replicas' real forward passes share the 2 cores with the learner (``late``:
calls whose forward pass alone took longer than the latency).
Prints one JSON object: samples/s per R, ratios to 1 replica, the ideal and measured/ideal.

    .venv/bin/python benchmarks/serving.py              # ~2 min
    .venv/bin/python benchmarks/serving.py --quick      # a few seconds plus Ray's start-up (CI)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from mtkd.config import ExperimentConfig, load_config
from mtkd.engine import Distiller, as_float_outputs, teacher_fields
from mtkd.experiment import load_data, train_loader
from mtkd.distill import STRATEGIES
from mtkd.models import Outputs
from mtkd.teachers import load_teacher
from services.teacher_server.actor import outputs_to_wire
from services.teacher_server.pool import RayTeacherPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import load_average, print_report, random_teachers  # noqa: E402  (a sibling script)

TIMEOUT_S = 300.0


@ray.remote(num_cpus=0.01)
class LatencyBoundTeacher:
    """A teacher replica whose every ``infer`` takes ``latency_s`` of wall time: the real forward
    pass of the checkpoint's model, then a sleep for the rest (a call whose forward pass alone is
    longer is counted as late)."""

    def __init__(self, checkpoint: str, latency_s: float):
        torch.set_num_threads(1)
        self.teacher = load_teacher(checkpoint, device="cpu", precision="fp32")
        self.latency_s = latency_s
        self.calls = self.late = 0
        self.compute_s = 0.0

    def describe(self) -> dict:
        return self.teacher.describe()

    def infer(self, images: np.ndarray, fields: tuple[str, ...] = Outputs._fields, half: bool = False,
              keys: list[str] | None = None) -> dict:
        began = time.perf_counter()
        wire = outputs_to_wire(self.teacher.infer_raw(torch.from_numpy(np.array(images, copy=True))), fields, half)
        spent = time.perf_counter() - began
        self.calls += 1
        self.compute_s += spent
        self.late += spent > self.latency_s
        time.sleep(max(0.0, self.latency_s - spent))
        return wire

    def stats(self) -> dict:
        return {"calls": self.calls, "late": self.late,
                "mean_compute_ms": round(1e3 * self.compute_s / max(self.calls, 1), 2)}


def serving_only(distiller: Distiller, loader, batch_size: int) -> float:
    """samples/s of the engine's request pipeline alone (``batches_with_teachers``: submit ahead,
    collect, outputs to float32) over an epoch's batches, with no training step."""
    loader.set_epoch(distiller.epoch)
    began = time.perf_counter()
    count = sum(1 for _ in distiller.batches_with_teachers(loader))
    return count * batch_size / (time.perf_counter() - began)


class LearnerAlone:
    """The learner without waiting: ``Distiller.step`` over an epoch's batches whose teacher outputs
    were computed beforehand (the same teacher, in this process)."""

    def __init__(self, config: ExperimentConfig, checkpoint: str, train_set):
        teacher = load_teacher(checkpoint, device="cpu", precision="fp32")
        torch.manual_seed(config.seed)
        self.distiller = Distiller(config, _Describe([teacher.describe()]), train_set.num_classes,
                                   train_set.image_shape)
        loader = train_loader(train_set, config.data, config.seed)
        loader.set_epoch(0)
        self.batches = [(b, [as_float_outputs(teacher.infer_raw(b.images), self.distiller.device)]) for b in loader]
        self.times: list[float] = []

    def epoch(self, record: bool = True) -> None:
        began = time.perf_counter()
        for batch, outputs in self.batches:
            self.distiller.step(batch.images, batch.labels, outputs)
        if record:
            self.times.append((time.perf_counter() - began) / len(self.batches))


class _Describe:
    """A pool that only describes (the learner-alone measurement hands outputs to ``step`` itself)."""

    def __init__(self, descriptions: list[dict]):
        self.descriptions = descriptions

    accepts_device_batches = False

    def describe(self) -> list[dict]:
        return self.descriptions

    def submit(self, batch):
        raise NotImplementedError("the learner-alone measurement hands the teachers' outputs to step() itself")

    collect = submit

    def take_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def learner_config(args, tmp: str, prefetch: int) -> ExperimentConfig:
    """The learner's experiment: resnet8 student, ``aver``, Fashion-MNIST batches, ``prefetch``."""
    return load_config(ExperimentConfig, None, [
        f"output_dir={tmp}/run", "student=resnet8", "distill.strategy=aver", f"data.batch_size={args.batch_size}",
        f"data.train_subset={args.batch_size * args.steps}", "data.crop_padding=2", "optim.milestones=[]",
        "runtime.device=cpu", "runtime.teacher_precision=fp32", f"runtime.prefetch={prefetch}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4], help="replica counts (default: 1 2 4)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="wall time of one teacher call (default: 200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=48, help="steps per epoch (default: 48)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per replica count (default: 5)")
    parser.add_argument("--model", default="resnet8", help="the teacher's zoo model (untrained; default: resnet8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the learner (default: 1, as a Ray learner worker)")
    parser.add_argument("--quick", action="store_true", help="latency 100 ms, batch 16, 8 steps, 1 repeat (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_ms, args.batch_size, args.steps, args.repeats = 100.0, 16, 8, 1
    latency_s = args.latency_ms / 1e3
    torch.set_num_threads(args.threads)
    load_before = load_average()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtkd-serving-") as tmp:
        checkpoint = random_teachers(Path(tmp) / "teachers", (args.model,))[0]
        config = learner_config(args, tmp, prefetch=0)
        train_set, _ = load_data(config.data, config.seed)
        learner = LearnerAlone(config, checkpoint, train_set)
        learner.epoch(record=False)  # warm-up
        fields = teacher_fields(STRATEGIES.get("aver")())
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="ERROR",
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
        actors: list = []
        try:
            actors += [LatencyBoundTeacher.remote(checkpoint, latency_s) for _ in range(max(args.replicas))]
            ray.get([a.describe.remote() for a in actors], timeout=TIMEOUT_S)
            engines = {}
            for r in args.replicas:
                cfg = learner_config(args, tmp, prefetch=r)
                pool = RayTeacherPool([actors[:r]], fields=fields, max_in_flight=r + 1, timeout_s=TIMEOUT_S)
                torch.manual_seed(cfg.seed)
                distiller = Distiller(cfg, pool, train_set.num_classes, train_set.image_shape)
                engines[r] = (distiller, train_loader(train_set, cfg.data, cfg.seed), [], [])
                distiller.train_epoch(engines[r][1])  # warm-up
            for repeat in range(args.repeats):
                learner.epoch()
                order = args.replicas if repeat % 2 == 0 else args.replicas[::-1]
                for r in order:
                    distiller, loader, rates, serving_rates = engines[r]
                    metrics = distiller.train_epoch(loader)
                    rates.append(len(loader) * args.batch_size / metrics["time/epoch_s"])
                    serving_rates.append(serving_only(distiller, loader, args.batch_size))
            actor_stats = ray.get([a.stats.remote() for a in actors], timeout=TIMEOUT_S)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            ray.shutdown()
    measured = {r: statistics.median(rates) for r, (_, _, rates, _) in engines.items()}
    serving = {r: statistics.median(rates) for r, (_, _, _, rates) in engines.items()}
    learner_s = statistics.median(learner.times)
    learner_cap = args.batch_size / learner_s
    base = measured[args.replicas[0]]
    per_r = {}
    for r in args.replicas:
        ideal = min(r * args.batch_size / latency_s, learner_cap)
        per_r[str(r)] = {
            "samples_per_s": round(measured[r], 2),
            "ratio_to_1_replica": round(measured[r] / base, 4),
            "ideal_samples_per_s": round(ideal, 2),
            "ideal_ratio_to_1_replica": round(ideal / min(args.replicas[0] * args.batch_size / latency_s, learner_cap), 4),
            "measured_over_ideal": round(measured[r] / ideal, 4),
            "timed_epochs_samples_per_s": [round(x, 2) for x in engines[r][2]],
            "serving_only_samples_per_s": round(serving[r], 2),
            "serving_only_ratio_to_1_replica": round(serving[r] / serving[args.replicas[0]], 4),
        }
    report = {
        "benchmark": "serving", "quick": args.quick, "cpu_cores": os.cpu_count(),
        "teacher": f"{args.model} (untrained), fp32, 1 torch thread, then a sleep up to {args.latency_ms:g} ms per batch",
        "replica_num_cpus": 0.01, "latency_ms": args.latency_ms, "batch_size": args.batch_size,
        "steps_per_epoch": args.steps, "repeats": args.repeats, "strategy": "aver", "student": "resnet8",
        "learner": f"Distiller in the benchmark process, {torch.get_num_threads()} torch threads, prefetch = replicas",
        "learner_seconds_per_step": round(learner_s, 5),
        "learner_timed_epochs_seconds_per_step": [round(x, 5) for x in learner.times],
        "learner_cap_samples_per_s": round(learner_cap, 2),
        "replicas": per_r,
        "replica_stats": actor_stats,
    }
    return print_report(report, began, load_before)


if __name__ == "__main__":
    sys.exit(main())
