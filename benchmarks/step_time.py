"""Step time of ``mtkd_rl`` against ``aver``, and of the Ray runtime against the in-process engine.

Every setting trains the same resnet8 student from the same teacher pool on the same batches
(Fashion-MNIST, the same seed), and is timed by the engine's own ``time/epoch_s`` of whole epochs
after a warm-up epoch (s/step = epoch time / steps, so the agent's end-of-epoch update is
included). The settings:

* in process (``Distiller.train_epoch``, the engine ``run_inprocess`` drives), ``aver`` and
  ``mtkd_rl``, with 1 torch thread and with torch's default thread count;
* Ray (``run_ray`` on a private local Ray started once for all runs), ``aver`` and ``mtkd_rl``,
  each with ``runtime.prefetch`` 0 and 1.

Ray workers (the learner and every teacher actor) run torch with one thread, so "Ray over
in-process at equal threads" compares each Ray setting with the 1-thread in-process engine of the
same strategy. The settings are interleaved: after each Ray run (a warm-up epoch and
``--timed-epochs`` timed ones, default 1), the in-process engines of the same strategy train one
more epoch each; there are ``--rounds`` rounds (default 3) over the Ray settings, in the reverse
order every other round, so that each Ray setting's median comes from 3 separate runs (a burst of
load from other users spoils one run, not the median). Reported: the median s/step of each
setting, every timed epoch, the ratios of the medians, and the wall time of every Ray run (its
fixed start-up and shut-down cost included).

Peak memory: each in-process strategy runs in its own subprocess (1 torch thread, the two at
once: memory, not time, is measured there); each reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at its end (the whole process: Python, torch, the
data, the teachers, the student, the agent and its buffer, the activations), its resident memory
after set-up, and the peak from the first training step on (VmHWM, reset through
``/proc/self/clear_refs`` after set-up): that peak minus the set-up memory is what training adds.

    .venv/bin/python benchmarks/step_time.py              # ~10 min on a quiet 2-core machine
    .venv/bin/python benchmarks/step_time.py --quick      # ~1 min, mostly 2 Ray runs' start-up (CI)
    .venv/bin/python benchmarks/step_time.py --teachers DIR DIR DIR --teacher-precision bf16
    .venv/bin/python benchmarks/step_time.py --rule reference   # mtkd_rl with the authors' agent rule

Without ``--teachers`` the benchmark writes untrained teachers (random weights, seeded) with
``mtkd.teachers.save_teacher``: resnet20, vgg8 and wrn_16_2, the demo's pool (``--quick``:
resnet8 and vgg8). Speed does not depend on the weights. Prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtkd.config import ExperimentConfig, TeacherSpec, load_config
from mtkd.data import train_test
from mtkd.distill import state_dim
from mtkd.engine import Distiller, agent_buffer_bytes
from mtkd.experiment import load_data, train_loader
from mtkd.models import create_model
from mtkd.runner import load_local_pool
from mtkd.teachers import save_teacher

# set before Ray starts: Ray Train polls its workers every 2 s by default, and a short epoch would wait for it
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEACHERS = ("resnet20", "vgg8", "wrn_16_2")
QUICK_TEACHERS = ("resnet8", "vgg8")
STRATEGIES = ("aver", "mtkd_rl")
MIB = 2**20


# ----------------------------------------------------------------------------- shared helpers
def random_teachers(folder: Path, models: tuple[str, ...] | list[str], seed: int = 0) -> list[str]:
    """Save untrained (seeded random weights) zoo ``models`` as Fashion-MNIST teacher checkpoints
    (10 classes, ``[1, 28, 28]`` inputs) under ``folder``; returns their folders."""
    train, _ = train_test("fashion_mnist")
    folders = []
    for index, model in enumerate(models):
        torch.manual_seed(seed + index)
        network = create_model(model, num_classes=train.num_classes, in_channels=train.image_shape[0])
        meta = {"model": model, "num_classes": train.num_classes, "in_channels": train.image_shape[0],
                "input_shape": list(train.image_shape),
                "dataset": {"name": train.name, "digest": train.digest, "mean": list(train.mean), "std": list(train.std)},
                "untrained": True}
        save_teacher(folder / model, network.eval(), meta)
        folders.append(str(folder / model))
    return folders


def experiment(output_dir: Path | str, teachers: list[str], overrides: list[str]) -> ExperimentConfig:
    """A config of ``overrides`` with ``teachers`` (checkpoint folders) as the pool."""
    config = load_config(ExperimentConfig, None, [f"output_dir={output_dir}", *overrides])
    config.teachers = [TeacherSpec(checkpoint=t) for t in teachers]
    return config


def common_overrides(args, epochs: int) -> list[str]:
    """What every setting shares: student, data, optimiser, agent, precision."""
    return [f"student={args.student}", f"data.batch_size={args.batch_size}",
            f"data.train_subset={args.batch_size * args.steps}", f"data.test_subset={args.batch_size}",
            "data.crop_padding=2", f"optim.epochs={epochs}", "optim.milestones=[]", "distill.warmup_epochs=1",
            "agent.agent_step=1000", f"agent.rule={args.rule}", "runtime.device=cpu",
            f"runtime.teacher_precision={args.teacher_precision}", "runtime.address=local"]


def seconds_per_step(metrics: dict, steps: int) -> float:
    """s/step of one epoch's metrics (the engine's ``time/epoch_s`` over its steps)."""
    return metrics["time/epoch_s"] / steps


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    return round(a / b, 4)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def print_report(report: dict, began: float, load_before: float) -> int:
    """Add the wall time since ``began`` and the 1-minute load average before and now to ``report``,
    print it as one JSON object; returns the exit code (0)."""
    report["wall_s"] = round(time.perf_counter() - began, 1)
    report["load_average_1min_before_after"] = [load_before, load_average()]
    print(json.dumps(report, indent=2))
    return 0


def teacher_models(folders: list[str]) -> list[str]:
    return [json.loads((Path(f) / "meta.json").read_text())["model"] for f in folders]


class InProcessSetting:
    """One in-process engine (its own student, optimiser and agent; a pool shared with the others)
    whose epochs are run one at a time under a given torch thread count."""

    def __init__(self, config: ExperimentConfig, pool, threads: int):
        self.threads = threads
        train_set, _ = load_data(config.data, config.seed)
        torch.manual_seed(config.seed)
        self.distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape)
        self.loader = train_loader(train_set, config.data, config.seed)
        self.num_classes = train_set.num_classes
        self.times: list[float] = []

    def epoch(self, record: bool = True) -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            metrics = self.distiller.train_epoch(self.loader)
        finally:
            torch.set_num_threads(before)
        if record:
            self.times.append(seconds_per_step(metrics, len(self.loader)))
        return metrics


# ----------------------------------------------------------------------------- peak memory
def rss_mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process from ``/proc/self/status``, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args) -> None:
    """In a fresh process: set up one in-process strategy (1 torch thread: the two children run at
    once), train a warm-up epoch and a timed one, print the memory figures as JSON."""
    torch.set_num_threads(1)
    # batches of a whole Fashion-MNIST epoch, read before set-up (the full split is loaded anyway there)
    full_epoch = len(train_test("fashion_mnist")[0]) // args.batch_size
    config = experiment(Path(tempfile.gettempdir()) / "unused", args.teacher_dirs, [*common_overrides(args, 2),
                        "runtime.runtime=inprocess", f"distill.strategy={args.memory_child}"])
    pool = load_local_pool(config)
    setting = InProcessSetting(config, pool, 1)
    after_setup = rss_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: from here on it is training's peak
        reset = True
    except OSError:
        reset = False
    setting.epoch(record=False)  # warm-up (mtkd_rl: the agent's warm-up epoch)
    setting.epoch()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    training_peak = rss_mib("VmHWM") if reset else None
    width = state_dim([int(d["embedding_dim"]) for d in setting.distiller.descriptions], setting.num_classes)
    buffer = agent_buffer_bytes(config, width, len(config.teachers), len(setting.loader))
    buffer_full = agent_buffer_bytes(config, width, len(config.teachers), full_epoch)
    report = {
        "strategy": args.memory_child,
        "ru_maxrss_mib": round(ru_maxrss / 1024, 1),
        "rss_after_setup_mib": round(after_setup, 1),
        "training_peak_rss_mib": None if training_peak is None else round(training_peak, 1),
        "training_increment_mib": None if training_peak is None else round(training_peak - after_setup, 1),
        "agent_buffer_bound_mib": round(buffer / MIB, 2) if args.memory_child == "mtkd_rl" else 0.0,
        "agent_buffer_bound_full_epoch_mib": round(buffer_full / MIB, 2) if args.memory_child == "mtkd_rl" else 0.0,
        "full_epoch_steps": full_epoch,
        "seconds_per_step": round(setting.times[-1], 5),
    }
    print(json.dumps(report))


def start_memory_children(args, teacher_dirs: list[str]) -> dict[str, subprocess.Popen]:
    """One memory child per strategy, both at once (memory, not time, is measured there)."""
    children = {}
    for strategy in STRATEGIES:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", strategy,
                   "--teachers", *teacher_dirs, "--student", args.student, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--teacher-precision", args.teacher_precision, "--rule", args.rule]
        children[strategy] = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True)
    return children


def collect_memory_children(children: dict[str, subprocess.Popen]) -> dict[str, dict]:
    reports = {}
    for strategy, child in children.items():
        try:
            out, err = child.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"memory child ({strategy}) failed:\n{err[-3000:]}")
        reports[strategy] = json.loads(out.strip().splitlines()[-1])
    return reports


# ----------------------------------------------------------------------------- the benchmark
def run(args, teacher_dirs: list[str], tmp: Path) -> dict:
    default_threads = torch.get_num_threads()
    base = [*common_overrides(args, 1 + args.timed_epochs)]
    # memory first, while this process is small (a child started from a large process may inherit
    # its parent's peak in ru_maxrss); --quick lets the children run beside the timed settings
    children = start_memory_children(args, teacher_dirs)
    try:
        memory = None if args.quick else collect_memory_children(children)
        times, ray_wall = time_settings(args, teacher_dirs, tmp, base, default_threads)
        memory = memory or collect_memory_children(children)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    return summary(times, ray_wall, memory, default_threads)


def time_settings(args, teacher_dirs: list[str], tmp: Path, base: list[str], default_threads: int):
    """s/step of every timed epoch of every setting, and the wall time of every Ray run."""
    import ray

    from services.learner.driver import ensure_ray, run_ray

    # in-process engines, one per (threads, strategy), all on one pool (the same teacher objects)
    inproc_config = experiment(tmp / "inprocess", teacher_dirs, [*base, "runtime.runtime=inprocess"])
    pool = load_local_pool(inproc_config)
    thread_counts = {"1thread": 1, "defaultthreads": default_threads}
    inproc: dict[str, InProcessSetting] = {}
    for label, threads in thread_counts.items():
        for strategy in STRATEGIES:
            config = experiment(tmp / "inprocess", teacher_dirs, [*base, "runtime.runtime=inprocess",
                                                                  f"distill.strategy={strategy}"])
            inproc[f"inprocess_{label}_{strategy}"] = InProcessSetting(config, pool, threads)
    for setting in inproc.values():
        setting.epoch(record=False)  # warm-up epoch (mtkd_rl: the agent's warm-up)

    prefetches = (1,) if args.quick else (0, 1)  # --quick: the default prefetch only (two Ray runs, not four)
    ray_settings = [(f"ray_prefetch{p}_{s}", s, p) for p in prefetches for s in STRATEGIES]
    ray_times: dict[str, list[float]] = {label: [] for label, _, _ in ray_settings}
    ray_wall: dict[str, list[float]] = {label: [] for label, _, _ in ray_settings}
    started = ensure_ray(experiment(tmp / "probe", teacher_dirs, [*base, "runtime.runtime=ray"]))
    try:
        for round_index in range(args.rounds):
            order = ray_settings if round_index % 2 == 0 else ray_settings[::-1]
            for label, strategy, prefetch in order:
                config = experiment(tmp / f"{label}-{round_index}", teacher_dirs,
                                    [*base, "runtime.runtime=ray", f"distill.strategy={strategy}",
                                     f"runtime.prefetch={prefetch}"])
                began = time.perf_counter()
                history = run_ray(config, progress=False)["history"]
                ray_wall[label].append(time.perf_counter() - began)
                steps = history[0]["step"]
                ray_times[label] += [seconds_per_step(m, steps) for m in history[1:]]
                # the in-process engines of this strategy train one epoch right after (side by side)
                for threads_label in (thread_counts if round_index % 2 == 0 else list(thread_counts)[::-1]):
                    inproc[f"inprocess_{threads_label}_{strategy}"].epoch()
    finally:
        if started:
            ray.shutdown()

    return {label: s.times for label, s in inproc.items()} | ray_times, ray_wall


def summary(times: dict[str, list[float]], ray_wall: dict[str, list[float]], memory: dict[str, dict],
            default_threads: int) -> dict:
    """Medians, ratios and the memory figures."""
    report: dict = {}
    med = {label: median(values) for label, values in times.items()}
    ratios: dict[str, float] = {}
    prefetches = [p for p in (0, 1) if f"ray_prefetch{p}_aver" in med]  # --quick: 1 only
    for prefix in ("inprocess_1thread", "inprocess_defaultthreads", *(f"ray_prefetch{p}" for p in prefetches)):
        ratios[f"{prefix}:mtkd_rl/aver"] = ratio(med[f"{prefix}_mtkd_rl"], med[f"{prefix}_aver"])
    for prefetch in prefetches:
        for strategy in STRATEGIES:
            ratios[f"ray_prefetch{prefetch}/inprocess_1thread:{strategy}"] = ratio(
                med[f"ray_prefetch{prefetch}_{strategy}"], med[f"inprocess_1thread_{strategy}"])
    for strategy in STRATEGIES:
        ratios[f"inprocess_defaultthreads/inprocess_1thread:{strategy}"] = ratio(
            med[f"inprocess_defaultthreads_{strategy}"], med[f"inprocess_1thread_{strategy}"])

    aver, rl = memory["aver"], memory["mtkd_rl"]
    memory_report = {
        "what": "each in-process strategy in its own subprocess (1 torch thread; the two at once), a warm-up and a "
                "timed epoch; "
                "ru_maxrss: the whole process over its life (Python, torch, data, teachers, student, agent and its "
                "buffer, activations); training_peak_rss: the peak from the first step on (VmHWM reset after "
                "set-up); training_increment: that peak minus the resident memory after set-up; "
                "agent_buffer_bound: what the agent's buffer can hold at this epoch length (it holds min(agent_step, "
                "steps per epoch) batches of states); agent_buffer_bound_full_epoch: the same for a whole "
                "Fashion-MNIST epoch (full_epoch_steps), which this benchmark's short epochs do not reach",
        "aver": aver, "mtkd_rl": rl,
        "ratio_ru_maxrss:mtkd_rl/aver": ratio(rl["ru_maxrss_mib"], aver["ru_maxrss_mib"]),
    }
    if aver["training_increment_mib"] and rl["training_increment_mib"] and aver["training_increment_mib"] > 0:
        memory_report["ratio_training_peak_rss:mtkd_rl/aver"] = ratio(rl["training_peak_rss_mib"],
                                                                      aver["training_peak_rss_mib"])
        memory_report["ratio_training_increment:mtkd_rl/aver"] = ratio(rl["training_increment_mib"],
                                                                       aver["training_increment_mib"])
    report.update({
        "seconds_per_step": {label: round(value, 5) for label, value in med.items()},
        "ratios": ratios,
        "goals": {"mtkd_rl/aver (time, memory)": 1.05, "ray/inprocess_1thread": 1.10},
        "timed_epochs_seconds_per_step": {label: [round(v, 5) for v in values] for label, values in times.items()},
        "ray_run_wall_s": {label: [round(v, 1) for v in values] for label, values in ray_wall.items()},
        "peak_memory": memory_report,
        "default_torch_threads": default_threads,
    })
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", dest="teacher_dirs",
                        help="teacher checkpoint folders (default: untrained resnet20, vgg8, wrn_16_2)")
    parser.add_argument("--teacher-precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                        help="runtime.teacher_precision (default: fp32)")
    parser.add_argument("--rule", default="meta", choices=("reference", "reinforce", "meta"),
                        help="mtkd_rl's agent.rule (default: meta)")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25, help="steps per epoch (default: 25)")
    parser.add_argument("--timed-epochs", type=int, default=1,
                        help="timed epochs per Ray run, after its warm-up one (default: 1)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the Ray settings, the order reversed every other round (default: 3)")
    parser.add_argument("--quick", action="store_true",
                        help="resnet8 + vgg8 teachers, batch 16, 4 steps, 1 round of 1 timed epoch, the memory "
                             "children beside the timed runs (CI: its numbers check the plumbing, not the speed)")
    parser.add_argument("--memory-child", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    if args.quick:
        args.batch_size, args.steps, args.timed_epochs, args.rounds = 16, 4, 1, 1
    load_before = load_average()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtkd-step-time-") as tmp:
        tmp = Path(tmp)
        teacher_dirs = args.teacher_dirs or random_teachers(tmp / "teachers", QUICK_TEACHERS if args.quick
                                                            else DEFAULT_TEACHERS)
        report = {
            "benchmark": "step_time", "quick": args.quick, "cpu_cores": os.cpu_count(),
            "student": args.student, "agent_rule": args.rule, "teachers": teacher_models(teacher_dirs),
            "teacher_weights": "given checkpoints" if args.teacher_dirs else "untrained (seeded random weights)",
            "teacher_precision": args.teacher_precision, "batch_size": args.batch_size, "steps_per_epoch": args.steps,
            "data": "Fashion-MNIST train subset, augmented, seed 0",
            "ray_runs": f"{args.rounds} round(s) x {2 if args.quick else 4} settings, each 1 warm-up + "
                        f"{args.timed_epochs} timed epoch(s)",
            "equal_threads": "Ray workers run torch with 1 thread: compare Ray with inprocess_1thread",
        }
        report.update(run(args, teacher_dirs, tmp))
    return print_report(report, began, load_before)


if __name__ == "__main__":
    sys.exit(main())
