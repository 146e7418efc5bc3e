"""MLflow tracking through accelerate's tracker: main process only, one run per training run.

The tracking URI is MLflow's standard ``MLFLOW_TRACKING_URI``; without it, runs go to a SQLite store in
the run folder (``RUN_DIR/mlflow.db``, artifacts in ``RUN_DIR/mlartifacts``), so a run always has its
history next to its checkpoints. A resumed run continues the same MLflow run (its id is checkpointed). A run created beforehand by an
orchestrator (a study cell nested under its study) is named by ``EOSSL_MLFLOW_RUN_ID``.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import Accelerator

from .config import TrainConfig

__all__ = ["local_tracking_uri", "start_tracking"]


def local_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def start_tracking(acc: Accelerator, cfg: TrainConfig, params: dict, tags: dict, run_id: str | None) -> str | None:
    """Start (or continue) the run's MLflow run; returns its id on the main process."""
    import mlflow

    run_dir = Path(cfg.out).resolve()
    remote = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if not remote:
        mlflow.set_tracking_uri(local_tracking_uri(run_dir))
    init = {"run_name": run_dir.name, "tags": tags}
    resumed = bool(run_id)
    run_id = run_id or os.environ.get("EOSSL_MLFLOW_RUN_ID") or None
    if run_id:
        init["run_id"] = run_id
    if not remote:
        init["logging_dir"] = str(run_dir / "mlartifacts")  # artifact location of a new local experiment
    # A resumed run keeps the params logged at its start (MLflow refuses changed param values).
    acc.init_trackers(cfg.experiment, config=None if resumed else params, init_kwargs={"mlflow": init})
    if not acc.is_main_process:
        return None
    return mlflow.active_run().info.run_id
