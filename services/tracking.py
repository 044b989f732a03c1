"""Tracking on Ray (``tracking:`` in the config) through Ray's own integrations, logging what
:mod:`mtkd.tracking` defines (the same metrics, params and student artefact as the in-process runtime).

* ``mtkd distill`` on Ray: rank 0 of the Ray Train learners opens the MLflow run with
  ``ray.air.integrations.mlflow.setup_mlflow`` (the other ranks log nothing), logs each epoch it
  reports and, at the end, uploads the student it exports from its final state (the same file the
  driver writes into the run folder). The run is tagged with the Ray Train run's name, so a learner
  restarted after a failure, or a ``--resume``, continues the same MLflow run. TensorBoard event
  files are written by rank 0 into ``<output_dir>/tensorboard``.
* ``mtkd tune``: Tune's logger callbacks on the driver, ``MLflowLoggerCallback`` (one MLflow run per
  trial: its sampled values as params, every reported epoch as metrics) and ``TBXLoggerCallback``
  (event files in each trial's folder).

The learners write where the MLflow URI points, from rank 0's node: the default file store in the
run folder is right on one machine; a cluster needs a shared folder or a tracking server
(docs/tracking.md).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import ray
import ray.train

from mtkd.config import ExperimentConfig
from mtkd.tracking import (RUN_TAG, Tracker, allow_file_store, config_params, experiment_id, find_run, mlflow_uri,
                           run_name, store_error, tensorboard_writer)


class LearnerTracker(Tracker):
    """Rank 0's :class:`mtkd.tracking.Tracker` in the Ray Train learner; :meth:`log_final_student`
    exports and uploads the student at the end."""

    def __init__(self, config: ExperimentConfig, client=None, run_id: str | None = None, writer=None):
        super().__init__(client, run_id, writer)
        self.config = config

    def log_final_student(self, session) -> None:
        """Export the session's student as the driver does (teacher format) and upload it."""
        if self.client is None:
            return
        from mtkd.experiment import RunDirectory
        from mtkd.runner import finish

        try:
            with tempfile.TemporaryDirectory(prefix="mtkd-student-") as folder:
                finish(self.config, RunDirectory(folder), session.train_set, session.distiller.descriptions,
                       self.history, session.distiller.module.state_dict(), session.epoch)
                self.log_student(Path(folder) / "student")
        except Exception as error:  # noqa: BLE001 - the driver exports the student into the run folder all the same
            self._warn(f"could not export the student for MLflow run {self.run_id}: {type(error).__name__}: {error}")


def learner_tracker(config: ExperimentConfig, rank: int, fresh: bool) -> LearnerTracker:
    """The tracker of a Ray Train learner: on rank 0 with ``tracking`` on, the MLflow run opened with
    ``setup_mlflow`` (params: the config; an existing run of this Ray Train run continued, its params
    kept) and the TensorBoard writer; else one that does nothing. ``fresh``: the learner starts
    without a checkpoint (an earlier run's event files in the run folder are removed).

    Raises:
        TrackingError: the MLflow store cannot be reached or written (one line naming its URI).
    """
    if rank != 0:
        return LearnerTracker(config)
    warn_if_on_another_node(config)
    writer = tensorboard_writer(config, config.output_dir, fresh)
    if not config.tracking.mlflow.enabled:
        return LearnerTracker(config, writer=writer)
    import mlflow
    from ray.air.integrations.mlflow import setup_mlflow

    uri = mlflow_uri(config, config.output_dir)
    allow_file_store(uri)
    key = ray.train.get_context().get_experiment_name()  # the Ray Train run: the same on a restart or --resume
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        earlier = find_run(client, experiment_id(client, config.tracking.mlflow.experiment), key)
        if earlier is not None:  # setup_mlflow then takes the active run as it is
            mlflow.set_tracking_uri(uri)
            mlflow.start_run(run_id=earlier)
        active = setup_mlflow(None if earlier else config_params(config), tracking_uri=uri,
                              experiment_name=config.tracking.mlflow.experiment, run_name=run_name(config),
                              create_experiment_if_not_exists=True,
                              tags={RUN_TAG: key, "mtkd.runtime": "ray", "mtkd.run_dir": str(config.output_dir)})
        run_id = active.active_run().info.run_id
        mlflow.end_run()  # logged through the client from here on: no process-wide active run left behind
        client.update_run(run_id, status="RUNNING")
    except Exception as error:  # noqa: BLE001 - MLflow raises many kinds (HTTP, file system, its own)
        if writer is not None:
            writer.close()
        raise store_error(uri, error, " from the learner") from error
    return LearnerTracker(config, client, run_id, writer)


def warn_if_on_another_node(config: ExperimentConfig) -> None:
    """On a cluster of several nodes, say that rank 0 writes a file store and the event files on its own
    node (which need not be the driver's): a tracking server or shared storage is needed there."""
    local = [what for what, on in (
        (f"the MLflow file store {mlflow_uri(config, config.output_dir)}",
         config.tracking.mlflow.enabled and mlflow_uri(config, config.output_dir).startswith("file:")),
        (f"the TensorBoard files in {config.output_dir}", config.tracking.tensorboard.enabled)) if on]
    nodes = sum(1 for node in ray.nodes() if node.get("Alive")) if local else 0
    if nodes > 1:
        print(f"[mtkd] warning: the Ray cluster has {nodes} nodes and the rank-0 learner writes "
              f"{' and '.join(local)} on its own node; use a tracking server (tracking.mlflow.uri) or shared "
              f"storage (output_dir) to see them from the driver", file=sys.stderr, flush=True)


def tune_callbacks(base: ExperimentConfig, search_dir: str | Path, search_name: str) -> list:
    """Tune's logger callbacks for ``tracking`` of a search's experiment: ``MLflowLoggerCallback``
    (the default store: ``<search folder>/mlruns``) and ``TBXLoggerCallback``; none when it is off."""
    callbacks = []
    if base.tracking.mlflow.enabled:
        from services.tune.mlflow_runs import TrialRuns  # imports MLflow: only when it is on

        callbacks.append(TrialRuns(
            tracking_uri=mlflow_uri(base, search_dir), experiment_name=base.tracking.mlflow.experiment,
            tags={"mtkd.runtime": "tune", "mtkd.search": search_name, "mtkd.search_dir": str(search_dir)}))
    if base.tracking.tensorboard.enabled:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    return callbacks


__all__ = ["LearnerTracker", "learner_tracker", "tune_callbacks"]
