"""Teacher settings chosen by measurement: ``runtime.teacher_precision: auto``.

No CPU flag predicts whether bf16 is faster than fp32 (2.9x on a Xeon with AMX, 2.0x on an AMD EPYC
with AVX512-BF16 for some pools, 0.85x on a Xeon without AMX), nor whether channels_last pays. So
``auto`` times the teacher itself: for one (teacher, device, batch shape, threads) every candidate
:class:`Setting` runs the same seeded batch a few times; the fastest setting whose outputs agree
with exact fp32 (:class:`Bounds`: the logits' KL and the feature map's relative error on the probe
batch) is chosen, and exact fp32 is kept unless another setting is at least ``margin`` faster (so
that timing noise never trades exactness for nothing). Outputs that are not finite disagree.

The decision is kept on disk (:class:`ProbeCache`, one JSON file per key: CPU model or GPU name,
torch version, the teacher's weights digest, batch shape, threads, the candidates and bounds), so a
second run does not probe again. Fixed settings (``fp32``, ``bf16``, ``fp16``) are never probed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.devices import device_name, runs_natively

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
    images = torch.randn(batch, *meta["input_shape"], generator=torch.Generator().manual_seed(0))
    trials, reference, fastest = [], None, None
    for setting in settings:
        # each setting on its own copy: an fp32 teacher moves (channels_last) the module it is given
        teacher = Teacher(copy.deepcopy(model), meta, device=device, precision=setting.precision,
                          channels_last=setting.channels_last, fold_batchnorm=setting.fold_batchnorm)
        outputs = teacher.infer(images)  # warm-up, and the outputs compared
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            teacher.infer_raw(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            if fastest is not None and times[-1] > 2 * fastest:
                break  # clearly slower than a setting already measured: no need for a median
        fastest = min(fastest or math.inf, statistics.median(times))
        outputs = [t.cpu() for t in outputs]
        if reference is None:  # EXACT is measured first
            reference = outputs
        kl, feature_error = logit_kl(reference[0], outputs[0]), relative_error(reference[2], outputs[2])
        agrees = kl <= bounds.max_logit_kl and feature_error <= bounds.max_feature_rel_error
        note = "" if agrees else (f"logit KL {kl:.3g} > {bounds.max_logit_kl:g}" if kl > bounds.max_logit_kl
                                  else f"feature error {feature_error:.3g} > {bounds.max_feature_rel_error:g}")
        trials.append(Trial(setting.label, round(1e3 * statistics.median(times), 3), kl, feature_error, agrees, note))
        del teacher
    chosen, reason = decide(trials, bounds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return ProbeReport(probe_key(meta, device, batch, threads, settings, bounds), chosen, reason, trials,
                       round(time.perf_counter() - began, 3), load_average=load)


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
    """Probe decisions on disk, one JSON file per key (the sha256 of the key's JSON)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else default_cache_dir()

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.json"

    def get(self, key: dict) -> ProbeReport | None:
        """The stored report of ``key``, or None (none stored, or unreadable: probed again)."""
        try:
            data = json.loads(self.path(key).read_text())
            report = ProbeReport.from_dict(data)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if report.key != key:
            return None
        report.cached = True
        return report

    def put(self, report: ProbeReport) -> None:
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


# ----------------------------------------------------------------------------- a pool's table
def probe_pool(config, *, fresh: bool = False) -> tuple[list[tuple[str, ProbeReport | None, str]], str]:
    """What ``teacher_precision: auto`` does for each local teacher of an ``ExperimentConfig`` on this
    machine (at ``data.batch_size``, this process's torch threads and ``runtime.device``), without
    training: ``([(teacher name, report or None, what the run uses)], table text)``. ``fresh``
    probes again instead of reading the cache (and stores the new decision). Teachers served over gRPC
    are listed, not probed (their server decides)."""
    from mtkd.devices import resolve_device
    from mtkd.teachers import load_model_checkpoint, probe_options

    rt = config.runtime
    device = resolve_device(rt.device)
    options = probe_options(config)
    rows: list[tuple[str, ProbeReport | None, str]] = []
    for spec in config.teachers:
        if not spec.checkpoint:
            rows.append((spec.name or str(spec.address), None, "served over gRPC: its server's own setting"))
            continue
        model, meta = load_model_checkpoint(spec.checkpoint)
        name = spec.name or meta["model"]
        if rt.teacher_precision != "auto":
            rows.append((name, None, f"{rt.teacher_precision} (fixed by runtime.teacher_precision)"))
            continue
        report = choose_setting(model, meta, device, options["probe_batch"], cache=ProbeCache(options["probe_cache"]),
                                bounds=options["probe_bounds"], fresh=fresh)
        rows.append((name, report, report.chosen))
    return rows, format_table(rows, device, options["probe_batch"])


def format_table(rows: list[tuple[str, ProbeReport | None, str]], device: torch.device, batch: int) -> str:
    """A markdown table: per teacher, ms per batch and agreement of each setting, and the choice."""
    labels = list(dict.fromkeys(t.setting for _, r, _ in rows if r for t in r.trials))  # in probe order
    lines = [f"# teacher settings on {device_description(device)}, batch {batch}, {torch.get_num_threads()} "
             f"torch threads, torch {torch.__version__}",
             "| teacher | " + " | ".join(f"{label} ms (KL, feature err)" for label in labels) + " | used | source |",
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
