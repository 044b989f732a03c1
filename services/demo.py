"""``mtkd demo``: the main job end to end, sized for a small CPU machine.

Trains (or reuses from a cache) a pool of teachers on ``teacher.data.train_subset`` training images
(20,000 in configs/demo.yaml), distills one student from a small labelled subset with each strategy
(on Ray by default; the teachers' outputs are computed once and shared through a private Redis), and
prints a table of test accuracies with each strategy's gain, a comparison plot, and a plot of which
teacher the agent trusted for which class. Segmentation data add a picture of masks; detection data
(configs/demo-detection.yaml) tables of COCO mAP and mAP@0.5 and a picture of detections, with the
student runs on the student config's own runtime (in process).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from mtkd.checkpoint import CheckpointError
from mtkd.config import (ExperimentConfig, TeacherSpec, TeacherTrainConfig, apply_overrides, from_dict, read_yaml,
                         to_dict)
from mtkd.data import load_dataset
from mtkd.plot import plot_class_trust, plot_comparison
from mtkd.teacher_training import train_teacher
from mtkd.teachers import load_model_checkpoint


@dataclass
class DemoConfig:
    cache_dir: str = "cache/teachers"
    """Teachers are cached here, keyed by their training config."""
    output_dir: str = "runs/demo"
    """One run folder per strategy below this, and the comparison plots."""
    strategies: list[str] = field(default_factory=lambda: ["ce", "aver", "camkd", "mtkd_rl"])
    """Strategies to compare (``ce`` first: the others' gains are measured against it)."""
    teacher_models: list[str] = field(default_factory=lambda: ["resnet20", "vgg8", "wrn_16_2"])
    """Model names of the teacher pool."""
    teacher: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    """How each teacher is trained (model and output_dir are filled in per teacher)."""
    student: ExperimentConfig = field(default_factory=ExperimentConfig)
    """The student's experiment (teachers, strategy and output_dir are filled in per run)."""
    share_teacher_outputs: bool = True
    """Run a private redis-server for the student runs: the teachers' outputs are computed once (the
    runs see the same batches) and every later strategy reads them from the cache."""


def teacher_key(cfg: TeacherTrainConfig) -> str:
    """A short hash of everything that determines a teacher (not where it is written)."""
    data = to_dict(cfg)
    for key in ("output_dir", "threads", "device"):
        data.pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def cached_teacher(cfg: TeacherTrainConfig, cache_dir: Path) -> dict:
    """Reuse the teacher of ``cfg`` from ``cache_dir`` (verified) or train it there."""
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(cache_dir / f"{cfg.model}-{teacher_key(cfg)}")
    try:
        _, meta = load_model_checkpoint(cfg.output_dir)
        print(f"[demo] teacher {cfg.model}: reusing {cfg.output_dir}", file=sys.stderr)
    except CheckpointError:
        subset = f"{cfg.data.train_subset} images" if cfg.data.train_subset else "the whole training set"
        print(f"[demo] teacher {cfg.model}: training on {subset} ({cfg.optim.epochs} epochs, {cfg.precision})",
              file=sys.stderr, flush=True)
        meta = train_teacher(cfg, progress=True, overwrite=True)
    return {**meta, "path": cfg.output_dir}


def format_table(rows: list[tuple[str, str, str, float]], metric: str = "test acc") -> str:
    """Teachers and students with each student's gain over ``ce``, ``aver`` and, when it ran, ``camkd``
    (points of ``metric``: test accuracy, or mIoU in segmentation)."""
    accuracy = {s: a for _, role, s, a in rows if role == "student"}
    bases = ("ce", "aver", "camkd") if "camkd" in accuracy else ("ce", "aver")
    width = max(14, max(len(m) + 2 for m, *_ in rows))
    named = max(10, max(len(s) + 2 for _, _, s, _ in rows))  # detection's "mtkd_rl@object"
    header = (f"{'model':<{width}}{'role':<10}{'strategy':<{named}}{metric:>9}"
              + "".join(f"{'vs ' + b:>10}" for b in bases))
    lines = [header, "-" * len(header)]
    for model, role, strategy, acc in rows:
        line = f"{model:<{width}}{role:<10}{strategy:<{named}}{acc * 100:>8.2f}%"
        for base in bases:
            shown = role == "student" and base in accuracy and strategy not in ("ce", base)
            line += f"{(acc - accuracy[base]) * 100:>+10.2f}" if shown else " " * 10
        lines.append(line.rstrip())
    return "\n".join(lines)


def run_demo(config_path: str | None, overrides: list[str], runtime: str = "ray") -> dict:
    """Run the demo; returns a JSON-able summary (the table is printed to stdout)."""
    raw = read_yaml(config_path, "demo config") if config_path else {}
    demo = from_dict(DemoConfig, apply_overrides(raw or {}, overrides))
    start = time.perf_counter()
    teachers = []
    for model in demo.teacher_models:
        cfg = copy.deepcopy(demo.teacher)
        cfg.model = model
        teachers.append(cached_teacher(cfg, Path(demo.cache_dir)))
    dense = "test_miou" in teachers[0]  # segmentation: mIoU is the metric
    boxes = "test_map" in teachers[0]  # detection: COCO mAP (and mAP@0.5)
    if boxes:
        runtime = detection_runtime(demo, runtime)
        return run_detection_demo(demo, teachers, runtime, start)
    metric, key = ("test mIoU", "test_miou") if dense else ("test acc", "test_accuracy")
    rows = [(t["model"], "teacher", "-", t[key]) for t in teachers]
    runs = run_students(demo, teachers, runtime)
    rows += [(demo.student.student, "student", s, r["test_miou" if dense else "test_acc"]) for s, r in runs.items()]
    plots = draw(demo, runs, teachers)
    print(format_table(rows, metric))
    print("\nplots: " + ", ".join(str(p) for p in plots.values()))
    return {"wall_seconds": round(time.perf_counter() - start, 1), **{f"{k}_plot": str(v) for k, v in plots.items()},
            "table": [{"model": m, "role": r, "strategy": s, key.replace("accuracy", "acc"): a} for m, r, s, a in rows]}


def run_students(demo: DemoConfig, teachers: list[dict], runtime: str) -> dict[str, dict]:
    """Distill the student with every strategy; the teachers' outputs shared through a private Redis."""
    base = copy.deepcopy(demo.student)
    base.teachers = [TeacherSpec(checkpoint=t["path"]) for t in teachers]
    base.runtime.runtime = runtime
    if runtime == "ray":
        from services.learner.driver import ensure_ray, run_ray as run
        import ray

        ensure_ray(base)  # one private Ray for every run, sized for the pool's actors
    else:
        from mtkd.runner import run_inprocess as run
    runs: dict[str, dict] = {}
    try:
        with shared_cache(demo) as store:
            for strategy in demo.strategies:
                config = copy.deepcopy(base)
                config.distill.strategy, _, units = strategy.partition("@")  # detection: "camkd@object"
                if units:
                    config.distill.units = units
                config.output_dir = str(Path(demo.output_dir) / strategy)
                options = {}
                if store is not None:
                    config.cache.url = store.url
                    options = {"store": store} if runtime == "inprocess" else {}
                print(f"[demo] student {config.student} with {strategy} on {runtime}", file=sys.stderr, flush=True)
                runs[strategy] = run(config, progress=True, overwrite=True, **options)
    finally:
        if runtime == "ray":
            ray.shutdown()
    return runs


def shared_cache(demo: DemoConfig):
    """A private Redis for the student runs (or nothing, with a note, when redis-server is missing)."""
    from services.cache import open_store

    if not demo.share_teacher_outputs or demo.student.data.detection:  # augmented detection: no cache key yet
        return contextlib.nullcontext(None)
    if shutil.which("redis-server") is None:
        print("[demo] redis-server is not installed: every strategy computes the teachers' outputs again",
              file=sys.stderr)
        return contextlib.nullcontext(None)
    return open_store("local", demo.student.cache.max_memory_mb)


def draw(demo: DemoConfig, runs: dict[str, dict], teachers: list[dict]) -> dict[str, Path]:
    """The comparison plot, and the class-trust plot of the agent's run (if there is one)."""
    out = Path(demo.output_dir)
    plots = {"comparison": out / "comparison.png"}
    plot_comparison({s: r["history"] for s, r in runs.items()}, plots["comparison"])
    data = demo.student.data
    test_set = load_dataset(data.name, data.root, "test", **data.options)
    if test_set.task == "segmentation":
        plots["masks"] = out / "masks.png"
        draw_masks(test_set, teachers, runs, plots["masks"])
    agent_run = runs.get("mtkd_rl") or next((r for s, r in runs.items() if s.startswith("mtkd_rl@")), None)
    if agent_run and agent_run["history"] and "class_weights/logit" in agent_run["history"][-1]:
        last = agent_run["history"][-1]
        names = test_set.class_names
        if test_set.task == "detection" and names:  # its last unit class: background (and padding) units
            names = [*names, "background"]
        plots["class_trust"] = out / "class_trust.png"
        plot_class_trust(last["class_weights/logit"], [t["model"] for t in teachers], names, plots["class_trust"],
                         title=f"which teacher the agent trusts for which class (epoch {last['epoch']})")
    return plots


def draw_masks(test_set, teachers: list[dict], runs: dict[str, dict], path: Path, count: int = 6) -> None:
    """The first ``count`` test images with ground truth, each teacher's and each student's masks."""
    import torch

    from mtkd.data import BatchLoader
    from mtkd.models.segmentation.outputs import upsample_logits
    from mtkd.plot import plot_segmentation_examples

    batch = next(iter(BatchLoader(test_set, count, shuffle=False)))
    predictions = {}
    columns = [(t["model"], t["path"]) for t in teachers] + [(f"student {s}", r["student"]) for s, r in runs.items()]
    for title, folder in columns:
        model, _ = load_model_checkpoint(folder)
        with torch.no_grad():
            logits = model.eval()(batch.images)[0]
        predictions[title] = upsample_logits(logits, batch.labels).argmax(1)
    plot_segmentation_examples(test_set.images[:count, 0], batch.labels, predictions, test_set.class_names, path,
                               title="test canvases: ground truth, teachers, students")


# ---- detection ------------------------------------------------------------------------------------


def detection_runtime(demo: DemoConfig, asked: str) -> str:
    """The runtime of a detection demo's student runs: the student config's own (configs/demo-detection.yaml:
    in process, as the benchmark it repeats), with a note when another was asked for."""
    own = demo.student.runtime.runtime
    if asked != own:
        print(f"[demo] detection: the student runs use student.runtime.runtime={own} (not {asked}; "
              f"configs/demo-detection.yaml)", file=sys.stderr)
    return own


def run_detection_demo(demo: DemoConfig, teachers: list[dict], runtime: str, start: float) -> dict:
    """The students of a detection demo, a table of COCO mAP and one of mAP@0.5 (with the gains over
    ``ce``, ``aver`` and ``camkd``), the comparison plot and the picture of detections."""
    runs = run_students(demo, teachers, runtime)
    student = demo.student.student
    tables = {}
    for metric, key in (("test mAP", "test_map"), ("mAP@0.5", "test_map50")):
        rows = [(t["model"], "teacher", "-", t[key]) for t in teachers]
        rows += [(student, "student", s, r[key]) for s, r in runs.items()]
        tables[key] = rows
        print(format_table(rows, metric) + "\n")
    plots = draw(demo, runs, teachers)
    plots["detections"] = Path(demo.output_dir) / "detections.png"
    draw_detections(demo, teachers, runs, plots["detections"])
    print("plots: " + ", ".join(str(p) for p in plots.values()))
    return {"wall_seconds": round(time.perf_counter() - start, 1), **{f"{k}_plot": str(v) for k, v in plots.items()},
            "table": [{"model": m, "role": r, "strategy": s, "test_map": a, "test_map50": b[3]}
                      for (m, r, s, a), b in zip(tables["test_map"], tables["test_map50"])]}


def draw_detections(demo: DemoConfig, teachers: list[dict], runs: dict[str, dict], path: Path,
                    count: int = 4) -> None:
    """The first ``count`` test canvases with their ground-truth boxes, each teacher's and each student's
    decoded detections (:func:`mtkd.plot.plot_detection_examples`)."""
    import torch

    from mtkd.data import BatchLoader
    from mtkd.detection.decode import decode_centernet
    from mtkd.plot import plot_detection_examples

    data = demo.student.data
    test_set = load_dataset(data.name, data.root, "test", **data.options)
    batch = next(iter(BatchLoader(test_set, count, shuffle=False)))
    columns = [(t["model"], t["path"]) for t in teachers] + [(f"student {s}", r["student"]) for s, r in runs.items()]
    detections = {}
    for title, folder in columns:
        model, _ = load_model_checkpoint(folder)
        with torch.no_grad():
            logits = model.eval()(batch.images)[0]
        detections[title] = decode_centernet(logits, model.output_stride, tuple(batch.images.shape[-2:]))
    plot_detection_examples(test_set.images[:count, 0], batch.labels, detections, test_set.class_names, path,
                            title="test canvases: ground truth, teachers, students")
