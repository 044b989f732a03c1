"""Teacher-weighting strategies where weighting must matter (issue 25, items 3 and 4).

The demo's teachers (configs/demo.yaml: resnet20, vgg8, mobilenetv2, reused from ``cache/teachers``
or trained there as by ``mtkd demo``) and the demo's student experiment (resnet8, 1,000 labels,
15 epochs, batch 64, no warm-up), tested once at the end on all 10,000 test images. Each *regime*
is a deterministic transform of the real teachers' outputs (the engine's ``teacher_transform``
hook) that also records, per step, a ``[B, M]`` mask of the corrupted (sample, teacher) pairs:

``R0``      the demo's regime, untouched. Mask: the teacher's argmax is not the label.
``R1``      specialists. Teacher m keeps its real outputs (logits, embedding, feature) on the
            classes of its group; on any other sample, all its outputs are its outputs on another
            image: the next sample of the same batch (cyclically) whose label differs. Groups:
            ``ceil(C / M) + 1`` consecutive classes (mod C) starting at ``round(m C / M)``; with
            C = 10, M = 3: {0-4}, {3-7}, {7,8,9,0,1} (classes 0, 1, 3, 4, 7 have two experts, the
            rest one; every class at least one). Mask: the label is outside the teacher's group.
``R2``      scrambled dark knowledge, one teacher (``--r2-teacher``, default 0): its non-argmax
            logits are permuted per sample (a fixed permutation per training sample, drawn from
            ``derive_seed("weighting-R2", seed)``), the argmax logit and the label's logit kept in
            place. The logits are the same multiset with those two entries unchanged, so the
            teacher's CE against the label, its confidence (top probability) and its entropy are
            unchanged (exactly in arithmetic; in float32 to the rounding of logsumexp's sum, whose
            order changes: <= 5e-7 measured): ``camkd`` and ``ebkd`` cannot see it. Embedding and
            feature untouched. Mask: every pair of that teacher.
``R2rev``   as R2 with the strongest scramble: the ranking of the non-argmax, non-label logits is
            reversed (the most similar class becomes the least similar).
``R2rev2``  R2rev applied to two teachers (0 and 1): a majority of the pool corrupted, one left.
``R2all``   R2rev applied to every teacher: what dark knowledge is worth to ``aver`` at all (the
            oracle has no clean teacher left, so it is ``aver`` there).
``R2feat``  the same purpose (the teacher's logits, hence its CE and confidence, untouched, so
            ``camkd``/``ebkd`` cannot see it) through the feature term: teacher ``--r2-teacher``'s
            embedding and feature map are those of another image (R1's donor: the next sample of
            the batch with another label).
``R2full``  R2rev and R2feat together on teacher ``--r2-teacher``: all but its CE and confidence wrong.
``R2full2`` R2full on teachers 0 and 1.
``R3``      a mirror teacher: a 4th teacher returning the student's own detached outputs (logits
            = the student's logits, feature = the student's projected map for that slot, embedding
            = that map's spatial mean), so its KL and MSE are exactly 0. Its description copies
            teacher 0's (feature shape; embedding dim = its channels) under the name ``mirror``.
            Mask: every mirror pair (the three real teachers count as clean).

Strategies: any registered ``distill.strategy`` (``ce``, ``aver``, ``ebkd``, ``camkd``,
``mtkd_rl``), ``mtkd_rl:RULE`` (sets ``agent.rule=RULE``), any of them followed by config overrides
in braces (``mtkd_rl:meta{agent.lr=3,agent.agent_step=10}``), and ``oracle`` (benchmark-only, not
registered): weights uniform over the sample's uncorrupted teachers per the regime's mask, for both
the logit and the feature term; a sample with no uncorrupted teacher gets uniform weights over all.

Paired seeds: seed s fixes the labelled subset, the batch order and augmentation (``seed=s``) and
the student's initialisation, the same for every strategy and regime. The teachers' outputs of a
seed are computed once per (epoch, batch) and kept in memory for every run of that seed; the work
is grouped by seed (one worker process holds one seed's cache; with fewer seeds than workers a
seed's runs are split between workers, each with its own cache). ``ce`` does not use teachers, so
it runs once per seed and is reported in every regime. Each run is deterministic per (regime,
strategy, seed) whatever the scheduling (one torch thread per worker).

Reported per regime and strategy: mean test accuracy over seeds; the paired difference against
``aver`` and against ``oracle`` of the same regime (mean and 95% t-interval, n - 1 degrees of
freedom); the share of the oracle - aver gap recovered; the mean logit weight given to corrupted
pairs (over the run and over the last epoch; 1/M is what ``aver`` gives); per-teacher mean weights;
and, for every regime but R0, ``aver`` there against ``aver`` in R0 (paired: how much the regime
hurts equal weights). Writes every run's numbers to ``--out`` (JSON, rewritten as runs finish) and
a plot of the paired differences to ``--plot``.

Cost (measured on the 2-core CPU machine, one torch thread, demo teachers): a run's first use of a
seed's batches costs about 62 s CPU (46 s of it the three teachers), every later run of that seed
about 25 s CPU (``aver``); the cache holds about 810 MiB per worker process.

    .venv/bin/python benchmarks/weighting.py --quick                     # seconds: a check (CI)
    .venv/bin/python benchmarks/weighting.py --seeds 10 --workers 2      # the full benchmark
    .venv/bin/python benchmarks/weighting.py --seeds 3 --regimes R0,R2,R2rev,R2rev2,R2all,R2feat,R2full,R2full2 \\
        --strategies aver                                              # which R2 form hurts aver
    .venv/bin/python benchmarks/weighting.py --seeds 3 --regimes R1 \\
        --strategies "aver,oracle,mtkd_rl:meta,mtkd_rl:meta{agent.lr=3}" --set agent.agent_step=10
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere (and in spawned workers)
    sys.path.insert(0, str(REPO))

from mtkd.config import ExperimentConfig, apply_overrides, from_dict, to_dict  # noqa: E402
from mtkd.data import derive_seed  # noqa: E402
from mtkd.distill import STRATEGIES, Strategy, StepInputs, Weights, feature_mse, kd_kl, per_sample_ce  # noqa: E402
from mtkd.engine import Distiller, TransformInputs, build_strategy, check_agent_buffer  # noqa: E402
from mtkd.experiment import eval_loader, load_data, train_loader  # noqa: E402
from mtkd.models import Outputs  # noqa: E402
from mtkd.teachers import LocalTeacherPool, load_teacher  # noqa: E402

DEFAULT_OUT = "benchmarks/results/weighting.json"
DEFAULT_PLOT = "benchmarks/results/weighting.png"
QUICK_OUT, QUICK_PLOT = "runs/weighting_quick.json", "runs/weighting_quick.png"
DEFAULT_REGIMES = "R0,R1,R2,R3"
DEFAULT_STRATEGIES = "ce,aver,ebkd,camkd,mtkd_rl:reference,mtkd_rl:reinforce,oracle"
QUICK = {"epochs": 2, "labels": 200, "test_images": 1000, "seeds": 1, "regimes": "R0,R1,R3",
         "strategies": "ce,aver,camkd,mtkd_rl,oracle"}
QUICK_TEACHER = ["data.train_subset=512", "data.test_subset=500", "optim.epochs=1"]
ORACLE = "oracle"


# ===================================================================================== regimes
class Regime:
    """A deterministic teacher transform (the engine's ``teacher_transform``). After each call,
    :attr:`mask` is the step's ``[B, M]`` bool mask of corrupted (sample, teacher) pairs.

    Transforms never write into the tensors they are given (the teachers' outputs are cached and
    shared between runs)."""

    name = ""
    mirror = False  # True: the pool has one more teacher, the mirror, last

    def __init__(self, num_classes: int, num_teachers: int, seed: int, num_samples: int):
        self.num_classes, self.num_teachers = num_classes, num_teachers  # M: the real teachers
        self.seed, self.num_samples = seed, num_samples
        self.mask: torch.Tensor | None = None

    def __call__(self, inputs: TransformInputs) -> list[Outputs]:
        outputs, self.mask = self.transform(inputs)
        return outputs

    def transform(self, inputs: TransformInputs) -> tuple[list[Outputs], torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "mirror": self.mirror}


class Untouched(Regime):
    """R0: the real teachers; a pair is 'corrupted' where the teacher's argmax is not the label."""

    name = "R0"

    def transform(self, inputs):
        mask = torch.stack([t.logits.argmax(1) != inputs.targets for t in inputs.teachers], 1)
        return list(inputs.teachers), mask


def specialist_groups(num_classes: int, num_teachers: int, size: int | None = None) -> list[list[int]]:
    """R1's overlapping class groups: teacher m covers ``size`` (default ``ceil(C / M) + 1``)
    consecutive classes (mod C) from ``round(m C / M)``; every class has an expert when
    ``size >= ceil(C / M)``."""
    size = min(num_classes, size or -(-num_classes // num_teachers) + 1)
    return [sorted({(round(m * num_classes / num_teachers) + j) % num_classes for j in range(size)})
            for m in range(num_teachers)]


def donor_index(targets: torch.Tensor) -> torch.Tensor:
    """``[B]``: for each sample, the next sample of the batch (cyclically) with a different label
    (the next sample when the whole batch has one label)."""
    batch = targets.shape[0]
    offsets = torch.arange(1, max(batch, 2), device=targets.device)
    candidates = (torch.arange(batch, device=targets.device)[:, None] + offsets[None, :]) % batch  # [B, B-1]
    different = targets[candidates] != targets[:, None]
    first = torch.where(different.any(1), different.float().argmax(1), torch.zeros_like(targets))
    return candidates.gather(1, first[:, None])[:, 0]


class Specialists(Regime):
    """R1: teacher m is real on the classes of its group, elsewhere all its outputs are those of the
    donor image (:func:`donor_index`). Mask: the label is outside the teacher's group."""

    name = "R1"

    def __init__(self, *args, group_size: int | None = None):
        super().__init__(*args)
        self.groups = specialist_groups(self.num_classes, self.num_teachers, group_size)
        self.in_group = torch.zeros(self.num_teachers, self.num_classes, dtype=torch.bool)  # [M, C]
        for m, group in enumerate(self.groups):
            self.in_group[m, group] = True

    def transform(self, inputs):
        targets = inputs.targets
        mask = ~self.in_group.to(targets.device)[:, targets].T  # [B, M]
        donor = donor_index(targets)
        outputs = []
        for m, teacher in enumerate(inputs.teachers):
            outputs.append(Outputs(*(_where_rows(mask[:, m], t[donor], t) for t in teacher)))
        return outputs, mask

    def describe(self):
        return {**super().describe(), "groups": self.groups}


def _where_rows(rows: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    return torch.where(rows.view(-1, *([1] * (if_true.dim() - 1))), if_true, if_false)


def scramble_logits(logits: torch.Tensor, targets: torch.Tensor, mode: str,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
    """Rearrange each row of ``logits [B, C]`` keeping its argmax entry and its label's entry in
    place (bit for bit); the other ("free") entries are moved among the free positions:

    * ``permute``: the free values in the order of ``keys [B, C]`` (random numbers in [0, 1)) go to
      the free positions in their natural order;
    * ``reverse``: the free values' ranking is reversed (the largest free value moves to where the
      smallest was, and so on).

    Each row stays the same multiset of values with the same maximum, so its cross-entropy against
    the label, its top probability and its entropy are unchanged (to float rounding of the sums).
    """
    batch, classes = logits.shape
    position = torch.arange(classes, device=logits.device).expand(batch, classes)
    fixed = (position == logits.argmax(1, keepdim=True)) | (position == targets[:, None])
    tail = torch.full_like(logits, math.inf)  # fixed positions sort last, in position order (stable sort)
    if mode == "permute":
        destination_key = torch.where(fixed, tail, position.to(logits.dtype))
        source_key = torch.where(fixed, tail, keys.to(logits.dtype))
    elif mode == "reverse":
        destination_key = torch.where(fixed, tail, -logits)
        source_key = torch.where(fixed, tail, logits)
    else:
        raise ValueError(f"unknown scramble mode {mode!r} (valid: permute, reverse)")
    destination = destination_key.sort(dim=1, stable=True).indices
    source = source_key.sort(dim=1, stable=True).indices
    return torch.empty_like(logits).scatter_(1, destination, logits.gather(1, source))


class Scrambled(Regime):
    """R2 family: for some teachers, the non-argmax, non-label logits scrambled (:func:`scramble_logits`,
    ``mode``; None: logits untouched) and/or (``swap_features``) the embedding and feature map
    replaced by the donor image's (:func:`donor_index`). Either way the teacher's logits keep their
    CE against the label and their confidence. Mask: every pair of a corrupted teacher."""

    mode: str | None = "permute"
    swap_features = False
    teachers: tuple | str | None = None  # which teachers: "r2" (--r2-teacher), indices, or None (every one)

    def __init__(self, *args, teachers: tuple[int, ...] | None = None):
        super().__init__(*args)
        self.scrambled = tuple(range(self.num_teachers)) if teachers is None else tuple(teachers)
        bad = [m for m in self.scrambled if not 0 <= m < self.num_teachers]
        if bad:
            raise ValueError(f"{self.name}: teacher index {bad[0]} out of range (the pool has {self.num_teachers})")
        generator = torch.Generator().manual_seed(derive_seed("weighting-R2", self.seed))
        self.keys = torch.rand(self.num_samples, self.num_classes, generator=generator)  # [N, C] per training sample

    def transform(self, inputs):
        targets = inputs.targets
        keys = None
        if self.mode == "permute":
            if inputs.sample_index is None:
                raise ValueError(f"{self.name} needs the batch's sample_index")
            keys = self.keys.to(targets.device)[inputs.sample_index]
        donor = donor_index(targets) if self.swap_features else None
        outputs = list(inputs.teachers)
        for m in self.scrambled:
            t = outputs[m]
            logits = scramble_logits(t.logits, targets, self.mode, keys) if self.mode else t.logits
            embedding, feature = (t.embedding[donor], t.feature[donor]) if self.swap_features else (t.embedding, t.feature)
            outputs[m] = Outputs(logits, embedding, feature)
        mask = torch.zeros(targets.shape[0], self.num_teachers, dtype=torch.bool, device=targets.device)
        mask[:, list(self.scrambled)] = True
        return outputs, mask

    def describe(self):
        return {**super().describe(), "logits": self.mode, "features_from_donor": self.swap_features,
                "teachers": list(self.scrambled)}


class Mirror(Regime):
    """R3: the real teachers plus a last one that returns the student's own detached outputs. Mask:
    the mirror's pairs."""

    name = "R3"
    mirror = True

    def transform(self, inputs):
        if len(inputs.teachers) != self.num_teachers + 1:
            raise ValueError(f"R3 expects {self.num_teachers} teachers and the mirror's placeholder, "
                             f"got {len(inputs.teachers)} outputs")
        projected = inputs.projected[-1]
        mirror = Outputs(inputs.student.logits, projected.mean(dim=(2, 3)), projected)
        mask = torch.zeros(inputs.targets.shape[0], self.num_teachers + 1, dtype=torch.bool,
                           device=inputs.targets.device)
        mask[:, -1] = True
        return [*inputs.teachers[:-1], mirror], mask


def _scrambled(name: str, mode: str | None, teachers, swap_features: bool = False) -> type:
    return type(f"Scrambled_{name}", (Scrambled,), {"name": name, "mode": mode, "teachers": teachers,
                                                    "swap_features": swap_features})


REGIMES: dict[str, type] = {
    "R0": Untouched,
    "R1": Specialists,
    "R2": _scrambled("R2", "permute", "r2"),
    "R2rev": _scrambled("R2rev", "reverse", "r2"),
    "R2rev2": _scrambled("R2rev2", "reverse", (0, 1)),
    "R2all": _scrambled("R2all", "reverse", None),
    "R2feat": _scrambled("R2feat", None, "r2", swap_features=True),
    "R2full": _scrambled("R2full", "reverse", "r2", swap_features=True),
    "R2full2": _scrambled("R2full2", "reverse", (0, 1), swap_features=True),
    "R3": Mirror,
}


def make_regime(name: str, num_classes: int, num_teachers: int, seed: int, num_samples: int,
                r2_teacher: int = 0, r1_group_size: int | None = None) -> Regime:
    """The regime ``name`` for a pool of ``num_teachers`` real teachers."""
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r} (valid: {', '.join(REGIMES)})")
    cls = REGIMES[name]
    args = (num_classes, num_teachers, seed, num_samples)
    if issubclass(cls, Scrambled):
        teachers = cls.teachers
        if teachers == "r2":
            teachers = (r2_teacher,)
        elif teachers is not None:
            teachers = tuple(m for m in teachers if m < num_teachers)[: max(1, num_teachers - 1)]
        return cls(*args, teachers=teachers)
    if cls is Specialists:
        return cls(*args, group_size=r1_group_size)
    return cls(*args)


# ==================================================================================== oracle
class OracleWeights(Strategy):
    """Benchmark-only (not registered): weights uniform over the sample's uncorrupted teachers per
    the regime's mask of this step, for the logit and the feature term; uniform over all teachers
    for a sample with none uncorrupted."""

    def __init__(self, regime: Regime):
        self.regime = regime

    def weights(self, inputs: StepInputs) -> Weights:
        clean = ~self.regime.mask  # [B, M]
        clean = torch.where(clean.any(1, keepdim=True), clean, torch.ones_like(clean))
        w = clean.float() / clean.sum(1, keepdim=True).float()
        return Weights(w, w)


# ================================================================================ strategies
@dataclass
class StrategySpec:
    """One strategy of the command line: ``name[:rule][{key=value,...}]``."""

    label: str
    name: str
    rule: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def oracle(self) -> bool:
        return self.name == ORACLE

    @property
    def uses_teachers(self) -> bool:
        return self.oracle or STRATEGIES.get(self.name).uses_teachers

    def config_overrides(self) -> list[str]:
        out = [f"distill.strategy={'aver' if self.oracle else self.name}"]  # the oracle replaces aver's strategy
        if self.rule:
            out.append(f"agent.rule={self.rule}")
        return out + self.overrides


_SPEC = re.compile(r"^(?P<name>[A-Za-z_][\w]*)(?::(?P<rule>[\w]+))?(?:\{(?P<over>[^{}]*)\})?$")


def split_top_level(text: str) -> list[str]:
    """Split on commas outside braces."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_strategies(text: str) -> list[StrategySpec]:
    """``"ce,aver,mtkd_rl:meta{agent.lr=3,agent.agent_step=10},oracle"`` -> specs; checks the names
    (a rule is checked when the strategy is built, see :func:`check_buildable`)."""
    specs = []
    for item in split_top_level(text):
        match = _SPEC.match(item)
        if not match:
            raise SystemExit(f"--strategies: cannot read {item!r}; expected name, name:rule or "
                             f"name:rule{{key=value,...}}")
        name, rule, over = match["name"], match["rule"], match["over"]
        if name != ORACLE and name not in STRATEGIES:
            raise SystemExit(f"--strategies: unknown strategy {name!r} "
                             f"(valid: {', '.join(STRATEGIES.names())}, {ORACLE})")
        if rule and (name == ORACLE or not STRATEGIES.get(name).needs_agent):
            raise SystemExit(f"--strategies: {item!r}: only a strategy with an agent takes a rule (mtkd_rl:RULE)")
        overrides = [o.strip() for o in (over or "").split(",") if o.strip()]
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise SystemExit(f"--strategies: {item!r}: override {bad[0]!r} must look like key.sub=value")
        specs.append(StrategySpec(item, name, rule, overrides))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--strategies: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))} given twice")
    return specs


def run_config(base: dict, spec: StrategySpec, seed: int, extra: list[str]) -> ExperimentConfig:
    """The student's experiment of one run: the base config, ``--set`` overrides, the strategy's."""
    return from_dict(ExperimentConfig, apply_overrides(copy.deepcopy(base), [*extra, *spec.config_overrides(),
                                                                             f"seed={seed}"]))


def check_buildable(base: dict, specs: list[StrategySpec], extra: list[str], num_classes: int) -> None:
    """Build every strategy once on a dummy pool, so that an unknown rule (``mtkd_rl:meta`` before the
    rule exists) or a bad override stops the benchmark before any run, with the library's message."""
    dummy = [{"name": f"t{m}", "embedding_dim": 4, "feature_shape": (4, 2, 2)} for m in range(2)]
    for spec in specs:
        try:
            config = run_config(base, spec, 0, extra)
            build_strategy(config, dummy, num_classes)
        except Exception as exc:  # noqa: BLE001 (any failure here is the user's spec)
            raise SystemExit(f"--strategies {spec.label!r}: {type(exc).__name__}: {exc}") from None


# ======================================================================= teacher output cache
class TeacherOutputCache:
    """The real teachers' outputs of one seed, computed once per (epoch, batch) and kept in memory.

    The key is ``(epoch, batch.index)``: for one seed the loader's batches depend only on those; each
    hit also checks the stored sample indices against the batch's."""

    def __init__(self, pool: LocalTeacherPool, seed: int):
        self.pool, self.seed = pool, seed
        self.descriptions = pool.describe()
        self.store: dict[tuple[int, int], tuple[torch.Tensor, list[Outputs]]] = {}
        self.hits = self.misses = 0
        self.compute_seconds = 0.0

    def outputs(self, epoch: int, batch) -> list[Outputs]:
        key = (epoch, int(batch.index))
        entry = self.store.get(key)
        if entry is not None:
            index, outputs = entry
            if not torch.equal(index, batch.sample_index.cpu()):
                raise RuntimeError(f"teacher output cache of seed {self.seed}: batch {key} holds other samples")
            self.hits += 1
            return outputs
        start = time.perf_counter()
        outputs = [Outputs(*(t.float().contiguous() for t in o)) for o in self.pool.collect(batch)]
        self.compute_seconds += time.perf_counter() - start
        self.store[key] = (batch.sample_index.cpu().clone(), outputs)
        self.misses += 1
        return outputs

    def nbytes(self) -> int:
        return sum(index.nbytes + sum(t.nbytes for o in outs for t in o) for index, outs in self.store.values())


class CachedPool:
    """A :class:`mtkd.teachers.TeacherPool` over a :class:`TeacherOutputCache`; set :attr:`epoch`
    before each epoch. With ``mirror``, a last teacher ``mirror`` (teacher 0's description, embedding
    dim = its feature channels) whose outputs are a placeholder that the R3 transform replaces.

    Device batches are accepted: the wrapped :class:`LocalTeacherPool` accepts them and the cache
    keys on the batch index, comparing sample indices on the CPU."""

    accepts_device_batches = True

    def __init__(self, cache: TeacherOutputCache, mirror: bool = False):
        self.cache, self.mirror = cache, mirror
        self.epoch = 0

    def describe(self) -> list[dict]:
        descriptions = [dict(d) for d in self.cache.descriptions]
        if self.mirror:
            first = descriptions[0]
            descriptions.append({**first, "name": "mirror", "model": "mirror", "digest": "mirror",
                                 "embedding_dim": int(first["feature_shape"][0])})
        return descriptions

    def submit(self, batch):
        return batch

    def collect(self, batch) -> list[Outputs]:
        outputs = list(self.cache.outputs(self.epoch, batch))
        if self.mirror:
            outputs.append(Outputs(None, None, None))  # replaced by the R3 transform
        return outputs

    def take_stats(self) -> dict[str, float]:
        return {}  # the cache's hits and misses are the benchmark's, not the run's metrics

    def close(self) -> None:
        pass  # the cache outlives the pool: every run of the seed shares it


# ============================================================================ one run
class WeightRecorder:
    """Wraps a strategy's ``weights`` to sum, per epoch, the logit weight given to corrupted pairs
    (per the regime's mask of the step) and every teacher's logit and feature weights."""

    def __init__(self, strategy: Strategy, regime: Regime):
        self.regime, self.inner = regime, strategy.weights
        strategy.weights = self  # an instance attribute: the engine now calls the recorder
        self.epochs: list[dict] = []

    def start_epoch(self) -> None:
        self.epochs.append({"corrupted_weight": 0.0, "corrupted_pairs": 0, "clean_weight": 0.0, "pairs": 0,
                            "samples": 0, "logit": None, "feature": None})

    def __call__(self, inputs: StepInputs) -> Weights:
        weights = self.inner(inputs)
        mask = self.regime.mask
        wl, wf = weights.logit.detach().double(), weights.feature.detach().double()
        e = self.epochs[-1]
        e["corrupted_weight"] += float(wl[mask].sum())
        e["clean_weight"] += float(wl[~mask].sum())
        e["corrupted_pairs"] += int(mask.sum())
        e["pairs"] += mask.numel()
        e["samples"] += wl.shape[0]
        sums = (wl.sum(0), wf.sum(0))
        e["logit"] = sums[0] if e["logit"] is None else e["logit"] + sums[0]
        e["feature"] = sums[1] if e["feature"] is None else e["feature"] + sums[1]
        return weights

    @staticmethod
    def summary(epochs: list[dict], names: list[str]) -> dict:
        """Mean corrupted-pair and clean-pair logit weight, corrupted fraction, per-teacher weights."""
        epochs = [e for e in epochs if e["samples"]]
        if not epochs:
            return {"corrupted_weight": None, "clean_weight": None, "corrupted_fraction": None,
                    "teacher_weights": None}
        corrupted, pairs = sum(e["corrupted_pairs"] for e in epochs), sum(e["pairs"] for e in epochs)
        samples = sum(e["samples"] for e in epochs)
        logit, feature = sum(e["logit"] for e in epochs) / samples, sum(e["feature"] for e in epochs) / samples
        return {
            "corrupted_weight": sum(e["corrupted_weight"] for e in epochs) / corrupted if corrupted else None,
            "clean_weight": sum(e["clean_weight"] for e in epochs) / (pairs - corrupted) if pairs > corrupted else None,
            "corrupted_fraction": corrupted / pairs,
            "teacher_weights": {"logit": dict(zip(names, logit.tolist())),
                                "feature": dict(zip(names, feature.tolist()))},
        }


@dataclass
class SeedData:
    seed: int
    train_set: object
    test_set: object
    cache: TeacherOutputCache | None = None


def run_one(base: dict, spec: StrategySpec, regime_name: str, data: SeedData, pool: LocalTeacherPool,
            options: dict) -> dict:
    """Train and test one (regime, strategy, seed); returns its record."""
    start, cpu_start = time.perf_counter(), time.process_time()
    seed = data.seed
    config = run_config(base, spec, seed, options["set"])
    torch.manual_seed(seed)  # the global RNG (reinforce's draws): the same wherever the run is scheduled
    train_set, test_set = data.train_set, data.test_set
    num_classes = train_set.num_classes
    descriptions = pool.describe()
    regime = make_regime(regime_name, num_classes, len(descriptions), seed, len(train_set), options["r2_teacher"],
                         options["r1_group_size"])
    if data.cache is None:
        data.cache = TeacherOutputCache(pool, seed)
    cached = CachedPool(data.cache, mirror=regime.mirror)
    teacher_seconds = data.cache.compute_seconds
    distiller = Distiller(config, cached, num_classes, train_set.image_shape, device=options["device"],
                          teacher_transform=regime if spec.uses_teachers else None)
    if spec.oracle:
        distiller.strategy = OracleWeights(regime)
    recorder = WeightRecorder(distiller.strategy, regime) if spec.uses_teachers else None
    check_agent_buffer(config, distiller.descriptions, num_classes, len(train_set) // config.data.batch_size)
    train_ld, test_ld = train_loader(train_set, config.data, seed), eval_loader(test_set, config.data)
    history = []
    for epoch in range(config.optim.epochs):
        cached.epoch = epoch
        if recorder is not None:
            recorder.start_epoch()
        metrics = distiller.train_epoch(train_ld)
        record = {"epoch": epoch + 1, "train_acc": metrics["train/acc"], "loss": metrics["loss/total"]}
        if options["eval_every_epoch"] or epoch == config.optim.epochs - 1:
            record["test_acc"] = distiller.evaluate(test_ld)["test/acc"]
        if recorder is not None:
            record.update(WeightRecorder.summary(recorder.epochs[-1:], distiller.teacher_names))
        history.append(record)
    weights = (WeightRecorder.summary(recorder.epochs, distiller.teacher_names) if recorder is not None
               else WeightRecorder.summary([], []))
    return {
        "regime": regime_name, "strategy": spec.label, "seed": seed, "test_acc": history[-1]["test_acc"],
        "corrupted_weight": weights["corrupted_weight"],
        "corrupted_weight_last_epoch": history[-1].get("corrupted_weight"),
        "clean_weight": weights["clean_weight"], "corrupted_fraction": weights["corrupted_fraction"],
        "teacher_weights": weights["teacher_weights"],
        "teacher_weights_last_epoch": history[-1].get("teacher_weights"),
        "num_teachers": len(distiller.teacher_names),
        "wall_s": round(time.perf_counter() - start, 3),
        "cpu_s": round(time.process_time() - cpu_start, 3),  # this process's CPU time: the cost on a busy machine
        "teacher_compute_s": round(data.cache.compute_seconds - teacher_seconds, 3),
        "history": history,
    }


# ============================================================================= workers
_WORKER: dict = {}


def init_worker(teacher_paths: list[str], device: str, threads: int) -> None:
    """Per process: one torch thread, the teachers loaded once."""
    torch.set_num_threads(threads)
    _WORKER["pool"] = LocalTeacherPool([load_teacher(p, device=device, precision="fp32") for p in teacher_paths])
    _WORKER["data"] = None


def run_task(task: dict) -> dict:
    """One seed's share of the runs (in order), on the worker's cache of that seed's teacher outputs."""
    torch.set_num_threads(task["options"]["threads"])
    seed, base = task["seed"], task["base"]
    data = _WORKER.get("data")
    if data is None or data.seed != seed:
        _WORKER["data"] = None  # free the previous seed's cache first
        config = from_dict(ExperimentConfig, apply_overrides(copy.deepcopy(base), [*task["options"]["set"],
                                                                                   f"seed={seed}"]))
        train_set, test_set = load_data(config.data, seed)
        data = _WORKER["data"] = SeedData(seed, train_set, test_set)
    records = []
    for regime_name, spec in task["runs"]:
        record = run_one(base, spec, regime_name, data, _WORKER["pool"], task["options"])
        print(f"[weighting] seed {seed} {regime_name:<7} {spec.label:<22} acc {record['test_acc'] * 100:6.2f}%  "
              f"corrupted w {_fmt(record['corrupted_weight'], '.3f')}  ({record['wall_s']:.0f} s, "
              f"{record['cpu_s']:.0f} s CPU)",
              file=sys.stderr, flush=True)
        records.append(record)
    cache = data.cache
    return {"seed": seed, "records": records, "pid": os.getpid(),
            "cache": {"seed": seed, "bytes": cache.nbytes() if cache else 0,
                      "batches": len(cache.store) if cache else 0,
                      "hits": cache.hits if cache else 0, "misses": cache.misses if cache else 0,
                      "compute_s": round(cache.compute_seconds, 2) if cache else 0.0}}


def plan_tasks(seeds: list[int], regimes: list[str], specs: list[StrategySpec], workers: int) -> list[list]:
    """Per seed the runs ``[(regime, spec)]`` (``ce`` once, under the first regime), split into
    ``ceil(workers / len(seeds))`` chunks when there are fewer seeds than workers."""
    runs = []
    for spec in specs:
        for regime in regimes:
            runs.append((regime, spec))
            if not spec.uses_teachers:
                break  # the same run in every regime
    chunks = max(1, min(len(runs), -(-workers // len(seeds))))
    per_seed = [runs[i::chunks] for i in range(chunks)]
    return [(seed, chunk) for seed in seeds for chunk in per_seed if chunk]


# ============================================================================ statistics
def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom, from the exact closed-form
    CDF for integer df (Abramowitz & Stegun 26.7.3/26.7.4), by bisection."""
    if df < 1:
        raise ValueError("df must be >= 1")

    def central(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        s, c = math.sin(theta), math.cos(theta)
        if df == 1:
            return 2 * theta / math.pi
        if df % 2:  # odd
            term, total = c, c
            for k in range(3, df - 1, 2):
                term *= c * c * (k - 1) / k
                total += term
            return 2 / math.pi * (theta + s * total)
        term, total = 1.0, 1.0
        for k in range(2, df, 2):
            term *= c * c * (k - 1) / k
            total += term
        return s * total

    low, high = 0.0, 1000.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if central(mid) < 0.95 else (low, mid)
    return (low + high) / 2


def paired(a: list[float], b: list[float]) -> dict | None:
    """Mean of ``a - b`` (paired, in points when given in points) with its 95% t-interval."""
    diffs = [x - y for x, y in zip(a, b)]
    if not diffs:
        return None
    n, mean = len(diffs), statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None, "sd": None}
    sd = statistics.stdev(diffs)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "sd": sd}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(records: list[dict], regimes: list[str], labels: list[str]) -> dict:
    """Per regime and strategy: accuracy, paired differences, gap share, corrupted weight."""
    by = {}
    for r in records:
        by.setdefault((r["regime"], r["strategy"]), {})[r["seed"]] = r
    summary = {}
    for regime in regimes:
        rows = {}
        aver, oracle = by.get((regime, "aver"), {}), by.get((regime, ORACLE), {})
        for label in labels:
            runs = by.get((regime, label), {})
            if not runs:
                continue
            seeds = sorted(runs)
            acc = {s: runs[s]["test_acc"] * 100 for s in seeds}

            def against(other: dict) -> dict | None:
                common = [s for s in seeds if s in other]
                if not common:
                    return None
                return paired([acc[s] for s in common], [other[s]["test_acc"] * 100 for s in common])

            vs_aver, vs_oracle = against(aver), against(oracle)
            gap = against_gap = None
            common = [s for s in seeds if s in aver and s in oracle]
            if common:
                gap = statistics.fmean(oracle[s]["test_acc"] * 100 - aver[s]["test_acc"] * 100 for s in common)
                own = statistics.fmean(acc[s] - aver[s]["test_acc"] * 100 for s in common)
                against_gap = own / gap if gap > 0 else None
            teacher_weights = None
            if runs[seeds[0]]["teacher_weights"]:
                names = list(runs[seeds[0]]["teacher_weights"]["logit"])
                teacher_weights = {kind: {n: _mean(runs[s]["teacher_weights"][kind][n] for s in seeds) for n in names}
                                   for kind in ("logit", "feature")}
            rows[label] = {
                "seeds": seeds, "acc_mean_pct": statistics.fmean(acc.values()),
                "acc_sd_pct": statistics.stdev(acc.values()) if len(acc) > 1 else None,
                "vs_aver_pts": vs_aver, "vs_oracle_pts": vs_oracle,
                "oracle_minus_aver_pts": gap, "gap_recovered": against_gap,
                "corrupted_weight": _mean(runs[s]["corrupted_weight"] for s in seeds),
                "corrupted_weight_last_epoch": _mean(runs[s]["corrupted_weight_last_epoch"] for s in seeds),
                "uniform_weight": 1 / runs[seeds[0]]["num_teachers"] if runs[seeds[0]]["teacher_weights"] else None,
                "corrupted_fraction": _mean(runs[s]["corrupted_fraction"] for s in seeds),
                "teacher_weights": teacher_weights,
                "wall_s_mean": statistics.fmean(runs[s]["wall_s"] for s in seeds),
                "cpu_s_mean": _mean(runs[s].get("cpu_s") for s in seeds),
            }
        entry = {"strategies": rows}
        if regime != "R0":
            here, r0 = by.get((regime, "aver"), {}), by.get(("R0", "aver"), {})
            common = [s for s in sorted(here) if s in r0]
            entry["aver_vs_R0_aver_pts"] = (paired([here[s]["test_acc"] * 100 for s in common],
                                                   [r0[s]["test_acc"] * 100 for s in common]) if common else None)
        summary[regime] = entry
    return summary


# ================================================================================ report
def _fmt(value, spec: str = "+.2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _interval(d: dict | None) -> str:
    if d is None:
        return "-"
    if d["low"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def table(summary: dict) -> str:
    """The readable report: one block per regime."""
    head = (f"{'strategy':<26}{'acc %':>8}{'vs aver (95% CI)':>24}{'vs oracle (95% CI)':>24}{'gap rec.':>9}"
            f"{'w corrupt':>10}{'last ep':>8}{'1/M':>6}")
    lines = []
    for regime, entry in summary.items():
        lines += ["", f"== {regime} ==", head, "-" * len(head)]
        for label, row in entry["strategies"].items():
            lines.append(f"{label:<26}{row['acc_mean_pct']:>8.2f}{_interval(row['vs_aver_pts']):>24}"
                         f"{_interval(row['vs_oracle_pts']):>24}{_fmt(row['gap_recovered'], '.2f'):>9}"
                         f"{_fmt(row['corrupted_weight'], '.3f'):>10}"
                         f"{_fmt(row['corrupted_weight_last_epoch'], '.3f'):>8}"
                         f"{_fmt(row['uniform_weight'], '.3f'):>6}")
        if "aver_vs_R0_aver_pts" in entry:
            lines.append(f"aver here vs aver in R0 (paired): {_interval(entry['aver_vs_R0_aver_pts'])} points")
    return "\n".join(lines).lstrip("\n")


def draw(summary: dict, records: list[dict], path: Path, title: str) -> None:
    """Per regime, each strategy's paired difference against aver (points) with its 95% interval
    and the seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in summary if summary[r]["strategies"]]
    if not regimes:
        return
    labels = list(dict.fromkeys(label for r in regimes for label in summary[r]["strategies"]))
    acc = {(r["regime"], r["strategy"], r["seed"]): r["test_acc"] * 100 for r in records}
    fig, axes = plt.subplots(1, len(regimes), figsize=(3.4 * len(regimes) + 1.5, 0.45 * len(labels) + 1.8),
                             sharey=True, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        rows = summary[regime]["strategies"]
        for y, label in enumerate(labels):
            d = rows.get(label, {}).get("vs_aver_pts")
            if d is None:
                continue
            color = "tab:green" if label == ORACLE else "tab:blue" if label.startswith("mtkd_rl") else "tab:gray"
            if d["low"] is not None:
                ax.errorbar(d["mean"], y, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                            color=color, capsize=3)
            else:
                ax.plot(d["mean"], y, "o", color=color)
            dots = [acc[(regime, label, s)] - acc[(regime, "aver", s)] for s in rows[label]["seeds"]
                    if (regime, "aver", s) in acc]
            ax.plot(dots, [y + 0.2] * len(dots), ".", color="k", ms=3, alpha=0.5)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(regime)
        ax.set_xlabel("vs aver (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ self-check
def self_check(base: dict, pool: LocalTeacherPool, train_set, options: dict) -> dict:
    """The regimes' promises on one real batch of seed 0 with the real teachers: R2's scrambles keep
    CE and top probability (and the argmax and label logits bit for bit); R1's mask is the groups'
    and its corrupted outputs are the donor's; the mirror's KL and MSE are 0 in an engine step; the
    oracle gives corrupted pairs weight 0 where a sample has an uncorrupted teacher."""
    from mtkd.data import Batch

    config = from_dict(ExperimentConfig, apply_overrides(copy.deepcopy(base), [*options["set"], "seed=0",
                                                                               "distill.strategy=aver"]))
    loader = train_loader(train_set, config.data, 0)
    batch: Batch = next(iter(loader))
    teachers = [Outputs(*(t.float() for t in o)) for o in pool.collect(batch)]
    num_classes, num_teachers = train_set.num_classes, len(teachers)
    checks: dict = {}
    dummy = Outputs(*(torch.zeros(1) for _ in range(3)))
    inputs = TransformInputs(batch.sample_index, batch.labels, dummy, [], teachers)
    for name in [n for n in REGIMES if n.startswith("R2")]:
        regime = make_regime(name, num_classes, num_teachers, 0, len(train_set), options["r2_teacher"])
        out = regime(inputs)
        rows = []
        for m, (before, after) in enumerate(zip(teachers, out)):
            zb, za = before.logits, after.logits
            top = zb.argmax(1)
            rows.append({
                "teacher": m, "corrupted": bool(regime.mask[:, m].all()),
                "logits_changed_fraction": float((za != zb).any(1).float().mean()),
                "features_changed_fraction": float((after.feature != before.feature).flatten(1).any(1).float().mean()),
                "features_are_donors": bool(torch.equal(after.feature, before.feature[donor_index(batch.labels)])
                                            and torch.equal(after.embedding,
                                                            before.embedding[donor_index(batch.labels)])),
                "ce_max_abs_diff": float((per_sample_ce(za, batch.labels)
                                          - per_sample_ce(zb, batch.labels)).abs().max()),
                "top_prob_max_abs_diff": float((za.softmax(1).max(1).values - zb.softmax(1).max(1).values).abs().max()),
                "argmax_kept": bool(torch.equal(za.argmax(1), top)),
                "argmax_and_label_logits_bitwise": bool(
                    torch.equal(za.gather(1, top[:, None]), zb.gather(1, top[:, None]))
                    and torch.equal(za.gather(1, batch.labels[:, None]), zb.gather(1, batch.labels[:, None]))),
                "same_values_sorted": bool(torch.equal(za.sort(1).values, zb.sort(1).values)),
            })
        checks[name] = rows
    r1 = make_regime("R1", num_classes, num_teachers, 0, len(train_set), r1_group_size=options["r1_group_size"])
    out = r1(inputs)
    expected = torch.tensor([[batch.labels[i].item() not in g for g in r1.groups] for i in range(len(batch.labels))])
    donor = donor_index(batch.labels)
    donor_ok = all(torch.equal(out[m].logits[i], teachers[m].logits[donor[i]]) if r1.mask[i, m]
                   else torch.equal(out[m].logits[i], teachers[m].logits[i])
                   for m in range(num_teachers) for i in range(len(batch.labels)))
    checks["R1"] = {"groups": r1.groups, "mask_matches_groups": bool(torch.equal(r1.mask, expected)),
                    "covers_every_class": sorted({c for g in r1.groups for c in g}) == list(range(num_classes)),
                    "donor_labels_differ": bool((batch.labels[donor] != batch.labels).all()),
                    "corrupted_outputs_are_donors": donor_ok}
    cache = TeacherOutputCache(pool, 0)
    for regime_name, strategy in (("R3", "aver"), ("R3", ORACLE), ("R1", ORACLE), ("R0", ORACLE)):
        regime = make_regime(regime_name, num_classes, num_teachers, 0, len(train_set),
                             r1_group_size=options["r1_group_size"])
        seen = {}

        def spy(ti, regime=regime, seen=seen):
            outputs = regime(ti)
            seen["kl"] = kd_kl(ti.student.logits, outputs[-1].logits, config.distill.temperature)
            seen["mse"] = feature_mse(ti.projected[-1], outputs[-1].feature)
            return outputs

        torch.manual_seed(0)
        pool_view = CachedPool(cache, mirror=regime.mirror)
        distiller = Distiller(config, pool_view, num_classes, train_set.image_shape, device=options["device"],
                              teacher_transform=spy)
        if strategy == ORACLE:
            distiller.strategy = OracleWeights(regime)
        recorded = {}
        inner = distiller.strategy.weights

        def record(step_inputs, inner=inner, recorded=recorded):
            recorded["w"] = inner(step_inputs)
            return recorded["w"]

        distiller.strategy.weights = record
        teacher_outputs = pool_view.collect(batch)
        result = distiller.step(batch.images, batch.labels, teacher_outputs, batch.sample_index)
        key = f"{regime_name}_{strategy}"
        w, mask = recorded["w"].logit, regime.mask
        has_clean = (~mask).any(1)
        checks[key] = {"loss_finite": math.isfinite(result.loss), "rows_sum_to_1": float((w.sum(1) - 1).abs().max()),
                       "corrupted_fraction": float(mask.float().mean())}
        if regime_name == "R3":
            checks[key].update({"mirror_kl_max": float(seen["kl"].abs().max()),
                                "mirror_mse_max": float(seen["mse"].abs().max()),
                                "mirror_name": distiller.teacher_names[-1]})
        if strategy == ORACLE:
            checks[key].update({
                "max_corrupted_weight_where_clean_exists": float(w[has_clean][mask[has_clean]].max())
                if mask[has_clean].any() else 0.0,
                "samples_without_clean_teacher": int((~has_clean).sum()),
                "feature_equals_logit": bool(torch.equal(recorded["w"].feature, w))})
    return checks


# =================================================================================== main
def teacher_folders(args, demo) -> list[str]:
    """The pool's checkpoint folders: ``--teachers``, or the demo's (cached or trained as by ``mtkd demo``)."""
    if args.teachers:
        return list(args.teachers)
    from services.demo import cached_teacher

    folders = []
    for model in demo.teacher_models:
        cfg = copy.deepcopy(demo.teacher)
        cfg.model = model
        folders.append(cached_teacher(cfg, Path(demo.cache_dir))["path"])
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="the demo config")
    parser.add_argument("--teachers", nargs="+", help="teacher checkpoint folders (default: the demo's teachers)")
    parser.add_argument("--regimes", default=None,
                        help=f"comma list of {', '.join(REGIMES)} (default {DEFAULT_REGIMES})")
    parser.add_argument("--strategies", default=None, help=f"comma list (default {DEFAULT_STRATEGIES})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the student's experiment for every run (repeatable), e.g. agent.lr=3")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead of --seeds")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's, 15)")
    parser.add_argument("--labels", type=int, default=None,
                        help="labelled training images (default: the config's, 1000)")
    parser.add_argument("--test-images", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--r2-teacher", type=int, default=0,
                        help="the teacher R2, R2rev, R2feat and R2full corrupt (default 0)")
    parser.add_argument("--r1-group-size", type=int, default=None,
                        help="classes per R1 specialist (default ceil(C / M) + 1: 5 of 10 with 3 teachers)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--device", default="cpu", help="student and teacher device (default cpu)")
    parser.add_argument("--eval-every-epoch", action="store_true", help="also test after every epoch")
    parser.add_argument("--out", default=None, help=f"the JSON report (default {DEFAULT_OUT})")
    parser.add_argument("--plot", default=None, help=f"the plot (default {DEFAULT_PLOT})")
    parser.add_argument("--update", metavar="REPORT", default=None,
                        help="replace these runs' rows (same regime, strategy, seed) in an earlier report made with "
                             "the same teachers, epochs, labels and test images, keep its other rows, and write the "
                             "merged report (to --out, default REPORT)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny: {QUICK['epochs']} epochs, {QUICK['labels']} labels, {QUICK['test_images']} test "
                             f"images, 1 seed, {QUICK['regimes']}, {QUICK['strategies']}; writes {QUICK_OUT}")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    from services.demo import DemoConfig

    raw = yaml.safe_load(Path(args.config).read_text())
    if args.quick and not args.teachers:
        raw = apply_overrides(raw, [f"teacher.{o}" for o in QUICK_TEACHER])
    demo = from_dict(DemoConfig, raw)
    q = QUICK if args.quick else {}
    epochs = args.epochs or q.get("epochs") or demo.student.optim.epochs
    labels = args.labels or q.get("labels") or demo.student.data.train_subset
    test_images = args.test_images or q.get("test_images")
    seeds = args.seed_list or list(range(args.seeds or q.get("seeds") or 10))
    regimes = split_top_level(args.regimes or q.get("regimes") or DEFAULT_REGIMES)
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise SystemExit(f"--regimes: unknown regime {unknown[0]!r} (valid: {', '.join(REGIMES)})")
    specs = parse_strategies(args.strategies or q.get("strategies") or DEFAULT_STRATEGIES)
    base = json.loads(json.dumps(to_dict(demo.student)))
    base = apply_overrides(base, [f"optim.epochs={epochs}", f"data.train_subset={labels}",
                                  f"data.test_subset={test_images if test_images else 'null'}",
                                  "runtime.runtime=inprocess", f"runtime.device={args.device}",
                                  "runtime.teacher_precision=fp32", f"runtime.threads={args.threads}",
                                  "cache.url=null", "teachers=[]"])
    if args.quick:
        base = apply_overrides(base, ["optim.milestones=[1]"])
    num_classes = 10
    check_buildable(base, specs, args.set, num_classes)
    out = Path(args.out or args.update or (QUICK_OUT if args.quick else DEFAULT_OUT))
    earlier = read_report(Path(args.update)) if args.update else None
    # with --update, runs in progress go beside the report: it is replaced only once the merge is done
    progress_out = out.with_name(out.stem + ".partial" + out.suffix) if args.update else out
    plot = Path(args.plot or (QUICK_PLOT if args.quick else DEFAULT_PLOT))
    folders = teacher_folders(args, demo)
    options = {"set": list(args.set), "device": args.device, "threads": args.threads,
               "eval_every_epoch": args.eval_every_epoch, "r2_teacher": args.r2_teacher,
               "r1_group_size": args.r1_group_size}

    # the promises of the regimes, on a real batch (main process, before the workers start)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    init_worker(folders, args.device, args.threads)
    pool = _WORKER["pool"]
    check_config = from_dict(ExperimentConfig, apply_overrides(copy.deepcopy(base), [*args.set, "seed=0"]))
    train_set, _ = load_data(check_config.data, 0)
    num_classes = train_set.num_classes
    checks = self_check(base, pool, train_set, options)
    descriptions = pool.describe()
    _WORKER.clear()
    torch.set_num_threads(threads)

    tasks = [{"seed": seed, "runs": runs, "base": base, "options": options}
             for seed, runs in plan_tasks(seeds, regimes, specs, args.workers)]
    report = {
        "settings": {"config": args.config, "quick": args.quick, "epochs": epochs, "labels": labels,
                     "test_images": test_images or "all", "seeds": seeds, "regimes": regimes,
                     "strategies": [s.label for s in specs], "set": args.set, "workers": args.workers,
                     "threads_per_worker": args.threads, "device": args.device, "r2_teacher": args.r2_teacher,
                     "r1_group_size": args.r1_group_size,
                     "student": base["student"], "batch_size": base["data"]["batch_size"]},
        "teachers": [{"name": d["name"], "model": d["model"], "path": p, "digest": d["digest"]}
                     for d, p in zip(descriptions, folders)],
        "regimes": {name: make_regime(name, num_classes, len(descriptions), 0, 1, args.r2_teacher,
                                      args.r1_group_size).describe()
                    for name in regimes},
        "checks": checks, "runs": [], "cache": [], "summary": {}, "wall_seconds": None,
    }
    print(f"[weighting] {len(seeds)} seed(s) x {len(regimes)} regime(s) x {len(specs)} strategies in {len(tasks)} "
          f"task(s) on {min(args.workers, len(tasks))} worker(s)", file=sys.stderr, flush=True)

    def finished(result: dict) -> None:
        report["runs"].extend(result["records"])
        report["cache"].append({**result["cache"], "pid": result["pid"]})
        print(f"[weighting] seed {result['seed']}: teacher output cache {result['cache']['bytes'] / 2**20:.0f} MiB "
              f"({result['cache']['batches']} batches)", file=sys.stderr, flush=True)
        write(report, progress_out)

    if args.workers <= 1 or len(tasks) == 1:  # in this process, with the teachers already loaded
        torch.set_num_threads(args.threads)
        _WORKER.update(pool=pool, data=None)
        for task in tasks:
            finished(run_task(task))
        _WORKER.clear()
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(args.workers, len(tasks)), init_worker, (folders, args.device, args.threads),
                          maxtasksperchild=None) as workers:
            for result in workers.imap_unordered(run_task, tasks):
                finished(result)
    torch.set_num_threads(threads)

    # ce does not use the teachers: its run (under the first regime) is every regime's ce
    for spec in specs:
        if not spec.uses_teachers:
            shared = [r for r in report["runs"] if r["strategy"] == spec.label]
            report["runs"] += [{**r, "regime": regime, "shared_from": r["regime"]} for r in shared
                               for regime in regimes if regime != r["regime"]]
    strategy_labels = [s.label for s in specs]
    if args.update:
        regimes, strategy_labels = merge_into(report, earlier, args.update, regimes, strategy_labels)
    report["runs"].sort(key=lambda r: (regimes.index(r["regime"]), strategy_labels.index(r["strategy"]),
                                       r["seed"]))
    report["summary"] = summarise(report["runs"], regimes, strategy_labels)
    cache_bytes = [c["bytes"] for c in report["cache"]]
    report["cache_summary"] = {"max_bytes_per_process": max(cache_bytes, default=0),
                               "max_mib_per_process": round(max(cache_bytes, default=0) / 2**20, 1)}
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    write(report, out)
    if progress_out != out:
        progress_out.unlink(missing_ok=True)
    title = (f"{base['student']}, {labels} labels, {epochs} epochs, {len(seeds)} seed(s): paired difference "
             f"against aver, 95% t-interval")
    draw(report["summary"], report["runs"], plot, title)
    print(table(report["summary"]), file=sys.stderr)
    mib = report["cache_summary"]["max_mib_per_process"]
    print(f"\n[weighting] teacher output cache: up to {mib} MiB per process; "
          f"{report['wall_seconds']} s; report {out}, plot {plot}", file=sys.stderr)
    print(json.dumps({"out": str(out), "plot": str(plot), "wall_seconds": report["wall_seconds"],
                      "runs": len(report["runs"])}, indent=2))
    return 0


SAME_WORKLOAD = ("epochs", "labels", "test_images", "student", "batch_size", "config", "r2_teacher", "r1_group_size")
"""Settings two reports must share for their rows to be paired."""


def read_report(path: Path) -> dict:
    """An earlier report (``--update``), read before any run starts."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--update {path}: cannot read the report ({error})") from None


def merge_into(report: dict, earlier: dict, earlier_name: str, regimes: list[str],
               labels: list[str]) -> tuple[list[str], list[str]]:
    """Fold the earlier report's rows that this run did not redo into ``report`` (in place).

    Returns the merged regime and strategy orders. Raises ``SystemExit`` when the two reports were
    not made on the same workload (settings or teacher digests differ)."""
    new, old = report["settings"], earlier["settings"]
    differ = [k for k in SAME_WORKLOAD if new.get(k) != old.get(k)]
    if [t["digest"] for t in report["teachers"]] != [t["digest"] for t in earlier["teachers"]]:
        differ.append("teachers")
    if differ:
        raise SystemExit(f"--update {earlier_name}: not the same workload ({', '.join(differ)} differ)")
    redone = {(r["regime"], r["strategy"], r["seed"]) for r in report["runs"]}
    kept = [r for r in earlier["runs"] if (r["regime"], r["strategy"], r["seed"]) not in redone]
    report["runs"] = kept + report["runs"]
    merged_regimes = list(old["regimes"]) + [r for r in regimes if r not in old["regimes"]]
    merged_labels = list(old["strategies"]) + [s for s in labels if s not in old["strategies"]]
    report["regimes"] = {**earlier.get("regimes", {}), **report["regimes"]}
    report["checks"] = {**earlier.get("checks", {}), **report["checks"]}
    report["cache"] = earlier.get("cache", []) + report["cache"]
    updates = list(old.get("updates", []))
    if old.get("note"):
        updates.insert(0, {"note": old["note"]})
    updates.append({"rerun": {"regimes": regimes, "strategies": labels, "seeds": new["seeds"]},
                    "date": time.strftime("%Y-%m-%d"), "rows_replaced": len(earlier["runs"]) - len(kept)})
    report["settings"] = {**new, "regimes": merged_regimes, "strategies": merged_labels,
                          "seeds": sorted({r["seed"] for r in report["runs"]}), "updates": updates}
    report["settings"].pop("note", None)
    return merged_regimes, merged_labels


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable))
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, StrategySpec):
        return value.label
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
