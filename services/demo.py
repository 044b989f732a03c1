"""``mtkd demo``: the main job end to end, sized for a small CPU machine.

Trains (or reuses from a cache) a pool of teachers, distills one student with each strategy
(on Ray by default), and prints a table of test accuracies and where the plots are.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtkd.checkpoint import CheckpointError
from mtkd.config import ExperimentConfig, TeacherSpec, TeacherTrainConfig, apply_overrides, from_dict, to_dict
from mtkd.plot import plot_comparison
from mtkd.teacher_training import train_teacher
from mtkd.teachers import load_model_checkpoint


@dataclass
class DemoConfig:
    cache_dir: str = "cache/teachers"
    """Teachers are cached here, keyed by their training config."""
    output_dir: str = "runs/demo"
    """One run folder per strategy below this."""
    strategies: list[str] = field(default_factory=lambda: ["ce", "aver", "mtkd_rl"])
    """Strategies to compare."""
    teacher_models: list[str] = field(default_factory=lambda: ["resnet20", "vgg8", "wrn_16_2"])
    """Model names of the teacher pool."""
    teacher: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    """How each teacher is trained (model and output_dir are filled in per teacher)."""
    student: ExperimentConfig = field(default_factory=ExperimentConfig)
    """The student's experiment (teachers, strategy and output_dir are filled in per run)."""


def teacher_key(cfg: TeacherTrainConfig) -> str:
    """A short hash of everything that determines a teacher (not where it is written)."""
    data = to_dict(cfg)
    data.pop("output_dir")
    data.pop("threads")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def cached_teacher(cfg: TeacherTrainConfig, cache_dir: Path) -> dict:
    """Reuse the teacher of ``cfg`` from ``cache_dir`` (verified) or train it there."""
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(cache_dir / f"{cfg.model}-{teacher_key(cfg)}")
    try:
        _, meta = load_model_checkpoint(cfg.output_dir)
        print(f"[demo] teacher {cfg.model}: reusing {cfg.output_dir}", file=sys.stderr)
    except CheckpointError:
        print(f"[demo] teacher {cfg.model}: training ({cfg.optim.epochs} epochs)", file=sys.stderr)
        meta = train_teacher(cfg, progress=True, overwrite=True)
    return {**meta, "path": cfg.output_dir}


def format_table(rows: list[tuple[str, str, str, float]]) -> str:
    lines = [f"{'model':<14}{'role':<10}{'strategy':<10}{'test acc':>9}", "-" * 43]
    lines += [f"{m:<14}{r:<10}{s:<10}{a * 100:>8.2f}%" for m, r, s, a in rows]
    return "\n".join(lines)


def run_demo(config_path: str | None, overrides: list[str], runtime: str = "ray") -> dict:
    """Run the demo; returns a JSON-able summary (the table is printed to stdout)."""
    raw = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    demo = from_dict(DemoConfig, apply_overrides(raw or {}, overrides))
    start = time.perf_counter()
    teachers = []
    for model in demo.teacher_models:
        cfg = copy.deepcopy(demo.teacher)
        cfg.model = model
        teachers.append(cached_teacher(cfg, Path(demo.cache_dir)))
    if runtime == "ray":
        from services.learner.driver import ensure_ray, run_ray as run
        import ray

        sized = copy.deepcopy(demo.student)  # the private Ray must fit the pool's actors
        sized.teachers = [TeacherSpec(checkpoint=t["path"]) for t in teachers]
        ensure_ray(sized)
    else:
        from mtkd.runner import run_inprocess as run
    rows = [(t["model"], "teacher", "-", t["test_accuracy"]) for t in teachers]
    runs = {}
    try:
        for strategy in demo.strategies:
            config = copy.deepcopy(demo.student)
            config.teachers = [TeacherSpec(checkpoint=t["path"]) for t in teachers]
            config.distill.strategy = strategy
            config.runtime.runtime = runtime
            config.output_dir = str(Path(demo.output_dir) / strategy)
            print(f"[demo] student {config.student} with {strategy} on {runtime}", file=sys.stderr)
            summary = run(config, progress=True, overwrite=True)
            runs[strategy] = summary
            rows.append((config.student, "student", strategy, summary["test_acc"]))
    finally:
        if runtime == "ray":
            ray.shutdown()
    comparison = Path(demo.output_dir) / "comparison.png"
    plot_comparison({s: r["history"] for s, r in runs.items()}, comparison)
    print(format_table(rows))
    print(f"\nplots: {comparison} (all strategies); per run: " + ", ".join(r["plot"] for r in runs.values()))
    return {"wall_seconds": round(time.perf_counter() - start, 1), "comparison_plot": str(comparison),
            "table": [{"model": m, "role": r, "strategy": s, "test_acc": a} for m, r, s, a in rows]}
