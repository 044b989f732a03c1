"""Settings chosen by measurement: ``runtime.teacher_precision: auto``, ``runtime.student_precision:
auto`` and ``runtime.compile_teachers: auto``.

No CPU flag predicts whether bf16 is faster than fp32 (2.9x on a Xeon with AMX, 2.0x on an AMD EPYC
with AVX512-BF16 for some pools, 0.85x on a Xeon without AMX), nor whether channels_last pays. So
``auto`` times the teacher itself: for one (teacher, device, batch shape, threads) every candidate
:class:`Setting` runs the same seeded batch a few times; the fastest setting whose outputs agree
with exact fp32 (:class:`Bounds`: the logits' KL and the feature map's relative error on the probe
batch) is chosen, and exact fp32 is kept unless another setting is at least ``margin`` faster (so
that timing noise never trades exactness for nothing). Outputs that are not finite disagree.

The student is probed the same way (:func:`choose_student_setting`), on a few training steps
(forward and backward) of its seeded copy: fp32, fp32 channels_last, and bf16 autocast with
channels_last where the device runs bf16 natively (the optimiser keeps fp32 master weights).

Compilation is decided by break-even (:func:`compile_decision`): a teacher is compiled when the
run's teacher calls exceed the measured compile time over the measured saving per call. The
measurement (:func:`measure_compile`: compile once, time a few batches against eager) is cached
like the rest; a run without one measures only when even a pessimistic saving
(:data:`ASSUMED_SAVING` of an eager call against an :data:`ASSUMED_COMPILE_S` compile) would pay,
and then keeps the compiled model when compiling pays.

The decisions are kept on disk (:class:`ProbeCache`, one JSON file per key: CPU model or GPU name,
torch version, the teacher's weights digest (the student's architecture), batch shape, threads, the
candidates and bounds), so a second run does not probe again. Fixed settings (``fp32``, ``bf16``,
``fp16``) are never probed.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.devices import autocast, device_name, resolve_precision, runs_natively
from mtkd.models import Outputs

PROBE_VERSION = 1
"""Bumped when the probe's measurement changes, so that older decisions are not reused."""


@dataclass(frozen=True)
class Setting:
    """How a teacher computes: its precision (autocast dtype), memory format and batch-norm folding."""

    precision: str = "fp32"
    channels_last: bool = False
    fold_batchnorm: bool = False

    @property
    def label(self) -> str:
        """e.g. ``fp32``, ``fp32+nhwc``, ``bf16+nhwc+foldbn``."""
        return "+".join([self.precision, *(["nhwc"] if self.channels_last else []),
                         *(["foldbn"] if self.fold_batchnorm else [])])

    @property
    def exact(self) -> bool:
        """The reference computation (fp32, NCHW, nothing folded)."""
        return self == EXACT


EXACT = Setting()


def candidates(device: torch.device) -> list[Setting]:
    """The settings ``auto`` measures on ``device``: exact fp32, fp32 channels_last, and each reduced
    precision that has native kernels there (autocast, channels_last, batch norm folded: the library's
    reduced-precision teacher)."""
    found = [EXACT, Setting("fp32", channels_last=True)]
    for precision in ("bf16", "fp16"):
        if runs_natively(device.type, precision):
            found.append(Setting(precision, channels_last=True, fold_batchnorm=True))
    return found


@dataclass(frozen=True)
class Bounds:
    """How far a setting's outputs may be from exact fp32's on the probe batch.

    Attributes:
        max_logit_kl: the mean over predictions (images, or pixels of a logit map) of
            ``KL(softmax(fp32 logits) || softmax(setting's logits))``.
        max_feature_rel_error: ``||feature - fp32 feature|| / ||fp32 feature||`` over the batch.
        margin: a setting other than exact fp32 is chosen only when at least this much faster
            (``fp32_ms / setting_ms >= 1 + margin``).
    """

    max_logit_kl: float = 1e-3
    max_feature_rel_error: float = 0.05
    margin: float = 0.05


@dataclass
class Trial:
    """One setting's measurement: median ms per batch, agreement with exact fp32, whether it is allowed."""

    setting: str
    ms_per_batch: float
    logit_kl: float
    feature_rel_error: float
    agrees: bool
    note: str = ""


@dataclass
class ProbeReport:
    """What ``auto`` decided for one teacher and why."""

    key: dict
    chosen: str
    reason: str
    trials: list[Trial] = field(default_factory=list)
    probe_seconds: float = 0.0
    cached: bool = False
    load_average: float | None = None
    """The 1-minute load average when it was measured (a busy machine gives noisy timings: re-probe
    with ``mtkd probe --fresh``)."""

    def setting(self) -> Setting:
        """The chosen :class:`Setting`."""
        return setting_from_label(self.chosen)

    def line(self, name: str) -> str:
        """One log line: ``probe <name>: fp32 12.1 ms, bf16+nhwc+foldbn 6.0 ms (KL 2e-05) -> bf16+... (reason)``."""
        timings = ", ".join(f"{t.setting} {t.ms_per_batch:.1f} ms" + ("" if t.agrees else " (disagrees)")
                            for t in self.trials)
        source = "cached" if self.cached else f"{self.probe_seconds:.1f} s"
        return f"probe {name} [{source}]: {timings} -> {self.chosen} ({self.reason})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProbeReport:
        return cls(**{**data, "trials": [Trial(**t) for t in data["trials"]]})


def setting_from_label(label: str) -> Setting:
    """Inverse of :attr:`Setting.label`."""
    precision, *flags = label.split("+")
    return Setting(precision, "nhwc" in flags, "foldbn" in flags)


# ----------------------------------------------------------------------------------- agreement
def logit_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean ``KL(softmax(reference) || softmax(other))`` over predictions: rows of ``[B, C]`` logits,
    or pixels of ``[B, C, h, w]`` maps (class dimension 1). ``inf`` when ``other`` is not finite."""
    if not torch.isfinite(other).all():
        return float("inf")
    log_p = F.log_softmax(reference.double(), dim=1)
    log_q = F.log_softmax(other.double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``||other - reference|| / ||reference||`` (``inf`` when ``other`` is not finite)."""
    if not torch.isfinite(other).all():
        return float("inf")
    scale = float(reference.double().norm())
    return float((other.double() - reference.double()).norm()) / max(scale, 1e-30)


# ------------------------------------------------------------------------------------ the probe
def probe_key(meta: dict, device: torch.device, batch: int, threads: int, settings: list[Setting],
              bounds: Bounds) -> dict:
    """Everything a decision depends on: the machine (CPU model or GPU name), torch, the teacher's
    weights, the batch shape, threads, the candidates and the bounds."""
    return {"probe_version": PROBE_VERSION, "device": device_description(device), "torch": torch.__version__,
            "weights_digest": str(meta["weights_digest"]), "batch_shape": [batch, *map(int, meta["input_shape"])],
            "threads": threads, "settings": [s.label for s in settings], "bounds": asdict(bounds)}


def device_description(device: torch.device) -> str:
    """The GPU's name, or ``cpu: `` and the CPU's model name (:func:`mtkd.devices.device_name`)."""
    return device_name(device) if device.type == "cuda" else "cpu: " + device_name(device)


def probe_teacher(model: nn.Module, meta: dict, device: torch.device, batch: int, *, threads: int | None = None,
                  settings: list[Setting] | None = None, bounds: Bounds = Bounds(), repeats: int = 3) -> ProbeReport:
    """Time every candidate setting of one teacher on a seeded ``[batch, *input_shape]`` batch and pick.

    Args:
        model: the teacher network (left unchanged: each setting works on its own copy).
        meta: its checkpoint metadata (``input_shape``, ``weights_digest``...).
        device: where it will run.
        batch: the batch size it will serve.
        threads: torch threads it will run with (default: the current count; used as is).
        settings: the candidates (default :func:`candidates`); exact fp32 is always measured.
        bounds: agreement bounds and the margin.
        repeats: timed batches per setting, after one untimed warm-up (the median is kept; a setting
            whose batch took over twice the fastest median so far is not timed further).

    Returns:
        The :class:`ProbeReport` (not cached: see :func:`choose_setting`).
    """
    from mtkd.teachers import Teacher  # teachers imports this module

    threads = threads or torch.get_num_threads()
    settings = with_exact(settings, device)
    began = time.perf_counter()
    images = seeded_batch(batch, meta["input_shape"])
    trials, reference, fastest = [], None, None
    for setting in settings:
        # each setting on its own copy: an fp32 teacher moves (channels_last) the module it is given
        teacher = Teacher(copy.deepcopy(model), meta, device=device, precision=setting.precision,
                          channels_last=setting.channels_last, fold_batchnorm=setting.fold_batchnorm)
        outputs = teacher.infer(images)  # warm-up, and the outputs compared
        # a setting clearly slower than one already measured needs no median
        times = time_calls(lambda: teacher.infer_raw(images), repeats, device, None if fastest is None else 2 * fastest)
        fastest = min(fastest or math.inf, statistics.median(times))
        outputs = [t.cpu() for t in outputs]
        if reference is None:  # EXACT is measured first
            reference = outputs
        trials.append(judge(setting, times, reference, outputs, bounds))
        del teacher
    chosen, reason = decide(trials, bounds)
    return ProbeReport(probe_key(meta, device, batch, threads, settings, bounds), chosen, reason, trials,
                       round(time.perf_counter() - began, 3), load_average=load_average())


def decide(trials: list[Trial], bounds: Bounds) -> tuple[str, str]:
    """The chosen setting's label and why: the fastest agreeing setting when it beats exact fp32 by
    the margin, else exact fp32."""
    exact = next(t for t in trials if t.setting == EXACT.label)
    agreeing = [t for t in trials if t.agrees]
    best = min(agreeing, key=lambda t: t.ms_per_batch)
    speedup = exact.ms_per_batch / max(best.ms_per_batch, 1e-9)
    rejected = "; ".join(f"{t.setting} rejected: {t.note}" for t in trials if not t.agrees)
    if best is exact or speedup < 1 + bounds.margin:
        reason = f"no agreeing setting is {bounds.margin:.0%} faster than exact fp32"
        if best is not exact:
            reason += f" (best {best.setting}: {speedup:.2f}x)"
        return exact.setting, reason + (f"; {rejected}" if rejected else "")
    return best.setting, f"{speedup:.2f}x exact fp32, outputs agree" + (f"; {rejected}" if rejected else "")


# ------------------------------------------------------------------------------------ the cache
def default_cache_dir() -> Path:
    """``$MTKD_PROBE_CACHE``, else ``$XDG_CACHE_HOME/mtkd/probe`` (``~/.cache/mtkd/probe``)."""
    if os.environ.get("MTKD_PROBE_CACHE"):
        return Path(os.environ["MTKD_PROBE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtkd" / "probe"


class ProbeCache:
    """Probe decisions and compile measurements on disk, one JSON file per key (the sha256 of the key's JSON)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else default_cache_dir()

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.json"

    def get(self, key: dict) -> ProbeReport | None:
        """The stored report of ``key``, or None (none stored, or unreadable: probed again)."""
        return self._get(key, ProbeReport)

    def get_compile(self, key: dict) -> CompileMeasurement | None:
        """The stored compile measurement of ``key``, or None."""
        return self._get(key, CompileMeasurement)

    def _get(self, key: dict, kind):
        try:
            data = json.loads(self.path(key).read_text())
            report = kind.from_dict(data)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if report.key != key:
            return None
        report.cached = True
        return report

    def put(self, report: ProbeReport | CompileMeasurement) -> None:
        """Store ``report`` (written whole: a temporary file renamed into place)."""
        path = self.path(report.key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps({**report.to_dict(), "cached": False}, indent=1, sort_keys=True))
            partial.replace(path)
        except OSError:  # a read-only home: the decision holds for this run only
            pass


def with_exact(settings: list[Setting] | None, device: torch.device) -> list[Setting]:
    """``settings`` (default :func:`candidates`) with exact fp32 first: it is always measured, first,
    as the reference the others are compared with."""
    settings = list(settings or candidates(device))
    return settings if settings and settings[0] == EXACT else [EXACT, *(s for s in settings if s != EXACT)]


def choose_setting(model: nn.Module, meta: dict, device: torch.device, batch: int, *,
                   cache: ProbeCache | None = None, bounds: Bounds = Bounds(),
                   settings: list[Setting] | None = None, fresh: bool = False) -> ProbeReport:
    """The cached decision for this teacher on this machine, else (or with ``fresh``) a new probe,
    then stored."""
    cache = cache or ProbeCache()
    settings = with_exact(settings, device)
    key = probe_key(meta, device, batch, torch.get_num_threads(), settings, bounds)
    found = None if fresh else cache.get(key)
    if found is not None:
        return found
    report = probe_teacher(model, meta, device, batch, settings=settings, bounds=bounds)
    cache.put(report)
    return report


# ------------------------------------------------------------------------------ timing helpers
def seeded_batch(batch: int, input_shape) -> torch.Tensor:
    """The probe's images ``[batch, *input_shape]``: the same seeded normal draw in every setting."""
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))


def time_calls(call, repeats: int, device: torch.device, give_up_after: float | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``call()`` (the device synchronised after each); stops
    early once a call took over ``give_up_after`` seconds (clearly slower than something already timed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        if give_up_after is not None and times[-1] > give_up_after:
            break
    return times


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------------- the student
def student_candidates(device: torch.device) -> list[Setting]:
    """The settings ``student_precision: auto`` measures: exact fp32, fp32 channels_last, and bf16
    autocast with channels_last where the device runs bf16 natively. (No fp16: it would need a
    gradient scaler; no batch-norm folding: the student trains.)"""
    found = [EXACT, Setting("fp32", channels_last=True)]
    if runs_natively(device.type, "bf16"):
        found.append(Setting("bf16", channels_last=True))
    return found


def architecture_digest(module: nn.Module) -> str:
    """A digest of ``module``'s parameter and buffer names and shapes (what its speed depends on)."""
    shapes = [[name, list(t.shape)] for name, t in module.state_dict().items()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def student_key(module: nn.Module, name: str, input_shape, device: torch.device, batch: int, threads: int,
                settings: list[Setting], bounds: Bounds) -> dict:
    """Everything a student decision depends on: the machine, torch, the trainable module's
    architecture (student and projectors), the batch shape, threads, the candidates and the bounds."""
    return {"probe_version": PROBE_VERSION, "what": "student training step", "device": device_description(device),
            "torch": torch.__version__, "student": name, "architecture": architecture_digest(module),
            "batch_shape": [batch, *map(int, input_shape)], "threads": threads,
            "settings": [s.label for s in settings], "bounds": asdict(bounds)}


def student_training_step(module: nn.Module, images: torch.Tensor, setting: Setting,
                          device: torch.device) -> Outputs:
    """One forward and backward pass of a trainable module (``images -> (Outputs, [projected maps])``)
    in ``setting``, as the engine runs it: autocast around the forward, a loss in fp32 on the logits
    (the log-probability of class 0, for ``[B, C]`` scores and ``[B, C, h, w]`` maps alike) and the
    projected maps. Returns the student's outputs (detached, float32) for the agreement check."""
    module.zero_grad(set_to_none=True)
    with autocast(device, setting.precision):
        outputs, projected = module(images)
    outputs = Outputs(*(t.float() for t in outputs))
    loss = -F.log_softmax(outputs.logits, 1).select(1, 0).mean()
    loss = loss + outputs.feature.pow(2).mean() + sum(p.float().pow(2).mean() for p in projected)
    loss.backward()
    return Outputs(*(t.detach() for t in outputs))


def probe_student(module: nn.Module, name: str, input_shape, device: torch.device, batch: int, *,
                  settings: list[Setting] | None = None, bounds: Bounds = Bounds(), repeats: int = 3) -> ProbeReport:
    """Time a few training steps (forward and backward, :func:`student_training_step`) of the
    trainable module in every candidate setting on a seeded ``[batch, *input_shape]`` batch and pick,
    as :func:`probe_teacher` does (the student's logits and feature map against exact fp32's on the
    same batch, from the same weights).

    Args:
        module: the student with its projectors, returning ``(Outputs, [projected])``; left unchanged
            (each setting trains its own copy, without an optimiser step) and the caller's RNG too.
        name: the student's model name (in the key and the log line).
        input_shape: ``(C, H, W)``.
        device: where it will train.
        batch: the batch size it will train on.
        settings: the candidates (default :func:`student_candidates`); exact fp32 always, first.
        bounds, repeats: as :func:`probe_teacher`.
    """
    settings = with_exact(settings or student_candidates(device), device)
    began = time.perf_counter()
    images = seeded_batch(batch, input_shape).to(device)
    trials, reference, fastest = [], None, None
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        for setting in settings:
            layout = torch.channels_last if setting.channels_last else torch.contiguous_format
            trainee = copy.deepcopy(module).to(device, memory_format=layout).train()
            outputs = student_training_step(trainee, images, setting, device)  # warm-up, and the outputs compared
            times = time_calls(lambda: student_training_step(trainee, images, setting, device), repeats, device,
                               None if fastest is None else 2 * fastest)
            fastest = min(fastest or math.inf, statistics.median(times))
            outputs = [t.cpu() for t in outputs]
            if reference is None:
                reference = outputs
            trials.append(judge(setting, times, reference, outputs, bounds))
            del trainee
    chosen, reason = decide(trials, bounds)
    key = student_key(module, name, input_shape, device, batch, torch.get_num_threads(), settings, bounds)
    return ProbeReport(key, chosen, reason, trials, round(time.perf_counter() - began, 3), load_average=load_average())


def judge(setting: Setting, times: list[float], reference: list[torch.Tensor], outputs: list[torch.Tensor],
          bounds: Bounds) -> Trial:
    """The :class:`Trial` of one setting: its median time and how far its logits (``outputs[0]``) and
    feature map (``outputs[2]``) are from exact fp32's."""
    kl, feature_error = logit_kl(reference[0], outputs[0]), relative_error(reference[2], outputs[2])
    agrees = kl <= bounds.max_logit_kl and feature_error <= bounds.max_feature_rel_error
    note = "" if agrees else (f"logit KL {kl:.3g} > {bounds.max_logit_kl:g}" if kl > bounds.max_logit_kl
                              else f"feature error {feature_error:.3g} > {bounds.max_feature_rel_error:g}")
    return Trial(setting.label, round(1e3 * statistics.median(times), 3), kl, feature_error, agrees, note)


def choose_student_setting(module: nn.Module, name: str, input_shape, device: torch.device, batch: int, *,
                           cache: ProbeCache | None = None, bounds: Bounds = Bounds(),
                           settings: list[Setting] | None = None, fresh: bool = False) -> ProbeReport:
    """The cached decision for this student on this machine, else (or with ``fresh``) a new
    :func:`probe_student`, then stored."""
    cache = cache or ProbeCache()
    settings = with_exact(settings or student_candidates(device), device)
    key = student_key(module, name, input_shape, device, batch, torch.get_num_threads(), settings, bounds)
    found = None if fresh else cache.get(key)
    if found is not None:
        return found
    report = probe_student(module, name, input_shape, device, batch, settings=settings, bounds=bounds)
    cache.put(report)
    return report


def runtime_bounds(runtime) -> Bounds:
    """The agreement bounds of a ``RuntimeConfig`` (``probe_max_logit_kl``, ``probe_max_feature_error``)."""
    return Bounds(max_logit_kl=runtime.probe_max_logit_kl, max_feature_rel_error=runtime.probe_max_feature_error)


def student_setting(config, module: nn.Module, input_shape, device: torch.device) -> tuple[Setting, ProbeReport | None]:
    """How the engine trains the student of an ``ExperimentConfig``: ``runtime.student_precision``
    fixed (``fp32``: exact, NCHW; ``bf16``: autocast and channels_last), or ``auto``: the
    :func:`choose_student_setting` of ``module`` at ``data.batch_size`` (its log line printed).
    Returns the setting and the probe's report (None when fixed)."""
    rt = config.runtime
    if rt.student_precision != "auto":
        precision = resolve_precision(rt.student_precision, device)
        return Setting(precision, channels_last=precision != "fp32"), None
    report = choose_student_setting(module, config.student, tuple(input_shape), device, int(config.data.batch_size),
                                    cache=ProbeCache(rt.probe_cache), bounds=runtime_bounds(rt))
    print(f"[mtkd] student_precision auto: {report.line(config.student)}", file=sys.stderr, flush=True)
    return report.setting(), report


# -------------------------------------------------------------------- compilation by break-even
COMPILE_MODE = "torch.compile inductor freezing static-shapes"
"""How a teacher is compiled (:meth:`mtkd.teachers.Teacher.use_compiled`); part of a measurement's key."""
ASSUMED_COMPILE_S = 120.0
"""What one teacher's compile is assumed to take before it was measured (pessimistic: four CIFAR
teachers compiled in 34-136 s together on a busy CPU; an fp32 resnet32x4 in 61 s on a Xeon)."""
ASSUMED_SAVING = 0.10
"""The fraction of an eager call that compiling is assumed to save before it was measured
(pessimistic for fp32 CIFAR teachers, 22% on a Xeon; bf16 ones saved 4% there)."""


@dataclass
class CompileMeasurement:
    """One teacher compiled once and timed against eager on the run's batch shape."""

    key: dict
    compile_s: float
    """The first compiled call's time less an eager call's: what compiling cost."""
    eager_ms: float
    compiled_ms: float
    logit_kl: float
    feature_rel_error: float
    measure_seconds: float = 0.0
    cached: bool = False
    load_average: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompileMeasurement:
        return cls(**data)


def compile_key(meta: dict, device: torch.device, batch: int, threads: int, setting: Setting) -> dict:
    """What a compile measurement depends on: the compile itself (:data:`COMPILE_MODE`), the machine,
    torch, the teacher's weights, the batch shape, threads and the teacher's setting."""
    return {"probe_version": PROBE_VERSION, "what": "compile", "compile": COMPILE_MODE,
            "device": device_description(device), "torch": torch.__version__,
            "weights_digest": str(meta["weights_digest"]), "batch_shape": [batch, *map(int, meta["input_shape"])],
            "threads": threads, "setting": setting.label}


def break_even_calls(compile_s: float, saving_ms: float) -> float:
    """The number of calls after which a compile of ``compile_s`` seconds that saves ``saving_ms``
    per call has paid for itself (``inf`` when it saves nothing)."""
    return math.inf if saving_ms <= 0 else max(compile_s, 0.0) / (saving_ms / 1e3)


def worth_measuring(calls: int, eager_ms: float, assumed_compile_s: float = ASSUMED_COMPILE_S,
                    assumed_saving: float = ASSUMED_SAVING) -> bool:
    """Whether a run of ``calls`` teacher calls of ``eager_ms`` each is long enough to compile to
    measure: even a pessimistic compile (``assumed_compile_s``) saving a pessimistic fraction
    (``assumed_saving``) of each call would pay. With the defaults: the teacher's eager time over
    the run is over 20 minutes, so a measurement that shows no saving costs at most ~10% of it, once."""
    return calls > break_even_calls(assumed_compile_s, assumed_saving * eager_ms)


def compile_decision(calls: int, compile_s: float, eager_ms: float, compiled_ms: float,
                     margin: float = 0.05) -> tuple[bool, str]:
    """Whether to compile a teacher for ``calls`` calls, given a measurement, and why: compile when
    the compiled call is at least ``margin`` faster (less is timing noise) and ``calls`` exceed
    :func:`break_even_calls` of the compile time and the saving per call."""
    if compiled_ms * (1 + margin) > eager_ms:
        return False, f"compiled ({compiled_ms:.1f} ms) is not {margin:.0%} faster than eager ({eager_ms:.1f} ms)"
    even = break_even_calls(compile_s, eager_ms - compiled_ms)
    if calls > even:
        return True, f"{calls} calls > break-even {even:.0f}"
    return False, f"{calls} calls <= break-even {even:.0f}"


@dataclass
class CompilePlan:
    """What ``compile_teachers: auto`` decided for one teacher and why (kept in the run's meta)."""

    name: str
    calls: int | None
    decision: str
    """``compile`` or ``eager`` (:func:`preview_compile` also says ``measure``)."""
    source: str
    """``measured`` (compiled now to measure), ``cached`` (an earlier measurement), ``not measured``."""
    reason: str
    eager_ms: float | None = None
    compile_s: float | None = None
    compiled_ms: float | None = None

    @property
    def saving_ms(self) -> float | None:
        return None if self.compiled_ms is None or self.eager_ms is None else self.eager_ms - self.compiled_ms

    def line(self) -> str:
        """``compile_teachers auto: resnet32x4: compile 61.2 s, saves 12.3 ms/call, 24000 calls -> compile (...)``."""
        calls = "unknown" if self.calls is None else str(self.calls)
        if self.compile_s is None:
            return f"compile_teachers auto: {self.name}: {self.source}, {calls} calls -> {self.decision} ({self.reason})"
        return (f"compile_teachers auto: {self.name}: compile {self.compile_s:.1f} s, saves {self.saving_ms:.1f} "
                f"ms/call, {calls} calls -> {self.decision} ({self.reason}) [{self.source}]")

    def to_dict(self) -> dict:
        even = None if self.compile_s is None else break_even_calls(self.compile_s, self.saving_ms)
        return {**asdict(self), "saving_ms": self.saving_ms,
                "break_even_calls": None if even is None or math.isinf(even) else round(even)}  # JSON has no inf


def plan_from(name: str, calls: int | None, measurement: CompileMeasurement | None, eager_ms: float | None,
              bounds: Bounds, source: str = "cached") -> CompilePlan:
    """The plan for one teacher from what is known: a measurement (compile or eager by
    :func:`compile_decision`; eager if its compiled outputs disagree with eager ones beyond ``bounds``),
    else ``measure`` when :func:`worth_measuring` and ``eager`` otherwise."""
    if measurement is not None:
        m = measurement
        plan = CompilePlan(name, calls, "eager", source, "", m.eager_ms, m.compile_s, m.compiled_ms)
        if m.logit_kl > bounds.max_logit_kl or m.feature_rel_error > bounds.max_feature_rel_error:
            plan.reason = f"compiled outputs disagree with eager (logit KL {m.logit_kl:.3g}, feature error " \
                          f"{m.feature_rel_error:.3g})"
        elif calls is None:
            plan.reason = "the run's number of calls is unknown"
        else:
            compile_it, plan.reason = compile_decision(calls, m.compile_s, m.eager_ms, m.compiled_ms, bounds.margin)
            plan.decision = "compile" if compile_it else "eager"
        return plan
    if calls is None:
        return CompilePlan(name, None, "eager", "not measured", "the run's number of calls is unknown", eager_ms)
    if calls == 0:
        return CompilePlan(name, 0, "eager", "not measured", "the run computes no teacher batch", eager_ms)
    if eager_ms is None:
        return CompilePlan(name, calls, "eager", "not measured", "the teacher's eager time is unknown")
    if worth_measuring(calls, eager_ms):
        return CompilePlan(name, calls, "measure", "not measured",
                           f"{calls} calls x {eager_ms:.1f} ms: a {ASSUMED_SAVING:.0%} saving would repay a "
                           f"{ASSUMED_COMPILE_S:.0f} s compile", eager_ms)
    return CompilePlan(name, calls, "eager", "not measured",
                       f"{calls} calls x {eager_ms:.1f} ms: too short for even a "
                       f"{ASSUMED_SAVING:.0%} saving to repay a {ASSUMED_COMPILE_S:.0f} s compile", eager_ms)


def measure_compile(teacher, batch: int, *, repeats: int = 3) -> CompileMeasurement:
    """Compile ``teacher`` (a :class:`mtkd.teachers.Teacher`, eager) and time it against eager on a
    seeded ``[batch, *input_shape]`` batch: one warm-up and ``repeats`` eager calls, the first
    compiled call (the compile), then ``repeats`` compiled calls (medians kept). The teacher is left
    compiled (the caller keeps or drops it: :meth:`Teacher.use_compiled`)."""
    began = time.perf_counter()
    images = seeded_batch(batch, teacher.meta["input_shape"])
    eager = teacher.infer(images)
    eager_ms = 1e3 * statistics.median(time_calls(lambda: teacher.infer_raw(images), repeats, teacher.device))
    teacher.use_compiled(True)
    first = time_calls(lambda: teacher.infer_raw(images), 1, teacher.device)[0]
    compiled = teacher.infer(images)
    compiled_ms = 1e3 * statistics.median(time_calls(lambda: teacher.infer_raw(images), repeats, teacher.device))
    key = compile_key(teacher.meta, teacher.device, batch, torch.get_num_threads(), teacher.setting)
    eager, compiled = [t.cpu() for t in eager], [t.cpu() for t in compiled]
    return CompileMeasurement(key, round(max(0.0, first - eager_ms / 1e3), 3), round(eager_ms, 3), round(compiled_ms, 3),
                              logit_kl(eager[0], compiled[0]), relative_error(eager[2], compiled[2]),
                              round(time.perf_counter() - began, 3), load_average=load_average())


def eager_ms_of(teacher, batch: int, calls: int | None = None, repeats: int = 2) -> float:
    """The eager ms per batch of ``teacher`` in its setting: from its precision probe when it was
    probed, else timed now (``repeats`` batches after a warm-up). With ``calls``, a run too short to
    measure even at the warm-up's time (an upper bound) is not timed further: the warm-up's is returned."""
    for trial in (teacher.probe or {}).get("trials", []):
        if trial["setting"] == teacher.setting.label:
            return float(trial["ms_per_batch"])
    images = seeded_batch(batch, teacher.meta["input_shape"])
    warm_up = 1e3 * time_calls(lambda: teacher.infer_raw(images), 1, teacher.device)[0]
    if calls is not None and not worth_measuring(calls, warm_up):
        return warm_up
    return 1e3 * statistics.median(time_calls(lambda: teacher.infer_raw(images), repeats, teacher.device))


def plan_compile(teacher, calls: int | None, *, batch: int, cache: ProbeCache | None = None,
                 bounds: Bounds = Bounds(), fresh: bool = False) -> CompilePlan:
    """Decide ``compile_teachers: auto`` for one eager ``teacher`` serving ``calls`` batches of
    ``batch`` and apply it (:meth:`Teacher.use_compiled`): from the cached measurement, else by
    measuring (:func:`measure_compile`, then stored) when :func:`worth_measuring`, keeping the
    compiled model when compiling pays; a run too short to measure stays eager."""
    cache = cache or ProbeCache()
    key = compile_key(teacher.meta, teacher.device, batch, torch.get_num_threads(), teacher.setting)
    found = None if fresh else cache.get_compile(key)
    if found is not None:
        plan = plan_from(teacher.name, calls, found, None, bounds, "cached")
    elif not calls:
        plan = plan_from(teacher.name, calls, None, None, bounds)
    else:
        plan = plan_from(teacher.name, calls, None, eager_ms_of(teacher, batch, calls), bounds)
        if plan.decision == "measure":
            measurement = measure_compile(teacher, batch)
            cache.put(measurement)
            plan = plan_from(teacher.name, calls, measurement, None, bounds, "measured")
    teacher.use_compiled(plan.decision == "compile")
    return plan


def preview_compile(name: str, meta: dict, device: torch.device, batch: int, setting: Setting, calls: int | None,
                    eager_ms: float | None, *, cache: ProbeCache | None = None, bounds: Bounds = Bounds()) -> CompilePlan:
    """What :func:`plan_compile` would do, without compiling: from the cached measurement, else
    ``measure`` or ``eager`` by :func:`worth_measuring` (``mtkd probe``)."""
    found = (cache or ProbeCache()).get_compile(compile_key(meta, device, batch, torch.get_num_threads(), setting))
    return plan_from(name, calls, found, eager_ms, bounds, "cached")


def planned_teacher_calls(config, train_size: int | None = None) -> int | None:
    """The batches each teacher of an ``ExperimentConfig`` computes in the run: ``optim.epochs`` x
    the training batches of an epoch (``train_size // data.batch_size``; the last partial batch is
    dropped), over the epochs whose augmentations are new when a cache of teacher outputs serves
    repeats (``cache.url`` with ``data.augment_bank`` K: ``min(epochs, K)``; without augmentation: 1).
    ``train_size``: the training samples (default ``data.train_subset``, else the train split's
    length, read from the dataset). 0 for a strategy without teachers; None when the data cannot be read."""
    from mtkd.distill import STRATEGIES

    if not STRATEGIES.get(config.distill.strategy).uses_teachers:
        return 0
    if train_size is None:
        train_size = config.data.train_subset
    if train_size is None:
        train_size = train_split_size(config.data.name, config.data.root, json.dumps(config.data.options, sort_keys=True))
    if train_size is None:
        return None
    epochs = int(config.optim.epochs)
    if config.cache.url:
        epochs = min(epochs, config.data.augment_bank) if config.data.augment and config.data.augment_bank else \
            epochs if config.data.augment else min(epochs, 1)
    return epochs * (int(train_size) // int(config.data.batch_size))


# ----------------------------------------------------------------------------- a pool's table
def probe_pool(config, *, fresh: bool = False) -> tuple[list[tuple[str, ProbeReport | None, str]], str]:
    """What ``auto`` does for an ``ExperimentConfig`` on this machine (at ``data.batch_size``, this
    process's torch threads and ``runtime.device``), without training: each local teacher's
    ``teacher_precision`` setting, the student's ``student_precision`` setting, and what
    ``compile_teachers: auto`` would do (from a cached measurement or the rule; nothing is compiled).
    Returns ``([(name, report or None, what the run uses)], text)``: one row per teacher, then the
    student's (named ``student <model>``). ``fresh`` probes again instead of reading the cache (and
    stores the new decisions). Teachers served over gRPC are listed, not probed (their server decides)."""
    from mtkd.devices import resolve_device
    from mtkd.teachers import Teacher, load_model_checkpoint, probe_options

    rt = config.runtime
    device = resolve_device(rt.device)
    options = probe_options(config, planned_calls=True)
    batch, cache, bounds = options["probe_batch"], ProbeCache(options["probe_cache"]), options["probe_bounds"]
    rows: list[tuple[str, ProbeReport | None, str]] = []
    plans: list[CompilePlan] = []
    local: list[tuple[dict, dict]] = []  # (meta, description) of each local teacher, for the student's projectors
    for spec in config.teachers:
        if not spec.checkpoint:
            rows.append((spec.name or str(spec.address), None, "served over gRPC: its server's own setting"))
            continue
        model, meta = load_model_checkpoint(spec.checkpoint)
        name = spec.name or meta["model"]
        local.append((meta, teacher_description(model, meta, name)))
        if rt.teacher_precision != "auto":
            rows.append((name, None, f"{rt.teacher_precision} (fixed by runtime.teacher_precision)"))
            teacher = Teacher(copy.deepcopy(model), meta, name, device=device, precision=rt.teacher_precision)
            setting, eager_ms = teacher.setting, eager_ms_of(teacher, batch, options["planned_calls"])
        else:
            report = choose_setting(model, meta, device, batch, cache=cache, bounds=bounds, fresh=fresh)
            rows.append((name, report, report.chosen))
            setting = report.setting()
            eager_ms = next((t.ms_per_batch for t in report.trials if t.setting == report.chosen), None)
        plans.append(preview_compile(name, meta, device, batch, setting, options["planned_calls"], eager_ms,
                                     cache=cache, bounds=bounds))
    rows.append(student_row(config, local, device, batch, cache, bounds, fresh))
    text = format_table(rows, device, batch) + "\n\n" + format_compile(plans, rt.compile_teachers)
    return rows, text


def teacher_description(model: nn.Module, meta: dict, name: str) -> dict:
    """What the engine reads of a teacher to build the student's projectors: ``name``, ``feature_shape``."""
    with torch.no_grad():
        feature = Outputs(*model.eval()(torch.zeros(1, *meta["input_shape"]))).feature
    return {"name": name, "feature_shape": tuple(feature.shape[1:])}


def student_row(config, local: list[tuple[dict, dict]], device: torch.device, batch: int, cache: ProbeCache,
                bounds: Bounds, fresh: bool) -> tuple[str, ProbeReport | None, str]:
    """The student's row of :func:`probe_pool`: its trainable module built as the engine builds it
    (projectors to the local teachers' feature maps), probed when ``student_precision`` is auto."""
    from mtkd.distill import STRATEGIES
    from mtkd.engine import build_trainable

    name, rt = f"student {config.student}", config.runtime
    if rt.student_precision != "auto":
        return name, None, f"{rt.student_precision} (fixed by runtime.student_precision)"
    distils = STRATEGIES.get(config.distill.strategy).uses_teachers
    if not local or (distils and len(local) < len(config.teachers)):
        return name, None, "not probed: needs every teacher's checkpoint (classes, input and feature shapes)"
    meta = local[0][0]
    module = build_trainable(config, int(meta["num_classes"]), tuple(meta["input_shape"]), [d for _, d in local])
    report = choose_student_setting(module, config.student, tuple(meta["input_shape"]), device, batch, cache=cache,
                                    bounds=bounds, fresh=fresh)
    return name, report, report.chosen


def format_table(rows: list[tuple[str, ProbeReport | None, str]], device: torch.device, batch: int) -> str:
    """A markdown table: per teacher (and the student), ms per batch (per training step for the
    student) and agreement of each setting, and the choice."""
    labels = list(dict.fromkeys(t.setting for _, r, _ in rows if r for t in r.trials))  # in probe order
    lines = [f"# settings on {device_description(device)}, batch {batch}, {torch.get_num_threads()} "
             f"torch threads, torch {torch.__version__} (the student: a training step, forward and backward)",
             "| network | " + " | ".join(f"{label} ms (KL, feature err)" for label in labels) + " | used | source |",
             "|---|" + "---|" * (len(labels) + 2)]
    for name, report, used in rows:
        cells = []
        for label in labels:
            trial = next((t for t in report.trials if t.setting == label), None) if report else None
            cells.append("-" if trial is None else f"{trial.ms_per_batch:.1f} ({trial.logit_kl:.1e}, "
                         f"{trial.feature_rel_error:.1e}){'' if trial.agrees else ' rejected'}")
        source = "-" if report is None else ("cached" if report.cached else f"probed in {report.probe_seconds:.1f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {used} | {source} |")
    return "\n".join(lines)


def format_compile(plans: list[CompilePlan], configured) -> str:
    """What ``compile_teachers: auto`` would do for each teacher (``configured``: the config's value)."""
    uses = "auto: this run" if configured == "auto" else f"{str(configured).lower()} in this config"
    lines = [f"# compile_teachers auto ({uses}): compile when the run's calls exceed compile time / saving per call",
             "| teacher | calls | eager ms | compiled ms | compile s | break-even calls | auto would | why |",
             "|---|---|---|---|---|---|---|---|"]
    for plan in plans:
        record = plan.to_dict()

        def cell(value, digits=1):
            return "-" if value is None else f"{value:.{digits}f}"

        would = {"measure": "compile to measure", "compile": "compile", "eager": "stay eager"}[plan.decision]
        lines.append(f"| {plan.name} | {'-' if plan.calls is None else plan.calls} | {cell(plan.eager_ms)} | "
                     f"{cell(plan.compiled_ms)} | {cell(plan.compile_s)} | {cell(record['break_even_calls'], 0)} | "
                     f"{would} | {plan.reason} |")
    return "\n".join(lines)


@functools.lru_cache(maxsize=8)
def train_split_size(name: str, root: str | None, options: str) -> int | None:
    """The length of a dataset's train split (``options``: its loader options as JSON), or None when
    it cannot be read (the run itself reports why). Remembered: a Ray pool asks once per replica."""
    from mtkd.data import load_dataset

    try:
        return len(load_dataset(name, root, "train", **json.loads(options)))
    except Exception:  # noqa: BLE001 - any failure to read means "unknown" here
        return None
