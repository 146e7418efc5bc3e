"""Where evaluation grids log: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store in the output folder."""

from __future__ import annotations

import os
from pathlib import Path

from eossl.train.tracking import artifact_root

__all__ = ["eval_experiment"]


def eval_experiment(out: Path, experiment: str) -> str:
    """Create ``out``, point MLflow at the tracking store and return the experiment's id (created if new)."""
    import mlflow

    out.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(experiment, artifact_location=artifact_root(uri))
