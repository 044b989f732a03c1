"""Throughput of one distillation step (teachers + student + agent) on a GPU or a CPU, per strategy,
precision and memory layout, with synthetic CIFAR-shaped batches.

Self-contained: PyTorch and mtkd only (no Ray, no dataset, no checkpoint files). The workload is the
paper's CIFAR-100 recipe: 100 classes, 3x32x32 images, four randomly initialised teachers
(regnety_400mf, regnetx_400mf, resnet32x4, wrn_28_4) and a resnet56 student. Each step is what the
in-process engine does per batch: ``Distiller.batches_with_teachers`` (every teacher's forward, the
outputs made float32 on the device) and ``Distiller.step`` (student forward/backward, projectors,
losses, agent state and action for ``mtkd_rl``, SGD).

A setting is (strategy, teacher precision, student precision, channels_last):

* ``--precisions fp32,bf16``: ``X`` means teachers and student in X; ``X/Y`` teachers in X and the
  student in Y (the student has fp32 and bf16; ``fp16`` is for teachers only, its default student is bf16).
* ``--channels-last on,off``: ``on``/``off`` force the layout of teachers, student and input batches;
  ``auto`` is the engine's own rule (channels_last exactly where the precision is reduced).
* ``--compile-teachers off|on|both``: teachers under ``torch.compile`` (its time is in ``warmup_s``).

Every setting runs ``--warmup`` untimed steps (oneDNN primitives, cuDNN autotuning, lazy init), then
``--steps`` timed ones per round. On CPU the settings are interleaved over ``--rounds`` rounds (so that
other load on the machine hits them all alike); on CUDA they run one after another and each is freed
before the next. images/s = timed samples / timed seconds; on CUDA the device is synchronised before
every clock read. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (stats
reset after the warm-up; it includes the resident weights and optimiser state); on CPU the peak growth
of the process's resident set over the timed steps (``VmHWM`` after returning freed heap memory to the
OS and resetting the kernel's high-water mark, minus ``VmRSS`` before): the step's transient memory,
approximately. ``speedup`` is the ratio of images/s to the fp32 setting (fp32 teachers and student,
contiguous layout: the reference code's configuration) of the same strategy.

Prints a table on stderr and one JSON object on stdout (also written to ``--json PATH``).

    .venv/bin/python benchmarks/gpu.py                      # the full run (CUDA when available)
    .venv/bin/python benchmarks/gpu.py --quick              # CI: CPU, tiny, seconds
    .venv/bin/python benchmarks/gpu.py --device cpu --batch-size 64 --strategies mtkd_rl \\
        --precisions fp32,bf16/fp32 --channels-last auto --rounds 7 --steps 1

Budget (the full CUDA run must end within 4 minutes on one GPU; not yet run on one): 16 settings (ce has
no teachers, so 4; aver and mtkd_rl 6 each: fp32, bf16, fp16 teachers with a bf16 student, x 2 layouts),
batch 128, 5 warm-up + 30 timed steps each. An mtkd_rl step is about 2,000 eager ops (the four teachers
~420 with batch-norm folded, the student step ~1,550; counted with torch.profiler on CPU), so at roughly
10-20 us of launch per op it takes tens of ms: a few seconds per setting with its build, one to two
minutes in all (an estimate). Whatever the GPU does, ``--budget-s`` (default 200 s on CUDA) skips,
and reports, every setting not started by then, so the run ends at about 200 s plus one setting.

On CPU, ``--threads 1`` measures robustly on a busy machine: an OpenMP region waits for its slowest
thread, so with other processes on the cores two threads can be many times slower than one.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from mtkd.config import ExperimentConfig, load_config
from mtkd.data.loader import Batch
from mtkd.devices import device_name, resolve_device
from mtkd.engine import Distiller
from mtkd.models import create_model
from mtkd.teachers import LocalTeacherPool, Teacher

TEACHERS = ("regnety_400mf", "regnetx_400mf", "resnet32x4", "wrn_28_4")
QUICK_TEACHERS = ("regnety_400mf", "resnet32x4")
STUDENT = "resnet56"
NUM_CLASSES = 100
INPUT_SHAPE = (3, 32, 32)
STUDENT_PRECISIONS = ("fp32", "bf16")
DISTINCT_BATCHES = 4  # synthetic batches cycled through (different data each step, no generation cost)


# ----------------------------------------------------------------------------------- settings
@dataclass
class Setting:
    strategy: str
    teacher_precision: str
    student_precision: str
    channels_last: str  # on | off | auto
    compiled: bool = False  # teachers under torch.compile

    @property
    def label(self) -> str:
        precision = self.teacher_precision if self.teacher_precision == self.student_precision else \
            f"{self.teacher_precision}/{self.student_precision}"
        return f"{self.strategy} {precision} cl={self.channels_last}{' compiled' if self.compiled else ''}"

    @property
    def is_reference(self) -> bool:
        return (self.teacher_precision, self.student_precision) == ("fp32", "fp32") and \
            self.channels_last in ("off", "auto") and not self.compiled


def parse_precision(item: str) -> tuple[str, str]:
    teacher, _, student = item.partition("/")
    if not student:
        student = teacher if teacher in STUDENT_PRECISIONS else "bf16"
    if teacher not in ("fp32", "bf16", "fp16") or student not in STUDENT_PRECISIONS:
        raise SystemExit(f"gpu.py: bad precision {item!r}: teachers fp32|bf16|fp16, student fp32|bf16 (e.g. bf16/fp32)")
    return teacher, student


def settings_of(args) -> list[Setting]:
    out = []
    for strategy in args.strategies:
        for item in args.precisions:
            teacher, student = parse_precision(item)
            for layout in args.channels_last:
                if layout not in ("on", "off", "auto"):
                    raise SystemExit(f"gpu.py: --channels-last takes on, off, auto; got {layout!r}")
                for compiled in args.compile_teachers:
                    if strategy == "ce":  # ce runs no teacher: one setting per student precision
                        setting = Setting(strategy, student, student, layout)
                    else:
                        setting = Setting(strategy, teacher, student, layout, compiled)
                    if setting not in out:
                        out.append(setting)
    return out


# ---------------------------------------------------------------------------------- building
def master_teachers(names) -> list[tuple[str, torch.nn.Module]]:
    """Randomly initialised teachers in eval mode with non-trivial batch-norm statistics (seeded)."""
    models = []
    for index, name in enumerate(names):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + index)
            model = create_model(name, num_classes=NUM_CLASSES, in_channels=INPUT_SHAPE[0]).eval()
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 2.0)
        models.append((name, model))
    return models


def teacher_pool(masters, setting: Setting, device: torch.device) -> LocalTeacherPool:
    if setting.strategy == "ce":
        return LocalTeacherPool([])  # ce runs no teacher; none resident either
    layout = {"on": True, "off": False, "auto": None}[setting.channels_last]
    teachers = []
    for name, model in masters:
        meta = {"model": name, "num_classes": NUM_CLASSES, "input_shape": list(INPUT_SHAPE),
                "weights_digest": f"random-{name}"}
        teachers.append(Teacher(copy.deepcopy(model), meta, device=device, precision=setting.teacher_precision,
                                channels_last=layout, compile=setting.compiled))
    return LocalTeacherPool(teachers)


def build_distiller(setting: Setting, pool, device: torch.device, batch_size: int) -> Distiller:
    config = load_config(ExperimentConfig, None, [
        f"student={STUDENT}", f"distill.strategy={setting.strategy}", "distill.warmup_epochs=0",
        "runtime.runtime=inprocess", f"runtime.device={device}", "runtime.prefetch=0", f"data.batch_size={batch_size}",
        f"runtime.student_precision={setting.student_precision}", f"runtime.teacher_precision={setting.teacher_precision}",
    ])
    distiller = Distiller(config, pool, NUM_CLASSES, INPUT_SHAPE, device=device)
    if setting.channels_last != "auto":
        # The engine lays the student out by its precision; a forced layout is applied here (the
        # optimiser keeps the same Parameter objects: .to() replaces their data in place).
        layout = torch.channels_last if setting.channels_last == "on" else torch.contiguous_format
        distiller.module.to(memory_format=layout)
    return distiller


def synthetic_batches(batch_size: int, device: torch.device, channels_last: bool) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(DISTINCT_BATCHES):
        images = torch.randn(batch_size, *INPUT_SHAPE, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        images = images.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        batches.append(Batch(index, images, labels.to(device), None, None))
    return batches


@dataclass
class Run:
    setting: Setting
    distiller: Distiller
    batches: list[Batch]
    position: int = 0
    seconds: list[float] = field(default_factory=list)  # per timed block
    samples: int = 0
    memory: list[float] = field(default_factory=list)  # MB per timed block
    phases: dict[str, float] = field(default_factory=dict)  # CPU: seconds in teachers / student step
    resident_mb: float | None = None
    build_s: float = 0.0  # teachers (folding, layout, first eager forward) and the distiller
    warmup_s: float = 0.0  # the untimed steps (a compile included)

    def chunk(self, count: int) -> list[Batch]:
        chunk = [self.batches[(self.position + i) % len(self.batches)] for i in range(count)]
        self.position += count
        return chunk

    def steps(self, count: int, phases: dict[str, float] | None = None) -> None:
        """``count`` engine steps over the next synthetic batches: the teachers (``batches_with_teachers``
        yields a batch with its float32 teacher outputs), then ``Distiller.step``. With ``phases``
        (CPU only: CUDA work is asynchronous), adds the seconds spent in each."""
        pairs = iter(self.distiller.batches_with_teachers(self.chunk(count)))
        while True:
            start = time.perf_counter()
            pair = next(pairs, None)
            if pair is None:
                return
            taught = time.perf_counter()
            self.distiller.step(pair[0].images, pair[0].labels, pair[1])
            if phases is not None:
                phases["teachers"] = phases.get("teachers", 0.0) + taught - start
                phases["student_step"] = phases.get("student_step", 0.0) + time.perf_counter() - taught


# --------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


HWM_RESETS = True  # False once /proc/self/clear_refs refused a reset


class RssPeak:
    """Peak resident-set growth (bytes) of this process over a block: freed heap memory is returned to
    the OS (``malloc_trim``) and the kernel's high-water mark reset (``/proc/self/clear_refs`` 5) before
    it, and ``VmHWM`` read after it. No sampling thread (one would preempt the OpenMP workers)."""

    def __enter__(self):
        global HWM_RESETS
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # no reset: the growth is that of the process's lifetime peak
            HWM_RESETS = False
        self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        self.growth = max(0, _status_kib("VmHWM") * 1024 - self.start)


def timed_block(run: Run, steps: int, device: torch.device, batch_size: int) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        run.resident_mb = torch.cuda.memory_allocated(device) / 2**20
        start = time.perf_counter()
        run.steps(steps)
        sync(device)
        run.seconds.append(time.perf_counter() - start)
        run.memory.append(torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        with RssPeak() as rss:
            start = time.perf_counter()
            run.steps(steps, run.phases)
            run.seconds.append(time.perf_counter() - start)
        run.memory.append(rss.growth / 2**20)
    run.samples += steps * batch_size


def profile_step(run: Run, device: torch.device, rows: int) -> dict[str, str]:
    """The top operations by self CPU time (self CUDA time on a GPU) of one step, in two tables: the
    teachers (their forwards and the outputs made float32) and the student step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    pairs = iter(run.distiller.batches_with_teachers(run.chunk(1)))
    with profile(activities=activities) as teachers:
        batch, outputs = next(pairs)
        sync(device)
    with profile(activities=activities) as student:
        run.distiller.step(batch.images, batch.labels, outputs)
        sync(device)
    next(pairs, None)
    return {name: prof.key_averages().table(sort_by=key, row_limit=rows)
            for name, prof in (("teachers", teachers), ("student_step", student))}


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (--quick: 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting and round "
                        "(default: 30 on CUDA, 3 on CPU, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per setting (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 1 on CUDA, 3 on CPU, 1 with --quick)")
    parser.add_argument("--strategies", default="ce,aver,mtkd_rl", help="comma-separated (default ce,aver,mtkd_rl)")
    parser.add_argument("--precisions", default=None, help="comma-separated: X (teachers and student) or X/Y "
                        "(teachers/student); default fp32,bf16 plus fp16/bf16 on CUDA")
    parser.add_argument("--channels-last", default="on,off", help="comma-separated on|off|auto (default on,off)")
    parser.add_argument("--teachers", default=None, help=f"comma-separated zoo names (default {','.join(TEACHERS)})")
    parser.add_argument("--compile-teachers", default="off", help="off | on | both: teachers under torch.compile "
                        "(compile time counts as warm-up; default off)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 with --quick)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip settings not started by then "
                        "(default 200 on CUDA, none on CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="print the top ROWS operations of one profiled step per setting on stderr")
    parser.add_argument("--quick", action="store_true", help="CI mode: CPU, batch 8, 2 teachers, a few settings")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the JSON object to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
        # batch 8 gains little from threads, and one thread is not stalled by a busy machine (an
        # OpenMP region waits for its slowest thread: with other processes on the cores, 2 threads
        # can be many times slower than 1)
        args.threads = args.threads or 1
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = device
    args.batch_size = args.batch_size or (8 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.rounds = args.rounds or (1 if args.quick or cuda else 3)
    args.strategies = [s for s in args.strategies.split(",") if s]
    default_precisions = "fp32,bf16,fp16/bf16" if cuda else "fp32,bf16"
    args.precisions = [p for p in (args.precisions or default_precisions).split(",") if p]
    args.channels_last = [c for c in args.channels_last.split(",") if c]
    choices = {"off": [False], "on": [True], "both": [False, True]}
    if args.compile_teachers not in choices:
        raise SystemExit(f"gpu.py: --compile-teachers takes off, on or both; got {args.compile_teachers!r}")
    args.compile_teachers = choices[args.compile_teachers]
    if args.quick and args.channels_last == ["on", "off"]:
        args.channels_last = ["auto"]
    args.teachers = tuple(args.teachers.split(",")) if args.teachers else (QUICK_TEACHERS if args.quick else TEACHERS)
    args.budget_s = args.budget_s if args.budget_s is not None else (200.0 if cuda else None)
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"gpu.py: --{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    device: torch.device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = settings_of(args)
    masters = master_teachers(args.teachers)
    interleaved = args.rounds > 1
    runs: list[Run] = []
    skipped: list[str] = []

    def start(setting: Setting) -> Run:
        building = time.perf_counter()
        pool = teacher_pool(masters, setting, device)
        channels_last = setting.channels_last == "on" or (
            setting.channels_last == "auto" and setting.student_precision != "fp32")
        run = Run(setting, build_distiller(setting, pool, device, args.batch_size),
                  synthetic_batches(args.batch_size, device, channels_last))
        sync(device)
        built = time.perf_counter()
        run.build_s = built - building
        run.steps(args.warmup)
        sync(device)
        run.warmup_s = time.perf_counter() - built
        if args.profile:
            for phase, table in profile_step(run, device, args.profile).items():
                print(f"\n== profile: {setting.label}: {phase}\n{table}", file=sys.stderr)
        return run

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - began > args.budget_s

    if interleaved:  # all settings resident, timed in rounds
        for setting in settings:
            runs.append(start(setting))
        for _ in range(args.rounds):
            for run in runs:
                timed_block(run, args.steps, device, args.batch_size)
    else:  # one after another, each freed before the next
        for setting in settings:
            if over_budget():
                skipped.append(setting.label)
                continue
            run = start(setting)
            timed_block(run, args.steps, device, args.batch_size)
            run.distiller = run.batches = None  # free the models before the next setting
            runs.append(run)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    reference = {}
    for run in sorted((r for r in runs if r.setting.is_reference), key=lambda r: r.setting.channels_last != "off"):
        reference.setdefault(run.setting.strategy, run)  # "off" before "auto" (both are the reference layout)
    results = []
    for run in runs:
        images_per_s = run.samples / sum(run.seconds)
        base = reference.get(run.setting.strategy)
        results.append({
            "strategy": run.setting.strategy, "teacher_precision": run.setting.teacher_precision,
            "student_precision": run.setting.student_precision, "channels_last": run.setting.channels_last,
            "compiled_teachers": run.setting.compiled,
            "images_per_s": round(images_per_s, 2),
            "s_per_step_median": round(statistics.median(s / args.steps for s in run.seconds), 4),
            "s_per_step_rounds": [round(s / args.steps, 4) for s in run.seconds],
            "peak_memory_mb": round(max(run.memory), 1),
            **({"resident_memory_mb": round(run.resident_mb, 1)} if run.resident_mb is not None else {}),
            "build_s": round(run.build_s, 2), "warmup_s": round(run.warmup_s, 2),
            **({"phase_s_per_step": {k: round(v / (args.rounds * args.steps), 4) for k, v in run.phases.items()}}
               if run.phases else {}),
            "speedup": round(images_per_s / (base.samples / sum(base.seconds)), 3) if base is not None else None,
            "speedup_median": round(statistics.median(b / r for b, r in zip(base.seconds, run.seconds)), 3)
            if base is not None else None,
        })
    report = {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        **({"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32} if device.type == "cuda" else {}),
        "batch_size": args.batch_size, "num_classes": NUM_CLASSES, "input_shape": list(INPUT_SHAPE),
        "teachers": list(args.teachers), "student": STUDENT, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "rounds": args.rounds, "interleaved": interleaved,
        "quick": args.quick,
        "peak_memory": ("torch.cuda.max_memory_allocated over the timed steps (MB)" if device.type == "cuda" else
                        "peak growth of the process's resident set over the timed steps (MB; VmHWM after a "
                        "reset, over VmRSS before)" if HWM_RESETS else
                        "peak growth of the process's resident set over the timed steps (MB; VmHWM could not be "
                        "reset here: growth of the lifetime peak, a lower bound)"),
        "speedup_baseline": "images/s over the fp32 teachers + fp32 student setting of the same strategy, "
                            "contiguous layout (speedup: over all timed steps; speedup_median: the median over rounds "
                            "of the round's ratio of seconds, each round timing every setting back to back)",
        "results": results, "skipped": skipped, "wall_s": round(time.perf_counter() - began, 1),
    }
    print_table(report)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return report


def print_table(report: dict) -> None:
    memory = "peak MB" if report["device"].startswith("cuda") else "RSS+ MB"
    lines = [f"{report['device_name']} ({report['device']}), torch {report['torch']}, {report['threads']} threads, "
             f"batch {report['batch_size']}, {report['rounds']} round(s) x {report['timed_steps']} timed steps",
             f"{'strategy':9s} {'teachers':8s} {'student':7s} {'cl':4s} {'img/s':>9s} {'s/step':>8s} {memory:>9s} "
             f"{'speedup':>7s} {'teach s':>8s} {'student s':>9s}"]
    for r in report["results"]:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        phases = r.get("phase_s_per_step", {})
        teach, student = (f"{phases[k]:.3f}" if k in phases else "-" for k in ("teachers", "student_step"))
        teachers = r["teacher_precision"] + ("+c" if r["compiled_teachers"] else "")
        lines.append(f"{r['strategy']:9s} {teachers:8s} {r['student_precision']:7s} {r['channels_last']:4s} "
                     f"{r['images_per_s']:9.1f} {r['s_per_step_median']:8.3f} {r['peak_memory_mb']:9.1f} {speedup:>7s} "
                     f"{teach:>8s} {student:>9s}")
    if any(r["compiled_teachers"] for r in report["results"]):
        lines.append("+c: teachers under torch.compile")
    for label in report["skipped"]:
        lines.append(f"skipped (over --budget-s): {label}")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
    sys.exit(0)
