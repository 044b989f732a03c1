"""Segmentation distilled from a teacher pool, on garment canvases: every strategy, per image and per
region, over paired seeds (docs/results.md, "Segmentation").

1. Three teachers of different architectures are trained on the train canvases (once; reused from
   ``--teacher-dir`` when their config is unchanged).
2. For each seed, a label-only student (``ce``) and one student per strategy are trained on 1,000 of
   the teachers' 2,000 training canvases (fewer labels: where distillation pays), with the same seed (same initialisation, batches and augmentation): paired runs. Teacher outputs go
   through the library's own cache (an in-memory store keyed by sample and augmentation, with an
   augmentation bank of 2), so the strategies of a seed share them.
3. Every student is scored on the whole test split (mIoU from the confusion matrix over all pixels);
   the report gives each strategy's mean, its paired difference to ``ce`` and to ``aver`` with a
   95% t-interval, and per-region against per-image for the weighted strategies.

A strategy is ``name`` or ``name@G`` (per-region teacher weights on a G x G grid), with
``mtkd_rl`` taking the default agent rule (``meta``)::

    python benchmarks/segmentation.py                                   # the reported table (about 45 min on 2 cores, teachers cached)
    python benchmarks/segmentation.py --seeds 0 --epochs 2 --quick      # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mtkd.cache import MemoryStore, OutputLayout  # noqa: E402
from mtkd.config import ExperimentConfig, TeacherSpec, TeacherTrainConfig  # noqa: E402
from mtkd.config_loader import apply_overrides, from_dict  # noqa: E402
from mtkd.session import Session  # noqa: E402
from mtkd.teacher_training import train_teacher  # noqa: E402
from mtkd.teachers import LocalTeacherPool, load_teacher  # noqa: E402
from mtkd.devices import device_name  # noqa: E402  (the CPU's model name, for the report)
from weighting import paired  # noqa: E402  (mean paired difference with its exact 95% t-interval)

TEACHERS = ("deeplabv3_resnet20", "lraspp_mobilenetv2", "fcn_vgg8")
STRATEGIES = ("ce", "aver", "camkd", "camkd@4", "mtkd_rl", "mtkd_rl@4")
DATA = {"name": "canvases", "batch_size": 32, "eval_batch_size": 250, "crop_padding": 4,
        "options": {"size": 48, "num_canvases": {"train": 2000, "test": 500}, "cache_dir": "cache/canvases"}}
TEACHER_OPTIM = {"epochs": 10, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                 "schedule": "onecycle"}
STUDENT = {"student": "fcn_resnet8", "data": {**DATA, "augment_bank": 2, "train_subset": 1000},
           "optim": {"epochs": 8, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                     "schedule": "onecycle"},
           "distill": {"temperature": 4.0, "beta": 0.1, "warmup_epochs": 0},
           "runtime": {"runtime": "inprocess", "device": "cpu", "prefetch": 0, "teacher_precision": "fp32"}}
QUICK = {"data.options.num_canvases": {"train": 128, "test": 64}, "teacher_epochs": 1, "train_subset": 96}


# ================================================================================ teachers
def teacher_config(model: str, data: dict, optim: dict) -> TeacherTrainConfig:
    return from_dict(TeacherTrainConfig, {"model": model, "seed": 0, "data": data, "optim": optim, "precision": "fp32"})


def ensure_teachers(models, cache_dir: Path, data: dict, optim: dict) -> list[dict]:
    """Each teacher from the demo's teacher cache (keyed by its training config: configs/demo-segmentation.yaml
    trains the same ones), trained there first when missing; returns their metas (with ``path``)."""
    from services.demo import cached_teacher

    return [cached_teacher(teacher_config(model, data, optim), cache_dir) for model in models]


# ==================================================================================== runs
def parse_strategy(label: str) -> tuple[str, int]:
    name, _, grid = label.partition("@")
    return name, int(grid or 0)


def student_config(base: dict, label: str, seed: int, teacher_dirs: list[str], output_dir: str,
                   extra: list[str]) -> ExperimentConfig:
    name, grid = parse_strategy(label)
    data = apply_overrides(copy.deepcopy(base), [*extra, f"seed={seed}", f"output_dir={output_dir}",
                                                f"distill.strategy={name}", f"distill.region_grid={grid}"])
    config = from_dict(ExperimentConfig, data)
    config.teachers = [TeacherSpec(checkpoint=d) for d in teacher_dirs] if name != "ce" else []
    return config


def run_seed(task: dict) -> list[dict]:
    """Every strategy of one seed, in order, sharing one in-memory teacher-output cache."""
    torch.set_num_threads(task["threads"])
    seed, records = task["seed"], []
    pool = LocalTeacherPool([load_teacher(d, precision="fp32") for d in task["teachers"]])
    store = MemoryStore()
    for label in task["strategies"]:
        start, cpu = time.perf_counter(), time.process_time()
        config = student_config(task["base"], label, seed, task["teachers"], task["output_dir"], task["set"])
        session = Session.build(config, pool if config.teachers else LocalTeacherPool([]),
                                store=store if config.teachers else None)
        history = []
        for _ in session.epochs():
            metrics = session.train_epoch()
            history.append({"epoch": metrics["epoch"], "loss": metrics["loss/total"], "test_miou": metrics["test/miou"],
                            "weights": {k.rsplit("/", 1)[1]: v for k, v in metrics.items()
                                        if k.startswith("weights/logit/")}})
        final = history[-1]
        record = {"seed": seed, "strategy": label, "test_miou": final["test_miou"], "test_acc": metrics["test/acc"],
                  "weights": final["weights"], "history": history, "wall_s": round(time.perf_counter() - start, 1),
                  "cpu_s": round(time.process_time() - cpu, 1)}
        print(f"[segmentation] seed {seed} {label:<10} mIoU {record['test_miou'] * 100:6.2f}  "
              f"({record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        records.append(record)
    return records


# ============================================================================== statistics
def summarise(records: list[dict], labels: list[str]) -> dict:
    by = {label: {r["seed"]: r for r in records if r["strategy"] == label} for label in labels}
    seeds = sorted({r["seed"] for r in records})

    def points(label: str) -> list[float]:
        return [by[label][s]["test_miou"] * 100 for s in seeds if s in by[label]]

    rows = {}
    for label in labels:
        values = points(label)
        row = {"miou": statistics.fmean(values) if values else None, "n": len(values)}
        for other in ("ce", "aver"):
            if other != label and other in by:
                common = [s for s in seeds if s in by[label] and s in by[other]]
                row[f"vs_{other}"] = paired([by[label][s]["test_miou"] * 100 for s in common],
                                            [by[other][s]["test_miou"] * 100 for s in common])
        name, grid = parse_strategy(label)
        if grid and name in by:
            common = [s for s in seeds if s in by[label] and s in by[name]]
            row["vs_per_image"] = paired([by[label][s]["test_miou"] * 100 for s in common],
                                         [by[name][s]["test_miou"] * 100 for s in common])
        weights = [by[label][s]["weights"] for s in seeds if s in by[label] and by[label][s]["weights"]]
        if weights:
            row["weights"] = {t: statistics.fmean(w[t] for w in weights) for t in weights[0]}
        rows[label] = row
    return rows


def _interval(d: dict | None) -> str:
    if not d:
        return "-"
    if d["low"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def table(summary: dict) -> str:
    lines = ["| strategy | mIoU | vs ce | vs aver | per region vs per image | mean teacher weights |",
             "|---|---|---|---|---|---|"]
    for label, row in summary.items():
        weights = ", ".join(f"{v:.2f}" for v in row.get("weights", {}).values()) or "-"
        lines.append(f"| {label} | {row['miou']:.2f} | {_interval(row.get('vs_ce'))} | {_interval(row.get('vs_aver'))} "
                     f"| {_interval(row.get('vs_per_image'))} | {weights} |")
    return "\n".join(lines)


# ==================================================================================== main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=STUDENT["optim"]["epochs"])
    parser.add_argument("--teacher-dir", default="cache/teachers", help="the teacher cache (shared with the demo)")
    parser.add_argument("--workers", type=int, default=2, help="processes (one seed each at a time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the student's config (repeatable), e.g. distill.beta=0")
    parser.add_argument("--quick", action="store_true", help="128 train / 64 test canvases, 1 teacher epoch")
    parser.add_argument("--teachers-only", action="store_true", help="train (or check) the teachers, then stop")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="no training: summarise the records of earlier "
                        "reports (e.g. seeds run apart) into --out")
    parser.add_argument("--out", default="benchmarks/results/segmentation.json")
    args = parser.parse_args(argv)

    if args.merge:
        return merge(args.merge, Path(args.out))
    data, teacher_optim = copy.deepcopy(DATA), dict(TEACHER_OPTIM)
    base = copy.deepcopy(STUDENT)
    if args.quick:
        data["options"]["num_canvases"] = QUICK["data.options.num_canvases"]
        base["data"]["options"]["num_canvases"] = QUICK["data.options.num_canvases"]
        base["data"]["train_subset"] = QUICK["train_subset"]
        teacher_optim["epochs"] = QUICK["teacher_epochs"]
    base["optim"]["epochs"] = args.epochs
    labels = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for label in labels:  # a bad strategy stops the benchmark before any training
        student_config(base, label, 0, [], "runs/seg-check", args.set)

    start = time.perf_counter()
    metas = ensure_teachers(TEACHERS, Path(args.teacher_dir), data, teacher_optim)
    teacher_dirs = [m["path"] for m in metas]
    if args.teachers_only:
        for m in metas:
            print(f"teacher {m['model']}: mIoU {m['test_miou'] * 100:.2f}, pixel accuracy {m['test_accuracy'] * 100:.2f}")
        return 0
    tasks = [{"seed": s, "strategies": labels, "base": base, "teachers": teacher_dirs, "threads": args.threads,
              "set": args.set, "output_dir": f"runs/seg-benchmark/seed{s}"} for s in args.seeds]
    if args.workers > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(min(args.workers, len(tasks))) as workers:
            records = [r for chunk in workers.map(run_seed, tasks, chunksize=1) for r in chunk]
    else:
        records = [r for task in tasks for r in run_seed(task)]
    summary = summarise(records, labels)
    cache_bytes = {}
    for folder in teacher_dirs:  # what one canvas costs in the cache of teacher outputs, per value dtype
        description = load_teacher(folder).describe()
        layout = OutputLayout.from_description(description)
        cache_bytes[description["model"]] = {"logit_size": list(layout.logit_size),
                                             **{d: layout.value_bytes(d) for d in ("float32", "bfloat16")}}
    report = {
        "command": "python benchmarks/segmentation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": device_name(torch.device("cpu")), "threads_per_run": args.threads, "workers": args.workers, "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - start, 1), "seeds": args.seeds, "strategies": labels,
        "teachers": [{"model": m["model"], "test_miou": m["test_miou"], "test_pixel_acc": m["test_accuracy"],
                      "train_seconds": m.get("train_seconds")} for m in metas],
        "student": base, "overrides": args.set, "cache_bytes_per_image": cache_bytes, "summary": summary,
        "records": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    for m in metas:
        print(f"teacher {m['model']}: mIoU {m['test_miou'] * 100:.2f}")
    print(table(summary))
    print(f"[segmentation] wrote {out} ({report['wall_s']:.0f} s)", file=sys.stderr)
    return 0


def merge(paths: list[str], out: Path) -> int:
    """One report from several (the same teachers and student settings, other seeds): records joined,
    summary recomputed; each part's command and wall time kept."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    report = dict(parts[0])
    report["records"] = [r for part in parts for r in part["records"]]
    report["seeds"] = sorted({r["seed"] for r in report["records"]})
    report["parts"] = [{"file": p, "command": part["command"], "seeds": part["seeds"], "wall_s": part["wall_s"]}
                       for p, part in zip(paths, parts)]
    report["summary"] = summarise(report["records"], report["strategies"])
    out.write_text(json.dumps(report, indent=1))
    print(table(report["summary"]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
