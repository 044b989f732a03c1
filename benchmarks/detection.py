"""Object detection distilled from a teacher pool, on garment canvases: every strategy, per image and
per object, over paired seeds (docs/results.md, "Detection").

1. Three CenterNet teachers of different backbones are trained on the train canvases (once; reused
   from ``--teacher-dir``, the repo's teacher cache shared with configs/demo-detection.yaml, when
   their training config is unchanged).
2. For each seed, a label-only student (``ce``) and one student per strategy are trained on a subset
   of the teachers' training canvases (fewer labels: where distillation pays), with the same seed
   (same initialisation, batches and augmentation): paired runs. Detection has no cache of teacher
   outputs (docs/detection.md), so every distilled run computes its teachers' outputs itself.
3. Every student is scored on the whole test split (COCO mAP@[.5:.95] and mAP@0.5 by
   faster-coco-eval); the report gives each strategy's mean, its paired difference to ``ce`` and to
   ``aver`` with a 95% t-interval, and per object against per image for the weighted strategies.

A strategy is ``name`` (teacher weights per image) or ``name@object`` (per object: each ground-truth
box a decision unit, and each image's background), ``mtkd_rl`` with the default agent rule
(``meta``). ``aver@object`` equals ``aver`` exactly (equal weights give back the per-image loss), so
it is not in the default list. Runs are independent tasks (one run each, seed-major), spread over
``--workers`` processes; each finished run is appended to ``<out>.runs.jsonl`` at once, and
``--resume`` skips the runs found there (an interrupted benchmark goes on where it stopped)::

    python benchmarks/detection.py                                  # the reported table (5 seeds)
    python benchmarks/detection.py --seeds 0 --epochs 1 --quick     # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mtkd.config import ExperimentConfig, TeacherSpec, TeacherTrainConfig  # noqa: E402
from mtkd.config_loader import apply_overrides, from_dict  # noqa: E402
from mtkd.devices import device_name  # noqa: E402  (the CPU's model name, for the report)
from mtkd.session import Session  # noqa: E402
from mtkd.teachers import LocalTeacherPool, load_teacher  # noqa: E402
from weighting import paired  # noqa: E402  (mean paired difference with its exact 95% t-interval)

# teachers are trained two at a time in this order (put the slowest first); a run's weights are listed in it
TEACHERS = ("centernet_wrn_16_2", "centernet_vgg8", "centernet_resnet20")
STRATEGIES = ("ce", "aver", "camkd", "camkd@object", "mtkd_rl", "mtkd_rl@object")
DATA = {"name": "canvases_det", "batch_size": 32, "eval_batch_size": 250, "augment": True, "crop_padding": 4,
        "hflip": True,
        "options": {"size": 32, "garments": [1, 3], "scale": [0.45, 0.8], "num_canvases": {"train": 2000, "test": 500},
                    "cache_dir": "cache/canvases"}}
TEACHER_OPTIM = {"epochs": 6, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                 "schedule": "onecycle"}
STUDENT = {"student": "centernet_resnet8", "data": {**DATA, "train_subset": 500},
           "optim": {"epochs": 8, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                     "schedule": "onecycle"},
           # heatmap KL at T = 1 and no PKD feature term: at T = 4 with beta 1 (the starting configs') every
           # distilled student fell below `ce` (docs/results.md, "Detection")
           "distill": {"temperature": 1.0, "beta": 0.0, "warmup_epochs": 0},
           "runtime": {"runtime": "inprocess", "device": "cpu", "prefetch": 0, "teacher_precision": "fp32"}}
QUICK = {"num_canvases": {"train": 128, "test": 64}, "teacher_epochs": 1, "train_subset": 96}


# ================================================================================ teachers
def teacher_config(model: str, data: dict, optim: dict) -> TeacherTrainConfig:
    return from_dict(TeacherTrainConfig, {"model": model, "seed": 0, "data": data, "optim": optim, "precision": "fp32"})


def _cached_teacher(task: tuple) -> dict:
    from services.demo import cached_teacher

    model, cache_dir, data, optim, threads = task
    torch.set_num_threads(threads)
    return cached_teacher(teacher_config(model, data, optim), cache_dir)


def ensure_teachers(models, cache_dir: Path, data: dict, optim: dict, workers: int = 1, threads: int = 1) -> list[dict]:
    """Each teacher from the teacher cache (keyed by its training config: configs/demo-detection.yaml
    trains the same ones), trained there first when missing (``workers`` at a time); returns their
    metas (with ``path``)."""
    tasks = [(model, cache_dir, data, optim, threads) for model in models]
    if workers > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            return pool.map(_cached_teacher, tasks, chunksize=1)
    return [_cached_teacher(task) for task in tasks]


# ==================================================================================== runs
def parse_strategy(label: str) -> tuple[str, str]:
    """``"camkd@object"`` -> ``("camkd", "object")``; ``"aver"`` -> ``("aver", "image")`` (a trailing
    ``{key=value ...}`` of run overrides is not part of either)."""
    name, _, units = label.split("{", 1)[0].partition("@")
    return name, units or "image"


def label_overrides(label: str) -> list[str]:
    """``"aver{distill.beta=0 distill.temperature=1}"`` -> ``["distill.beta=0", "distill.temperature=1"]``."""
    _, brace, rest = label.partition("{")
    if brace and not rest.endswith("}"):
        raise SystemExit(f"strategy {label!r}: overrides must end with '}}'")
    return rest[:-1].split() if brace else []


def split_labels(text: str) -> list[str]:
    """``--strategies``: comma-separated labels (a label's ``{...}`` may hold spaces, no commas)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def student_config(base: dict, label: str, seed: int, teacher_dirs: list[str], output_dir: str,
                   extra: list[str]) -> ExperimentConfig:
    name, units = parse_strategy(label)
    data = apply_overrides(copy.deepcopy(base), [*extra, *label_overrides(label), f"seed={seed}",
                                                f"output_dir={output_dir}", f"distill.strategy={name}",
                                                f"distill.units={units}"])
    config = from_dict(ExperimentConfig, data)
    config.teachers = [TeacherSpec(checkpoint=d) for d in teacher_dirs] if name != "ce" else []
    return config


class MemoPool(LocalTeacherPool):
    """The in-process pool, each batch's outputs kept in memory by the exact bytes of its images.

    The runs of one seed see the same batches (same order and augmentation), so every distilled run
    after the first reads its teachers' outputs from here: the same float32 tensors the teachers
    computed, hence the same training as without it. (The library's cache of teacher outputs does not
    take detection sets yet, docs/detection.md; this memo lives for one group of runs of one seed.)
    """

    def __init__(self, teachers):
        super().__init__(teachers)
        self.memo: dict[bytes, list] = {}
        self.hits = self.misses = 0

    def collect(self, ticket):
        images = ticket.images.detach().contiguous().cpu()
        digest = hashlib.blake2b(images.numpy().tobytes(), digest_size=16).digest()
        key = digest + str(tuple(images.shape)).encode()
        if key in self.memo:
            self.hits += 1
        else:
            self.misses += 1
            self.memo[key] = [type(o)(*(t.detach() for t in o)) for o in super().collect(ticket)]
        return self.memo[key]

    def take_counts(self) -> tuple[int, int]:
        counts, self.hits, self.misses = (self.hits, self.misses), 0, 0
        return counts


_TEACHERS: dict = {}


def run_group(task: dict) -> list[dict]:
    """Some strategies of one seed, in order, sharing one :class:`MemoPool`; each finished run is
    appended to ``task["log"]`` at once."""
    torch.set_num_threads(task["threads"])
    key = tuple(task["teachers"])
    if key not in _TEACHERS:  # loaded once per worker process
        _TEACHERS[key] = [load_teacher(d, precision="fp32") for d in task["teachers"]]
    pool = MemoPool(_TEACHERS[key])
    records = []
    for label in task["strategies"]:
        record = run_one({**task, "strategy": label}, pool)
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(task["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:  # one write of the whole line: the workers' lines do not interleave
            os.write(fd, line)
        finally:
            os.close(fd)
        records.append(record)
    return records


def run_one(task: dict, pool: MemoPool) -> dict:
    """One (seed, strategy) run: the student's final COCO mAP and mAP@0.5 on the whole test split."""
    seed, label = task["seed"], task["strategy"]
    config = student_config(task["base"], label, seed, task["teachers"], task["output_dir"].format(
        seed=seed, label=re.sub(r"[^A-Za-z0-9_.=-]+", "-", label).strip("-")), task["set"])
    start, cpu = time.perf_counter(), time.process_time()
    pool.take_counts()
    session = Session.build(config, pool if config.teachers else LocalTeacherPool([]))
    history, raw = [], []
    for _ in session.epochs():
        metrics = session.train_epoch()
        raw.append(metrics)
        history.append({"epoch": metrics["epoch"], "loss": metrics["loss/total"], "test_map": metrics["test/map"],
                        "test_map50": metrics["test/map50"],
                        "weights": {k.rsplit("/", 1)[1]: v for k, v in metrics.items()
                                    if k.startswith("weights/logit/")}})
    final = history[-1]
    hits, misses = pool.take_counts()
    exported = None
    if seed in task.get("export_seeds", [0]):  # the student as a checkpoint (for the demo's picture)
        from mtkd.experiment import RunDirectory
        from mtkd.runner import finish

        exported = finish(config, RunDirectory(config.output_dir), session.train_set, session.distiller.descriptions,
                          raw, session.distiller.module.state_dict(), session.epoch)["student"]
    record = {"seed": seed, "strategy": label, "test_map": final["test_map"], "test_map50": final["test_map50"],
              "weights": final["weights"], "history": history, "wall_s": round(time.perf_counter() - start, 1),
              "cpu_s": round(time.process_time() - cpu, 1), "teacher_batches": {"memo": hits, "computed": misses},
              "student": exported}
    print(f"[detection] seed {seed} {label:<15} mAP {record['test_map'] * 100:6.2f}  mAP@0.5 "
          f"{record['test_map50'] * 100:6.2f}  ({record['wall_s']:.0f} s, teacher batches computed {misses}, "
          f"from memo {hits})", file=sys.stderr, flush=True)
    return record


def plan_groups(todo: dict[int, list[str]], workers: int) -> list[tuple[int, list[str]]]:
    """Groups of runs, one seed each, in seed order: a seed's runs stay together (they share the memo of
    teacher outputs), except that the seeds left over when the seeds do not divide among the workers
    are split so that every worker has work at the end (5 seeds on 2 workers: 4 whole seeds, then seed
    4 in two halves, each half computing the teachers' outputs once)."""
    seeds = list(todo)
    tail = len(seeds) % workers if workers > 1 else 0
    groups = [(s, todo[s]) for s in seeds[:len(seeds) - tail]]
    for s in seeds[len(seeds) - tail:]:
        parts = max(1, min(len(todo[s]), workers // tail))
        size = -(-len(todo[s]) // parts)
        groups += [(s, todo[s][i:i + size]) for i in range(0, len(todo[s]), size)]
    return groups


# ============================================================================== statistics
METRICS = ("test_map", "test_map50")


def summarise(records: list[dict], labels: list[str]) -> dict:
    """Per strategy: mean mAP and mAP@0.5 (points) and paired differences vs ``ce``, vs ``aver`` and,
    for ``name@object``, vs ``name`` (per image), on the seeds both have."""
    by = {label: {r["seed"]: r for r in records if r["strategy"] == label} for label in labels}
    rows = {}
    for label in labels:
        runs = by[label]
        if not runs:
            continue
        row: dict = {"n": len(runs), "seeds": sorted(runs)}
        for metric in METRICS:
            row[metric] = statistics.fmean(r[metric] * 100 for r in runs.values())
        name, units = parse_strategy(label)
        against = [o for o in ("ce", "aver") if o != label] + ([name] if units != "image" else [])
        for other in against:
            if other not in by or not by[other]:
                continue
            common = sorted(set(runs) & set(by[other]))
            tag = "per_image" if other == name and units != "image" else other
            for metric in METRICS:
                row[f"vs_{tag}/{metric}"] = paired([runs[s][metric] * 100 for s in common],
                                                   [by[other][s][metric] * 100 for s in common])
        weights = [r["weights"] for r in runs.values() if r["weights"]]
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
    """The markdown table of docs/results.md (points of mAP and mAP@0.5)."""
    lines = ["| strategy | seeds | mAP | mAP@0.5 | mAP vs ce | mAP vs aver | mAP@0.5 vs ce | mAP@0.5 vs aver "
             "| per object vs per image (mAP) | mean teacher weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in summary.items():
        weights = ", ".join(f"{v:.2f}" for v in row.get("weights", {}).values()) or "-"
        cells = [row.get(f"vs_{o}/{m}") for m in METRICS for o in ("ce", "aver")]
        lines.append(f"| {label} | {row['n']} | {row['test_map']:.2f} | {row['test_map50']:.2f} | "
                     + " | ".join(_interval(c) for c in cells)
                     + f" | {_interval(row.get('vs_per_image/test_map'))} | {weights} |")
    return "\n".join(lines)


# ==================================================================================== main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--teachers", default=",".join(TEACHERS), help="detector names of the pool")
    parser.add_argument("--epochs", type=int, default=STUDENT["optim"]["epochs"], help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_OPTIM["epochs"])
    parser.add_argument("--train-subset", type=int, default=STUDENT["data"]["train_subset"],
                        help="labelled training canvases of the students")
    parser.add_argument("--teacher-dir", default="cache/teachers", help="the teacher cache (shared with the demo)")
    parser.add_argument("--workers", type=int, default=2, help="processes (one run each at a time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the student's config (repeatable), e.g. distill.beta=0")
    parser.add_argument("--quick", action="store_true", help="128 train / 64 test canvases, 1 teacher epoch")
    parser.add_argument("--teachers-only", action="store_true", help="train (or check) the teachers, then stop")
    parser.add_argument("--resume", action="store_true", help="skip the runs already in <out>.runs.jsonl")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="no training: summarise the records of earlier "
                        "reports (e.g. seeds run apart) into --out")
    parser.add_argument("--export-seeds", type=int, nargs="*", default=[0],
                        help="seeds whose students are saved as checkpoints "
                             "(runs/det-benchmark/seedS/STRATEGY/student)")
    parser.add_argument("--out", default="benchmarks/results/detection.json")
    args = parser.parse_args(argv)

    if args.merge:
        return merge(args.merge, Path(args.out))
    data, teacher_optim = copy.deepcopy(DATA), {**TEACHER_OPTIM, "epochs": args.teacher_epochs}
    base = copy.deepcopy(STUDENT)
    base["data"]["train_subset"] = args.train_subset
    if args.quick:
        data["options"]["num_canvases"] = QUICK["num_canvases"]
        base["data"]["options"]["num_canvases"] = QUICK["num_canvases"]
        base["data"]["train_subset"] = QUICK["train_subset"]
        teacher_optim["epochs"] = QUICK["teacher_epochs"]
    base["optim"]["epochs"] = args.epochs
    labels = split_labels(args.strategies)
    for label in labels:  # a bad strategy stops the benchmark before any training
        student_config(base, label, 0, [], "runs/det-check", args.set)

    start = time.perf_counter()
    metas = ensure_teachers([t.strip() for t in args.teachers.split(",")], Path(args.teacher_dir), data, teacher_optim,
                            args.workers, args.threads)
    teacher_dirs = [m["path"] for m in metas]
    for m in metas:
        print(f"teacher {m['model']}: mAP {m['test_map'] * 100:.2f}, mAP@0.5 {m['test_map50'] * 100:.2f} "
              f"({m.get('train_seconds')} s)", file=sys.stderr)
    if args.teachers_only:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".runs.jsonl")
    done = []
    if args.resume and log.exists():
        done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not args.resume:
        log.write_text("")
    have = {(r["seed"], r["strategy"]) for r in done}
    todo = {s: [label for label in labels if (s, label) not in have] for s in args.seeds}
    groups = plan_groups({s: todo[s] for s in args.seeds if todo[s]}, args.workers)
    tasks = [{"seed": s, "strategies": group, "base": base, "teachers": teacher_dirs, "threads": args.threads,
              "set": args.set, "log": str(log), "export_seeds": args.export_seeds,
              "output_dir": "runs/det-benchmark/seed{seed}/{label}"}
             for s, group in groups]
    records = [r for r in done if r["seed"] in args.seeds and r["strategy"] in labels]
    if args.workers > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(min(args.workers, len(tasks))) as workers:
            records += [r for chunk in workers.imap_unordered(run_group, tasks, chunksize=1) for r in chunk]
    else:
        records += [r for task in tasks for r in run_group(task)]
    order = {(s, label): i for i, (s, label) in enumerate((s, label) for s in args.seeds for label in labels)}
    records.sort(key=lambda r: order[(r["seed"], r["strategy"])])
    summary = summarise(records, labels)
    report = {
        "command": "python benchmarks/detection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": device_name(torch.device("cpu")), "threads_per_run": args.threads, "workers": args.workers,
        "torch": torch.__version__, "wall_s": round(time.perf_counter() - start, 1), "seeds": args.seeds,
        "strategies": labels,
        "teachers": [{"model": m["model"], "path": m["path"], "test_map": m["test_map"], "test_map50": m["test_map50"],
                      "train_seconds": m.get("train_seconds")} for m in metas],
        "teacher_training": {"data": data, "optim": teacher_optim},
        "student": base, "overrides": args.set, "summary": summary, "records": records,
    }
    out.write_text(json.dumps(report, indent=1))
    for m in metas:
        print(f"teacher {m['model']}: mAP {m['test_map'] * 100:.2f}, mAP@0.5 {m['test_map50'] * 100:.2f}")
    print(table(summary))
    print(f"[detection] wrote {out} ({report['wall_s']:.0f} s)", file=sys.stderr)
    return 0


def merge(paths: list[str], out: Path) -> int:
    """One report from several (the same teachers and student settings, other seeds or strategies):
    records joined (a later file's run replaces an earlier one of the same seed and strategy), summary
    recomputed; each part's command and wall time kept."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    report = dict(parts[0])
    runs = {(r["seed"], r["strategy"]): r for part in parts for r in part["records"]}
    report["strategies"] = labels = list(dict.fromkeys(s for part in parts for s in part["strategies"]))
    report["records"] = sorted(runs.values(), key=lambda r: (r["seed"], labels.index(r["strategy"])))
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
