"""Typed experiment configuration: dataclasses loaded from YAML with ``yaml.safe_load``.

Every section is a dataclass whose fields are documented where they are declared. Unknown
keys are rejected with the list of valid ones; values are checked against the field types, then
against their bounds and registries (strategy, agent rule, model and dataset names) when the
section is built, so a bad value fails at load with one :class:`ConfigError` naming the key, what
it got and what it expects. ``key.sub=value`` overrides (values parsed as YAML scalars) apply on
top of a file.

This module holds the sections; the value checks live in :mod:`mtkd.config_checks` and the
loading (YAML, overrides, types) in :mod:`mtkd.config_loader`. Programs import every name from
here (``from mtkd.config import ConfigError, load_config``).
"""
from __future__ import annotations

import re
import inspect
from dataclasses import dataclass, field
from typing import Any

from mtkd.config_checks import (ConfigError, amounts, at_least, check_device, choice, in_range, is_number, one_of,
                                optional_at_least, registered)
from mtkd.config_loader import apply_overrides, from_dict, load_config, read_yaml, save_config, to_dict

__all__ = [
    "AgentConfig", "CacheConfig", "ConfigError", "DataConfig", "DistillConfig", "ExperimentConfig", "MlflowConfig",
    "OptimConfig", "RuntimeConfig", "TeacherSpec", "TeacherTrainConfig", "TensorboardConfig", "TrackingConfig",
    "apply_overrides", "check_device", "check_runnable", "from_dict", "load_config", "read_yaml", "save_config",
    "to_dict",
]

RUNTIMES = ("ray", "inprocess")
CACHE_SCHEMES = ("redis", "rediss", "unix")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("step", "onecycle")
SEED_LIMIT = 2**32  # seeds are in [0, 2**32), as numpy and most tools take them


MAX_FILE_EVAL_BATCH = 32
"""The largest ``data.eval_batch_size`` of a file-backed segmentation set (whole images are scored)."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    """Dataset registry name (fashion_mnist, mnist, cifar10, cifar100, image_folder; segmentation:
    canvases, and cityscapes, ade20k, pascal_voc read from files batch by batch; detection:
    canvases_det)."""
    root: str | None = None
    """Folder of the dataset files; None uses the dataset's default location (cityscapes, ade20k,
    pascal_voc and image_folder have none)."""
    train_subset: int | None = None
    """Train on a seeded random subset of this many samples (None: all)."""
    test_subset: int | None = None
    """Evaluate on a seeded random subset of this many samples (None: all)."""
    batch_size: int = 64
    """Samples per step (per learner worker)."""
    eval_batch_size: int = 500
    """Samples per evaluation batch."""
    augment: bool = True
    """Random crop with padding and horizontal flip on training batches (cityscapes, ade20k,
    pascal_voc: random scale, crop to ``options.crop_size`` and flip; off: the centre crop)."""
    crop_padding: int = 4
    """Zero padding of the random crop."""
    hflip: bool = True
    """Random horizontal flip (p = 0.5)."""
    augment_bank: int = 0
    """K > 0: each training sample gets K fixed seeded augmentations and every epoch draws one of
    them, so that teacher outputs repeat and the cache serves them after the first epochs
    (0: a fresh augmentation every epoch, the reference recipe)."""
    options: dict = field(default_factory=dict)
    """Options of the dataset's loader, e.g. for ``canvases``: ``{size: 64, num_canvases: {train: 4000,
    test: 1000}, cache_dir: cache/canvases}``; for ``image_folder``: ``{channels: 3, image_size: 32}``;
    for ``cityscapes``: ``{crop_size: [512, 1024], scale: [0.5, 2.0]}`` (docs/segmentation.md)."""

    def __post_init__(self) -> None:
        from mtkd.data import DATASETS

        registered("data.name", self.name, DATASETS)
        if self.name == "image_folder" and not self.root:
            raise ConfigError("data.root: data.name=image_folder needs a folder root/<split>/<class>/*.png|jpg, got "
                              "None")
        if self.file_backed and not self.root:
            raise ConfigError(f"data.root: data.name={self.name} is read from its files; expected the folder of its "
                              f"standard layout (docs/segmentation.md), got None")
        if self.file_backed and is_number(self.augment_bank) and self.augment_bank > 0:
            raise ConfigError(f"data.augment_bank: data.name={self.name} is read from files batch by batch and has no "
                              f"augmentation bank; expected 0, got {self.augment_bank}")
        if self.detection and is_number(self.augment_bank) and self.augment_bank > 0:
            raise ConfigError(f"data.augment_bank: data.name={self.name} is a detection set, whose augmentation moves "
                              f"boxes and has no augmentation bank; expected 0, got {self.augment_bank}")
        optional_at_least("data.train_subset", self.train_subset, 1)
        optional_at_least("data.test_subset", self.test_subset, 1)
        at_least("data.batch_size", self.batch_size, 1)
        at_least("data.eval_batch_size", self.eval_batch_size, 1)
        if self.file_backed and is_number(self.eval_batch_size) and self.eval_batch_size > MAX_FILE_EVAL_BATCH:
            raise ConfigError(f"data.eval_batch_size: data.name={self.name} is scored on whole images at full "
                              f"resolution (a 1024x2048 Cityscapes image is 25 MB as float32, its logits more); "
                              f"expected at most {MAX_FILE_EVAL_BATCH} (e.g. 4), got {self.eval_batch_size}")
        at_least("data.crop_padding", self.crop_padding, 0)
        at_least("data.augment_bank", self.augment_bank, 0)
        if not isinstance(self.options, dict):
            raise ConfigError(f"data.options: expected a mapping of loader options, got {self.options!r}")
        try:
            inspect.signature(DATASETS.get(self.name)).bind(**self.options)
        except TypeError as err:
            raise ConfigError(f"data.options: the {self.name!r} loader does not take these options ({err})") from None
        check_options = getattr(DATASETS.get(self.name), "check_options", None)  # a loader's own check (canvases_det)
        if check_options is not None:
            try:
                check_options(self.options)
            except ValueError as err:
                raise ConfigError(f"data.options: {err}") from None

    @property
    def detection(self) -> bool:
        """Whether the dataset is a detection set (packed boxes as labels: ``canvases_det``)."""
        from mtkd.data import DATASETS

        return self.name in DATASETS and getattr(DATASETS.get(self.name), "task", None) == "detection"

    @property
    def file_backed(self) -> bool:
        """Whether the dataset is read from files batch by batch (``cityscapes``, ``ade20k``, ``pascal_voc``)."""
        from mtkd.data import DATASETS

        return self.name in DATASETS and getattr(DATASETS.get(self.name), "file_backed", False)


@dataclass
class OptimConfig:
    epochs: int = 240
    """Training epochs."""
    lr: float = 0.05
    """Initial learning rate of SGD."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay."""
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    """Epochs at which the learning rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    """Learning-rate decay factor."""
    schedule: str = "step"
    """step: multiply by ``gamma`` at each milestone (the reference recipe); onecycle: per step,
    a linear warm-up from ``lr / 25`` to ``lr`` over the first 30% of the steps, then a cosine
    decay to ``lr / 1e4`` (``torch.optim.lr_scheduler.OneCycleLR``'s shape)."""

    def __post_init__(self) -> None:
        choice("optim.schedule", self.schedule, SCHEDULES)
        at_least("optim.epochs", self.epochs, 0)
        at_least("optim.lr", self.lr, 0, strict=True)
        in_range("optim.momentum", self.momentum, 0, 1)
        if self.nesterov is True and is_number(self.momentum) and self.momentum == 0:
            raise ConfigError("optim.nesterov: Nesterov needs momentum; expected optim.momentum > 0 or "
                              "optim.nesterov=false, got optim.momentum=0")
        at_least("optim.weight_decay", self.weight_decay, 0)
        for i, milestone in enumerate(self.milestones if isinstance(self.milestones, list) else []):
            at_least(f"optim.milestones[{i}]", milestone, 0)
        at_least("optim.gamma", self.gamma, 0, strict=True)


@dataclass
class TeacherSpec:
    name: str = ""
    """A short name for the teacher (logs, plots); defaults to the checkpoint's model name."""
    checkpoint: str | None = None
    """Path of a teacher checkpoint folder (written by ``mtkd train-teacher``)."""
    address: str | None = None
    """host:port of a teacher served by ``mtkd serve-teacher`` (Ray runtime only)."""
    replicas: int = 1
    """Ray runtime: actor replicas serving this teacher."""
    num_cpus: float | None = None
    """Ray runtime: CPUs per replica (None: ``runtime.teacher_num_cpus``)."""
    num_gpus: float | None = None
    """Ray runtime: GPUs per replica, fractions allowed (None: ``runtime.teacher_num_gpus``); > 0
    runs the teacher on that GPU."""
    resources: dict[str, float] = field(default_factory=dict)
    """Ray runtime: custom resources per replica, e.g. ``{teacher_node: 1}`` to place the teacher on
    the nodes started with ``--resources='{"teacher_node": N}'``."""
    token_file: str | None = None
    """A file holding the bearer token of a served teacher (``address``)."""
    root_cert: str | None = None
    """PEM certificate (CA or self-signed) of a served teacher: connect with TLS."""

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError` for a bad value; ``where`` (``teachers[i]``) prefixes each key."""
        if bool(self.checkpoint) == bool(self.address):
            got = f"both ({self.checkpoint!r}, {self.address!r})" if self.checkpoint else "neither"
            raise ConfigError(f"{where}: expected exactly one of checkpoint and address, got {got}")
        if isinstance(self.address, str):
            host, _, port = self.address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ConfigError(f"{where}.address: must be host:port with a port in 1..65535, got {self.address!r}")
        for name in ("token_file", "root_cert"):
            if getattr(self, name) and not self.address:
                raise ConfigError(f"{where}.{name}: only a served teacher (address) takes one, got "
                                  f"{getattr(self, name)!r} with checkpoint {self.checkpoint!r}")
        at_least(f"{where}.replicas", self.replicas, 1)
        optional_at_least(f"{where}.num_cpus", self.num_cpus, 0)
        optional_at_least(f"{where}.num_gpus", self.num_gpus, 0)
        amounts(f"{where}.resources", self.resources)


@dataclass
class DistillConfig:
    strategy: str = "mtkd_rl"
    """Teacher-weighting strategy: ce, aver, ebkd, camkd, mtkd_rl."""
    temperature: float = 4.0
    """KD temperature T."""
    beta: float = 5.0
    """Weight of the feature-distillation term."""
    warmup_epochs: int = 1
    """mtkd_rl: epochs during which all teacher weights are 1 and the agent does not act."""
    region_grid: int = 0
    """Segmentation: 0 weights teachers per image; G > 0 per region, each cell of a G x G grid over
    an image one decision unit (its weights applied to the cell's pixels)."""
    units: str = "image"
    """Detection's decision units: ``image`` weights teachers per image; ``object`` per ground-truth box,
    each box one unit (its weights applied to the cells it owns) and each image's background one more
    (docs/detection.md)."""
    dense_kd: str = "kl"
    """Segmentation's logit distillation per teacher: ``kl`` (per-pixel KL at ``temperature`` over the
    labelled pixels) or ``cwd`` (channel-wise distillation: each class channel a distribution over an
    image's, or a cell's, positions at ``temperature``; all pixels)."""

    def __post_init__(self) -> None:
        from mtkd.distill import STRATEGIES

        registered("distill.strategy", self.strategy, STRATEGIES)
        at_least("distill.temperature", self.temperature, 0, strict=True)
        at_least("distill.beta", self.beta, 0)
        at_least("distill.warmup_epochs", self.warmup_epochs, 0)
        at_least("distill.region_grid", self.region_grid, 0)
        choice("distill.dense_kd", self.dense_kd, ("kl", "cwd"))
        choice("distill.units", self.units, ("image", "object"))


@dataclass
class AgentConfig:
    rule: str = "meta"
    """Agent update rule: meta (default: teacher weights learnt from what the student's update did on
    the next batch, docs/method.md), reference (the authors' code, exact: reproduces the paper) or
    reinforce (the paper's policy gradient)."""
    mixing: str = "static"
    """static: w = (a + c + g) / 3; dynamic: learned softmax mixing coefficients."""
    agent_step: int = 1000
    """Update the agent after this many stored batches (and at every epoch end)."""
    lr: float = 0.1
    """Agent SGD learning rate (no momentum, no weight decay)."""
    concentration: float = 10.0
    """reinforce rule: per-teacher Dirichlet concentration."""
    meta_lr: float = 10.0
    """meta rule: SGD learning rate of the teacher-score policy (one step per student step)."""
    meta_decay: float = 0.0
    """meta rule: weight decay of the policy, a pull of the weights towards equal (``aver``)."""
    meta_entropy: float = 0.0
    """meta rule: weight of ``KL(w || uniform)`` in the policy's loss (0: none)."""

    def __post_init__(self) -> None:
        from mtkd.distill.agent import MIXINGS, RULES

        one_of("agent.rule", self.rule, tuple(RULES))
        one_of("agent.mixing", self.mixing, tuple(MIXINGS))
        at_least("agent.agent_step", self.agent_step, 1)
        at_least("agent.lr", self.lr, 0, strict=True)
        at_least("agent.concentration", self.concentration, 0, strict=True)
        at_least("agent.meta_lr", self.meta_lr, 0, strict=True)
        at_least("agent.meta_decay", self.meta_decay, 0)
        at_least("agent.meta_entropy", self.meta_entropy, 0)


@dataclass
class RuntimeConfig:
    runtime: str = "ray"
    """ray (the distributed service, default) or inprocess (the reference engine)."""
    address: str | None = None
    """Ray cluster to join ("auto", "ray://head:10001", ...), or "local" for a private local Ray started
    (and stopped) for the run. None: the cluster of ``RAY_ADDRESS`` or of the ``ray job`` this runs in,
    else a private local Ray."""
    device: str = "auto"
    """Where the student trains: auto (cuda when available, else cpu), cpu, cuda or cuda:N. On Ray,
    a GPU device gives each learner worker a GPU (``ScalingConfig(use_gpu=True)``)."""
    teacher_precision: str = "auto"
    """Teacher inference: fp32 (exact), bf16 or fp16 (autocast + channels_last, batch norm folded;
    outputs handed to the losses in fp32). auto: each teacher is timed at the start on a batch of
    ``data.batch_size`` in every candidate setting (fp32, fp32 channels_last, and bf16 / fp16 where
    the device runs them natively) and the fastest whose outputs agree with exact fp32 (the probe_*
    bounds) is used; decisions are cached on disk (``probe_cache``)."""
    probe_cache: str | None = None
    """teacher_precision auto: the folder of cached probe decisions (None: $MTKD_PROBE_CACHE, else
    ~/.cache/mtkd/probe)."""
    probe_max_logit_kl: float = 1e-3
    """teacher_precision auto: the largest mean KL(fp32 softmax || setting's softmax) allowed on the probe batch."""
    probe_max_feature_error: float = 0.05
    """teacher_precision auto: the largest relative error of the feature map against fp32 allowed."""
    student_precision: str = "fp32"
    """Student forward/backward: fp32 (exact, the default), bf16 (autocast and channels_last; fp32
    master weights, the losses computed in fp32), or auto: a few training steps of the student timed
    at the start in fp32, fp32 channels_last and bf16 (where the device runs it natively), the
    fastest whose logits and features agree with fp32 (the probe_* bounds) used; cached like the
    teachers' decisions."""
    compile_teachers: Any = False
    """Compile teacher models with ``torch.compile``: false (default), true, or auto: compile a
    teacher when the run's teacher calls (epochs x batches per epoch) exceed its measured compile
    time over its measured saving per call (measured once and cached with the probe's decisions; a
    run too short for even a 10% saving to repay a 120 s compile does not measure)."""
    num_learners: int = 1
    """Ray Train workers training the student together (DistributedDataParallel)."""
    learner_num_cpus: float = 1.0
    """Ray CPUs per learner worker."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per learner worker, e.g. ``{learner_node: 1}``."""
    sync_batchnorm: bool = False
    """With several learners, synchronise batch-norm statistics across them (SyncBatchNorm; CUDA only)."""
    prefetch: int = 1
    """Batches whose teacher outputs are requested ahead of the one being trained (0: none)."""
    half_precision: bool = False
    """Move fp32 teacher outputs in float16 (half the bytes, not bit-exact with the in-process engine):
    from the teacher actors to the learners, and from a gRPC teacher server to its actor (outputs put
    in the cache are the teacher's own). Outputs of bf16/fp16 teachers always travel in their own
    16-bit format (lossless) between actors and learners."""
    teacher_num_cpus: float = 0.5
    """Ray CPUs per teacher replica unless the teacher says otherwise (fractional)."""
    teacher_num_gpus: float = 0.0
    """Ray GPUs per teacher replica unless the teacher says otherwise (fractions allowed)."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints: a folder every node can reach, or a URI pyarrow supports
    (s3://..., gs://...). None: ``<output_dir>/ray`` (enough on one machine)."""
    max_failures: int = 2
    """Ray runtime: restarts of the learners from their newest checkpoint after a worker or node
    failure (-1: unlimited). Errors in the run itself (a NaN loss, a bad checkpoint) never restart."""
    teacher_max_restarts: int = 3
    """Ray runtime: how many times Ray restarts a teacher replica whose process died (killed, crashed,
    its node lost); past them a call on it ends the run in one line naming the teacher and the batch.
    Unlimited (-1) is refused: a batch that crashes its teacher would loop."""
    teacher_max_task_retries: int = 3
    """Ray runtime: how many times a call in flight on a teacher replica that died is sent again to its
    next incarnation (inference is a pure function of the batch, so a retry is safe)."""
    placement_timeout_s: float = 600.0
    """Ray runtime: how long the driver waits for the teacher replicas' placement group (all replicas
    placed or none) and then for the teachers to load; past it the run exits 2 naming what is missing."""
    metrics_export_port: int | None = None
    """A private local Ray: the port its metrics agent serves Prometheus metrics on (``/metrics``; mtkd's
    own are listed in docs/distributed.md). None: a free port Ray picks. A joined cluster's nodes keep
    theirs (``ray start --metrics-export-port``)."""
    agent_buffer_mb: float = 512.0
    """The most memory the agent's experience buffer may hold (``agent_step`` batches of states); a
    config that would exceed it is refused at start-up."""
    threads: int | None = None
    """torch threads in the in-process engine (None: torch's default)."""

    def __post_init__(self) -> None:
        choice("runtime.runtime", self.runtime, RUNTIMES)
        check_device(self.device, "runtime.device")
        choice("runtime.teacher_precision", self.teacher_precision, ("auto", *PRECISIONS))
        at_least("runtime.probe_max_logit_kl", self.probe_max_logit_kl, 0)
        at_least("runtime.probe_max_feature_error", self.probe_max_feature_error, 0)
        choice("runtime.student_precision", self.student_precision, ("auto", "fp32", "bf16"))
        if self.student_precision == "auto" and is_number(self.num_learners) and self.num_learners > 1:
            raise ConfigError(f"runtime.student_precision: auto probes on each learner, and {self.num_learners} learners "
                              f"could choose differently (their parameters must stay equal); expected fp32 or bf16")
        if not isinstance(self.compile_teachers, bool) and self.compile_teachers != "auto":
            raise ConfigError(f"runtime.compile_teachers: expected true, false or auto, got {self.compile_teachers!r}")
        several = is_number(self.num_learners) and self.num_learners > 1
        if self.sync_batchnorm is True and self.device == "cpu" and several:
            raise ConfigError("runtime.sync_batchnorm: SyncBatchNorm needs learners on CUDA; expected runtime.device "
                              "cuda or runtime.sync_batchnorm=false, got runtime.device=cpu")
        at_least("runtime.num_learners", self.num_learners, 1)
        at_least("runtime.learner_num_cpus", self.learner_num_cpus, 0)
        amounts("runtime.learner_resources", self.learner_resources)
        at_least("runtime.prefetch", self.prefetch, 0)
        at_least("runtime.teacher_num_cpus", self.teacher_num_cpus, 0)
        at_least("runtime.teacher_num_gpus", self.teacher_num_gpus, 0)
        at_least("runtime.max_failures", self.max_failures, -1)
        at_least("runtime.teacher_max_restarts", self.teacher_max_restarts, 0)
        at_least("runtime.teacher_max_task_retries", self.teacher_max_task_retries, 0)
        at_least("runtime.placement_timeout_s", self.placement_timeout_s, 0, strict=True)
        if self.metrics_export_port is not None:
            in_range("runtime.metrics_export_port", self.metrics_export_port, 1, 65536)
        at_least("runtime.agent_buffer_mb", self.agent_buffer_mb, 0, strict=True)
        optional_at_least("runtime.threads", self.threads, 1)


@dataclass
class CacheConfig:
    url: str | None = None
    """Redis cache of teacher outputs: None (off), ``local`` (a private ``redis-server`` on a free
    loopback port, stopped at the end) or ``redis://host:port/db`` (a shared server)."""
    max_memory_mb: int = 2048
    """``local`` only: the private server's ``maxmemory`` (evicting least recently used entries)."""
    value_dtype: str = "auto"
    """How outputs are stored: auto (the teacher's own output precision: lossless), float16 or
    bfloat16 (compact; fp32 teachers are then not bit-exact)."""

    def __post_init__(self) -> None:
        choice("cache.value_dtype", self.value_dtype, ("auto", "float16", "bfloat16"))
        if isinstance(self.url, str) and self.url != "local" and self.url.partition("://")[0] not in CACHE_SCHEMES:
            shown = re.sub(r"//[^@/]*@", "//***@", self.url)  # never echo a password
            raise ConfigError(f"cache.url: expected local, redis://host:port[/db], rediss://... or "
                              f"unix:///path/to/redis.sock, got {shown!r}")
        at_least("cache.max_memory_mb", self.max_memory_mb, 1)


TRACKING_EXTRA = "pip install 'mtkd-rl[tracking]'"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass
class MlflowConfig:
    enabled: bool = False
    """Log each epoch's metrics, the config (as params) and the final student (as an artefact) to MLflow."""
    uri: str | None = None
    """MLflow tracking URI: a folder, ``file:///...``, ``http(s)://server`` or any URI MLflow takes. None: a
    file store in the run folder (``<output_dir>/mlruns``; for ``mtkd tune``, the search folder's)."""
    experiment: str = "mtkd"
    """MLflow experiment the runs go into (created when missing)."""
    run_name: str | None = None
    """Name of the MLflow run (None: the run folder's name; ``mtkd tune`` names each run after its trial)."""

    def __post_init__(self) -> None:
        if isinstance(self.uri, str) and not self.uri.strip():
            raise ConfigError("tracking.mlflow.uri: expected a tracking URI or folder, got '' (null: a file store in "
                              "the run folder)")
        if isinstance(self.uri, str) and self.uri != "databricks" and not re.match(r"^[A-Za-z][\w+.-]*:", self.uri):
            from pathlib import Path

            self.uri = str(Path(self.uri).expanduser().resolve())  # a folder: the same for every process of the run
        if isinstance(self.experiment, str) and not self.experiment.strip():
            raise ConfigError("tracking.mlflow.experiment: expected an experiment name, got ''")
        if self.enabled is True and not _installed("mlflow"):
            raise ConfigError(f"tracking.mlflow.enabled: MLflow is not installed; {TRACKING_EXTRA} (or set "
                              f"tracking.mlflow.enabled=false)")


@dataclass
class TensorboardConfig:
    enabled: bool = False
    """Write each epoch's metrics as TensorBoard event files into ``<output_dir>/tensorboard``."""

    def __post_init__(self) -> None:
        if self.enabled is True and not _installed("tensorboardX"):
            raise ConfigError(f"tracking.tensorboard.enabled: tensorboardX is not installed; {TRACKING_EXTRA} (or set "
                              f"tracking.tensorboard.enabled=false)")


@dataclass
class TrackingConfig:
    """Experiment tracking besides the run folder's own files (docs/tracking.md)."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)


@dataclass
class ExperimentConfig:
    seed: int = 0
    """Seeds data order, augmentation and every initialisation."""
    output_dir: str = "runs/experiment"
    """Folder of the run: metrics, checkpoints, plots, resolved config."""
    student: str = "resnet8"
    """Student model registry name."""
    teachers: list[TeacherSpec] = field(default_factory=list)
    """The teacher pool."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        from mtkd.tasks import dataset_task, model_registry

        in_range("seed", self.seed, 0, SEED_LIMIT)
        if isinstance(self.output_dir, str) and not self.output_dir.strip():
            raise ConfigError("output_dir: expected a folder, got ''")
        registered("student", self.student, model_registry(self.data.name))
        task = dataset_task(self.data.name) if isinstance(self.data, DataConfig) else None
        if self.distill.region_grid and task not in (None, "segmentation"):
            raise ConfigError(f"distill.region_grid={self.distill.region_grid}: per-region teacher weights need a "
                              f"segmentation dataset; data.name={self.data.name!r} is a {task} set")
        if self.distill.dense_kd != "kl" and task not in (None, "segmentation"):
            raise ConfigError(f"distill.dense_kd={self.distill.dense_kd!r}: channel-wise distillation is for "
                              f"segmentation logit maps; data.name={self.data.name!r} is a {task} set (expected kl)")
        if self.distill.units != "image" and task not in (None, "detection"):
            raise ConfigError(f"distill.units={self.distill.units!r}: per-object teacher weights need a detection "
                              f"dataset; data.name={self.data.name!r} is a {task} set (expected image)")
        if (task == "detection" and isinstance(self.cache, CacheConfig) and self.cache.url
                and isinstance(self.data, DataConfig) and self.data.augment is True):
            shown = re.sub(r"//[^@/]*@", "//***@", str(self.cache.url))  # never echo a password
            raise ConfigError(f"cache.url: data.name={self.data.name} is a detection set whose augmentation (shift, flip, "
                              f"scale moving the boxes) no cache key names, so cached teacher outputs would be of "
                              f"other images; expected no cache or data.augment=false, got cache.url={shown!r}")
        if (isinstance(self.data, DataConfig) and isinstance(self.cache, CacheConfig) and self.cache.url
                and self.data.file_backed and self.data.augment is True):
            shown = re.sub(r"//[^@/]*@", "//***@", str(self.cache.url))  # never echo a password
            raise ConfigError(f"cache.url: data.name={self.data.name} is augmented by random scale and crop, which a "
                              f"cache key cannot name (teacher outputs never repeat); expected no cache or "
                              f"data.augment=false, got cache.url={shown!r}")
        for i, teacher in enumerate(self.teachers):
            if isinstance(teacher, TeacherSpec):
                teacher.check(f"teachers[{i}]")
        names = [t.name for t in self.teachers if isinstance(t, TeacherSpec) and t.name]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"teachers: names must be unique, got {', '.join(map(repr, repeated))} more than once")


@dataclass
class TeacherTrainConfig:
    seed: int = 0
    """Seeds data order, augmentation and initialisation."""
    model: str = "resnet20"
    """Model registry name."""
    output_dir: str = "runs/teacher"
    """Checkpoint folder to write."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2, lr=0.05, nesterov=False,
                                                                   weight_decay=5e-4, milestones=[]))
    threads: int | None = None
    """torch threads (None: torch's default)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast + channels_last: about 3x faster on CPUs with AMX; the weights stay fp32)."""

    def __post_init__(self) -> None:
        from mtkd.tasks import model_registry

        in_range("seed", self.seed, 0, SEED_LIMIT)
        registered("model", self.model, model_registry(self.data.name))
        if isinstance(self.output_dir, str) and not self.output_dir.strip():
            raise ConfigError("output_dir: expected a folder, got ''")
        optional_at_least("threads", self.threads, 1)
        check_device(self.device, "device")
        choice("precision", self.precision, ("fp32", "bf16"))


def check_runnable(config: ExperimentConfig) -> None:
    """What an experiment about to run must satisfy beyond its sections: a strategy that distils has
    teachers; the in-process runtime loads every teacher from a checkpoint. (Not part of loading:
    programs load a student config, then add its teachers; ``mtkd distill`` calls this at load.)

    Raises:
        ConfigError: naming the key, what it got and what it expects.
    """
    from mtkd.distill import STRATEGIES

    if STRATEGIES.get(config.distill.strategy).uses_teachers and not config.teachers:
        raise ConfigError(f"teachers: strategy {config.distill.strategy!r} distils from teachers; expected at least "
                          f"one, got none (or use distill.strategy=ce)")
    if config.runtime.runtime == "inprocess":
        for i, teacher in enumerate(config.teachers):
            if teacher.address:
                raise ConfigError(f"teachers[{i}].address: a served teacher needs runtime.runtime=ray, got "
                                  f"runtime.runtime=inprocess with address {teacher.address!r}")
