"""Tune's ``MLflowLoggerCallback`` for ``mtkd tune`` with ``tracking.mlflow`` on: one MLflow run per
trial (:func:`services.tracking.tune_callbacks` adds it; imported only then, as it imports MLflow)."""
from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback

from mtkd.tracking import allow_file_store


class TrialRuns(MLflowLoggerCallback):
    """``MLflowLoggerCallback`` that opts in to MLflow's file store for a ``file://`` URI (the default,
    in the search folder) when Tune sets it up: a search restored with ``--resume`` gets back this
    pickled callback, so the opt-in is made here rather than where the search was built."""

    def setup(self, *args, **kwargs):
        allow_file_store(self.tracking_uri or "")
        super().setup(*args, **kwargs)
