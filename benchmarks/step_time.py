"""Step time of the Ray runtime against the in-process engine, same batches, same teacher pool.

Runs 2 epochs per setting and times the second (the first pays start-up and warm-up). Prints
one JSON object: seconds per step for each setting and the ratios to the in-process engine.

    .venv/bin/python benchmarks/step_time.py --teachers cache/teachers/resnet20-* cache/teachers/vgg8-* ...
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from mtkd.config import ExperimentConfig, TeacherSpec, load_config
from mtkd.runner import run_inprocess


def experiment(out: Path, teachers: list[str], overrides: list[str]) -> ExperimentConfig:
    config = load_config(ExperimentConfig, None, [f"output_dir={out}", *overrides])
    config.teachers = [TeacherSpec(checkpoint=t) for t in teachers]
    return config


def seconds_per_step(history: list[dict]) -> float:
    last = history[-1]
    steps = last["step"] - history[-2]["step"]
    return last["time/epoch_s"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", required=True, help="teacher checkpoint folders")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch")
    args = parser.parse_args()
    common = [f"student={args.student}", f"data.batch_size={args.batch_size}",
              f"data.train_subset={args.batch_size * args.steps}", "data.test_subset=500", "optim.epochs=2",
              "distill.strategy=mtkd_rl", "agent.agent_step=1000"]
    default_threads = torch.get_num_threads()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in (
            (f"inprocess_threads{default_threads}", ["runtime.runtime=inprocess"]),
            ("inprocess_threads1", ["runtime.runtime=inprocess", "runtime.threads=1"]),
        ):
            torch.set_num_threads(default_threads)
            summary = run_inprocess(experiment(Path(tmp) / label, args.teachers, [*common, *overrides]), progress=False)
            results[label] = seconds_per_step(summary["history"])
        torch.set_num_threads(default_threads)
        from services.learner.driver import run_ray

        for label, prefetch in (("ray_prefetch0", 0), ("ray_prefetch1", 1)):
            config = experiment(Path(tmp) / label, args.teachers,
                                [*common, "runtime.runtime=ray", f"runtime.prefetch={prefetch}"])
            results[label] = seconds_per_step(run_ray(config, progress=False)["history"])
    base = results[f"inprocess_threads{default_threads}"]
    report = {
        "torch_threads_inprocess": default_threads, "student": args.student, "teachers": [Path(t).name for t in args.teachers],
        "batch_size": args.batch_size, "steps_timed": args.steps,
        "seconds_per_step": {k: round(v, 4) for k, v in results.items()},
        "ratio_to_inprocess": {k: round(v / base, 3) for k, v in results.items()},
        "ratio_to_inprocess_threads1": {k: round(v / results["inprocess_threads1"], 3) for k, v in results.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
