"""MLflow tracking through accelerate's tracker: main process only, one run per training run.

The tracking URI is MLflow's standard ``MLFLOW_TRACKING_URI``; without it, runs go to a SQLite store in
the run folder (``RUN_DIR/mlflow.db``, artifacts in ``RUN_DIR/mlartifacts``), so a run always has its
history next to its checkpoints. A SQLite store keeps artifacts beside its database (``artifact_root``).
A resumed run continues the same MLflow run (its id is checkpointed). A run created beforehand by an
orchestrator (a study cell nested under its study) is named by ``EOSSL_MLFLOW_RUN_ID``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from accelerate import Accelerator

from .config import TrainConfig

__all__ = ["artifact_root", "git_commit", "local_tracking_uri", "start_tracking"]


def git_commit() -> str:
    """The commit of the code that trains (a run's ``git_commit`` tag); "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def local_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps artifacts: ``mlartifacts`` beside the database.

    MLflow's own default for a database store is ``./mlruns`` under the *current* directory, which scatters
    backbones and figures into wherever a command happened to start. None for a tracking server (it
    decides; artifacts are proxied) and for a file store (it keeps them inside itself).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    if not database.is_absolute():  # sqlite:///relative.db
        database = database.resolve()
    return (database.parent / "mlartifacts").as_uri()


def start_tracking(
    acc: Accelerator, cfg: TrainConfig, params: dict, tags: dict, run_id: str | None
) -> str | None:
    """Start (or continue) the run's MLflow run; returns its id on the main process."""
    import mlflow

    run_dir = Path(cfg.out).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(run_dir)
    mlflow.set_tracking_uri(uri)
    init = {"run_name": run_dir.name, "tags": tags}
    resumed = bool(run_id)
    run_id = run_id or os.environ.get("EOSSL_MLFLOW_RUN_ID") or None
    if run_id:
        init["run_id"] = run_id
    artifacts = artifact_root(uri)
    if artifacts:
        init["logging_dir"] = artifacts  # artifact location of a new experiment in a SQLite store
    # A resumed run keeps the params logged at its start (MLflow refuses changed param values).
    acc.init_trackers(cfg.experiment, config=None if resumed else params, init_kwargs={"mlflow": init})
    if not acc.is_main_process:
        return None
    return mlflow.active_run().info.run_id
