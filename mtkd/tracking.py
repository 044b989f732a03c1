"""Experiment tracking (``tracking:`` in the config): MLflow and TensorBoard beside the run folder's
own files (metrics.jsonl, plot.png).

One MLflow run per ``mtkd distill`` run holds each epoch's metrics (step = the epoch), the resolved
config as params (dotted keys: ``optim.lr``, ``teachers.0.checkpoint``) and the exported student
(the teacher-format safetensors folder) as the artefact ``student/``. TensorBoard event files hold
the same metrics (``<output_dir>/tensorboard``).

The in-process runtime opens both here (:func:`open_tracker`); the Ray runtime and ``mtkd tune``
open them through Ray's own integrations (``services/tracking.py``) and log through the same
:class:`Tracker` and helpers, so every runtime records the same. This module never imports Ray;
MLflow and tensorboardX are imported only when tracking is on (``pip install 'mtkd-rl[tracking]'``).
"""
from __future__ import annotations

import math
import os
import re
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from mtkd.checkpoint import CheckpointError, read_json, write_json
from mtkd.config import ExperimentConfig, to_dict
from mtkd.errors import UserError

MLFLOW_DIR = "mlruns"
"""The default MLflow file store, inside the run folder (``tracking.mlflow.uri: null``)."""
TENSORBOARD_DIR = "tensorboard"
"""The TensorBoard event files' folder, inside the run folder."""
STUDENT_ARTIFACT = "student"
"""The artefact path of the exported student in the MLflow run."""
RECORD_FILE = "tracking.json"
"""In-process runs: the MLflow run of the run folder (``--resume`` continues it)."""
RUN_TAG = "mtkd.run"
"""The tag naming the mtkd run an MLflow run belongs to (a Ray run: its Ray Train run's name)."""
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
"""MLflow 3 keeps its file store in maintenance mode and refuses to open one unless this is ``true``."""
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SECRET = re.compile(r"//[^@/\s]*@")


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be opened (an unreachable server, a folder that cannot be written)."""


# ------------------------------------------------------------------------------ what is logged
def mlflow_uri(config: ExperimentConfig, folder: str | Path) -> str:
    """``tracking.mlflow.uri``, or a file store in ``folder`` (the run's, or a search's) when it is None;
    a plain path becomes a ``file://`` URI (resolved against the current folder)."""
    uri = config.tracking.mlflow.uri
    if uri is None:
        return (Path(folder).resolve() / MLFLOW_DIR).as_uri()
    if uri == "databricks" or _SCHEME.match(uri):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def allow_file_store(uri: str) -> None:
    """Opt in to MLflow's file store (``MLFLOW_ALLOW_FILE_STORE=true`` in this process, unless already set)
    when ``uri`` is one: the default store in the run folder is a ``file://`` URI, and MLflow 3 refuses
    file stores without it (it keeps them in maintenance mode; a database needs the full ``mlflow``)."""
    if uri.startswith("file:"):
        os.environ.setdefault(FILE_STORE_ENV, "true")


def shown_uri(uri: str) -> str:
    """``uri`` with any ``user:password@`` masked (for messages)."""
    return _SECRET.sub("//***@", uri)


def config_params(config: ExperimentConfig) -> dict[str, str]:
    """The resolved config as MLflow params: ``{dotted key: value as text}`` (lists indexed,
    ``teachers.0.checkpoint``; empty sections and lists as ``{}`` / ``[]``; passwords in URLs masked;
    the ``tracking`` section itself left out)."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}", item)
        else:
            params[prefix] = _SECRET.sub("//***@", str(value))

    data = to_dict(config)
    data.pop("tracking", None)
    walk("", data)
    return params


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The finite numbers of an epoch's metrics (what MLflow and TensorBoard record)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_name(config: ExperimentConfig) -> str:
    """``tracking.mlflow.run_name``, else the run folder's name."""
    return config.tracking.mlflow.run_name or Path(config.output_dir).resolve().name


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment ``name`` (created when missing)."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def find_run(client, experiment: str, key: str) -> str | None:
    """The id of the newest run of ``experiment`` tagged :data:`RUN_TAG` = ``key``, or None."""
    quoted = key.replace("'", "\\'")
    runs = client.search_runs([experiment], filter_string=f"tags.`{RUN_TAG}` = '{quoted}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# ------------------------------------------------------------------------------ the tracker
class Tracker:
    """Logs one run to an open MLflow run and/or a TensorBoard writer; either may be None (a
    tracker with neither does nothing). A failure to log an epoch is reported once on stderr and
    does not stop the training; the store was reachable when the run opened.

    Args:
        client: an ``mlflow.MlflowClient`` (None: no MLflow).
        run_id: the MLflow run to log to.
        writer: a ``tensorboardX.SummaryWriter`` (None: no TensorBoard).
    """

    def __init__(self, client=None, run_id: str | None = None, writer=None):
        self.client, self.run_id, self.writer = client, run_id, writer
        self.history: list[dict] = []
        self._warned = False

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close("FINISHED" if kind is None else "FAILED" if issubclass(kind, Exception) else "KILLED")

    def log_epoch(self, metrics: dict) -> None:
        """Record an epoch's metrics (its scalars; step = ``metrics["epoch"]``)."""
        self.history.append(metrics)
        values = scalar_metrics(metrics)
        step = int(metrics.get("epoch", len(self.history)))
        try:
            if self.client is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
            if self.writer is not None:
                for key, value in values.items():
                    self.writer.add_scalar(key, value, step)
                self.writer.flush()
        except Exception as error:  # noqa: BLE001 - tracking must not end a training run
            self._warn(f"could not log epoch {step} to the tracking store: {type(error).__name__}: {error}")

    def log_student(self, folder: str | Path) -> None:
        """Upload the exported student folder as the MLflow artefact :data:`STUDENT_ARTIFACT`."""
        if self.client is None:
            return
        try:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=STUDENT_ARTIFACT)
        except Exception as error:  # noqa: BLE001 - the student is in the run folder all the same
            self._warn(f"could not upload the student to MLflow run {self.run_id}: {type(error).__name__}: {error}")

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status`` (FINISHED, FAILED or KILLED) and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.client is not None:
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception as error:  # noqa: BLE001
                self._warn(f"could not end MLflow run {self.run_id}: {type(error).__name__}: {error}")
            self.client = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            print(f"[mtkd] warning: {message}", file=sys.stderr, flush=True)
            self._warned = True


def tensorboard_writer(config: ExperimentConfig, folder: str | Path, fresh: bool = False):
    """A ``tensorboardX.SummaryWriter`` into ``<folder>/tensorboard`` with the config as text, or None
    when ``tracking.tensorboard`` is off. ``fresh``: a new run, whose folder may hold an earlier run's
    event files (removed first; a resumed run adds a file beside its own)."""
    if not config.tracking.tensorboard.enabled:
        return None
    from tensorboardX import SummaryWriter

    logdir = Path(folder) / TENSORBOARD_DIR
    if fresh:
        for stale in logdir.glob("events.out.tfevents.*"):
            stale.unlink(missing_ok=True)
    writer = SummaryWriter(logdir=str(logdir), flush_secs=30)
    text = yaml.safe_dump(config_params(config), sort_keys=False)
    writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # indented: shown as code
    return writer


def open_tracker(config: ExperimentConfig, run_path: str | Path, resume: bool = False) -> Tracker:
    """The in-process runtime's tracker of the run in ``run_path``: a new MLflow run (params: the
    config) or, with ``resume``, the one recorded in :data:`RECORD_FILE` continued; a TensorBoard
    writer. Does nothing when ``tracking`` is off.

    Raises:
        TrackingError: the MLflow store cannot be reached or written (one line naming its URI).
    """
    run_path = Path(run_path)
    writer = tensorboard_writer(config, run_path, fresh=not resume)
    if not config.tracking.mlflow.enabled:
        return Tracker(writer=writer)
    from mlflow import MlflowClient

    uri = mlflow_uri(config, run_path)
    allow_file_store(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = experiment_id(client, config.tracking.mlflow.experiment)
        run_id = _recorded_run(client, run_path, uri) if resume else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            key = f"{run_path.resolve()}#{uuid.uuid4().hex[:8]}"
            run_id = client.create_run(experiment, run_name=run_name(config),
                                       tags={RUN_TAG: key, "mtkd.runtime": "inprocess",
                                             "mtkd.run_dir": str(run_path.resolve())}).info.run_id
            params = config_params(config)
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            write_json(run_path / RECORD_FILE, {"mlflow_uri": shown_uri(uri), "mlflow_run_id": run_id})
    except Exception as error:  # noqa: BLE001 - MLflow raises many kinds (HTTP, file system, its own)
        if writer is not None:
            writer.close()
        raise store_error(uri, error) from error
    return Tracker(client, run_id, writer)


def _recorded_run(client, run_path: Path, uri: str) -> str | None:
    """The MLflow run recorded for ``run_path`` in the store ``uri``, if it is still there."""
    try:
        record = read_json(run_path / RECORD_FILE)
    except CheckpointError:
        return None
    if not isinstance(record, dict) or record.get("mlflow_uri") != shown_uri(uri):
        return None
    try:
        return client.get_run(str(record["mlflow_run_id"])).info.run_id
    except Exception:  # noqa: BLE001 - deleted, or another store: a new run
        return None


def store_error(uri: str, error: BaseException, where: str = "") -> TrackingError:
    """The one-line :class:`TrackingError` of an MLflow store that could not be opened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return TrackingError(f"tracking.mlflow: cannot open the MLflow store {shown_uri(uri)!r}{where}: "
                         f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": "))


# ------------------------------------------------------------------------------ reading back
def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in ``folder`` (and below):
    ``{tag: [(step, value), ...]}`` in the order written (needs only tensorboardX's protobufs)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):  # a record: length (u64), its crc (u32), the event, its crc (u32)
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars


__all__ = ["FILE_STORE_ENV", "MLFLOW_DIR", "RECORD_FILE", "RUN_TAG", "STUDENT_ARTIFACT", "TENSORBOARD_DIR", "Tracker",
           "TrackingError", "allow_file_store", "config_params", "experiment_id", "find_run", "mlflow_uri",
           "open_tracker", "read_scalars", "run_name", "scalar_metrics", "shown_uri", "store_error",
           "tensorboard_writer"]
