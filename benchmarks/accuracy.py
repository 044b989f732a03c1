"""Accuracy of every teacher-weighting strategy over several seeds, on Fashion-MNIST.

The teachers and the student's experiment are the demo's (``configs/demo.yaml``: teachers trained on
the whole training set, the student on a small labelled subset); the teachers are trained once and
cached, as by ``mtkd demo``. Each (strategy, seed) run is the in-process engine; runs with the same
seed see the same batches, so the teachers' outputs are computed once per seed and then read from a
private Redis (a cache that gives the same numbers as no cache).

Prints one JSON object (per strategy: final and best test accuracy of every seed, their mean and
std) and a table, and draws ``<output_dir>/accuracy.png``.

    .venv/bin/python benchmarks/accuracy.py                       # 7 strategies x 3 seeds
    .venv/bin/python benchmarks/accuracy.py --seeds 0 1 --extra "mtkd_rl lr 1:agent.lr=1.0"
    .venv/bin/python benchmarks/accuracy.py --quick               # seconds: a check that it runs (CI)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from mtkd.config import ExperimentConfig, TeacherSpec, apply_overrides, from_dict, to_dict  # noqa: E402
from mtkd.runner import run_inprocess  # noqa: E402
from services.cache import open_store  # noqa: E402
from services.demo import DemoConfig, cached_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ce": ["distill.strategy=ce"],
    "aver": ["distill.strategy=aver"],
    "ebkd": ["distill.strategy=ebkd"],
    "camkd": ["distill.strategy=camkd"],
    "mtkd_rl": ["distill.strategy=mtkd_rl", "agent.rule=reference", "agent.mixing=static"],
    "mtkd_rl dynamic": ["distill.strategy=mtkd_rl", "agent.rule=reference", "agent.mixing=dynamic"],
    "mtkd_rl reinforce": ["distill.strategy=mtkd_rl", "agent.rule=reinforce", "agent.mixing=static"],
}
QUICK = ["data.train_subset=256", "data.test_subset=500", "optim.epochs=2", "optim.milestones=[1]"]
QUICK_TEACHER = ["data.train_subset=512", "data.test_subset=500", "optim.epochs=1"]


def parse_extra(items: list[str]) -> dict[str, list[str]]:
    """``"label:key=value,key=value"`` -> ``{label: [overrides]}`` (variants to investigate)."""
    extra = {}
    for item in items:
        label, _, overrides = item.partition(":")
        if not overrides:
            raise SystemExit(f"--extra {item!r}: expected 'label:key=value[,key=value...]'")
        extra[label.strip()] = [o.strip() for o in overrides.split(",")]
    return extra


def summarise(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="the demo config to use")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--extra", nargs="*", default=[], help="more variants: 'label:key=value,key=value'")
    parser.add_argument("--output-dir", default="runs/accuracy")
    parser.add_argument("--quick", action="store_true", help="tiny runs (a check that the benchmark works)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the demo config")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.config).read_text())
    demo = from_dict(DemoConfig, apply_overrides(raw, [*args.overrides, *(
        [f"teacher.{o}" for o in QUICK_TEACHER] + [f"student.{o}" for o in QUICK] if args.quick else [])]))
    out = Path(args.output_dir)
    start = time.perf_counter()
    teachers = [cached_teacher(_with_model(demo.teacher, m), Path(demo.cache_dir)) for m in demo.teacher_models]
    variants = {name: STRATEGIES[name] for name in args.strategies} | parse_extra(args.extra)
    results: dict[str, dict] = {}
    with open_store("local", demo.student.cache.max_memory_mb) as store:
        for seed in args.seeds:
            for label, overrides in variants.items():
                config = from_dict(ExperimentConfig, apply_overrides(_plain(demo.student), [*overrides, f"seed={seed}"]))
                config.teachers = [TeacherSpec(checkpoint=t["path"]) for t in teachers]
                config.runtime.runtime = "inprocess"
                config.cache.url = store.url
                config.output_dir = str(out / label.replace(" ", "_") / f"seed{seed}")
                print(f"[accuracy] {label}, seed {seed}", file=sys.stderr, flush=True)
                history = run_inprocess(config, progress=False, overwrite=True, store=store)["history"]
                entry = results.setdefault(label, {"final": [], "best": [], "hit_rate": []})
                entry["final"].append(history[-1]["test/acc"])
                entry["best"].append(max(m["test/acc"] for m in history))
                entry["hit_rate"].append(statistics.fmean(m.get("cache/hit_rate", 0.0) for m in history))
    report = {
        "config": args.config, "seeds": args.seeds, "quick": args.quick, "torch_threads": torch.get_num_threads(),
        "teachers": {t["model"]: t["test_accuracy"] for t in teachers},
        "student": demo.student.student, "train_subset": demo.student.data.train_subset,
        "epochs": demo.student.optim.epochs, "teacher_precision": demo.student.runtime.teacher_precision,
        "strategies": {label: {"final": summarise(e["final"]), "best": summarise(e["best"]),
                               "cache_hit_rate": statistics.fmean(e["hit_rate"])} for label, e in results.items()},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    draw(report, out / "accuracy.png")
    print(json.dumps(report, indent=2))
    print(table(report), file=sys.stderr)


def _plain(config) -> dict:
    return json.loads(json.dumps(to_dict(config)))


def _with_model(cfg, model: str):
    cfg = copy.deepcopy(cfg)
    cfg.model = model
    return cfg


def table(report: dict) -> str:
    lines = [f"{'strategy':<20}{'final acc (mean ± std)':>24}{'best acc (mean ± std)':>24}", "-" * 68]
    for label, entry in report["strategies"].items():
        f, b = entry["final"], entry["best"]
        lines.append(f"{label:<20}{f['mean'] * 100:>15.2f} ± {f['std'] * 100:<5.2f}{b['mean'] * 100:>16.2f} ± "
                     f"{b['std'] * 100:.2f}")
    return "\n".join(lines)


def draw(report: dict, path: Path) -> None:
    """Bars of the final test accuracy per strategy (mean ± std over seeds), seeds as dots."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = list(report["strategies"])
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 4))
    for i, label in enumerate(labels):
        final = report["strategies"][label]["final"]
        ax.bar(i, final["mean"] * 100, yerr=final["std"] * 100, capsize=4, color="tab:blue" if "mtkd_rl" in label
               else "tab:gray", alpha=0.8)
        ax.plot([i] * len(final["values"]), [v * 100 for v in final["values"]], "k.", ms=5)
    low = min(v for e in report["strategies"].values() for v in e["final"]["values"]) * 100
    ax.set_ylim(low - 2, None)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel="final test top-1 (%)", title=f"{report['student']} on Fashion-MNIST, {len(report['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
