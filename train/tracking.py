"""MLflow tracking through accelerate's tracker: main process only, one run per training run.

The tracking URI is MLflow's standard ``MLFLOW_TRACKING_URI``; without it, runs go to a SQLite store in
the run folder (``RUN_DIR/mlflow.db``, artifacts in ``RUN_DIR/mlartifacts``), so a run always has its
history next to its checkpoints. A SQLite store keeps artifacts beside its database (``artifact_root``).
A resumed run continues the same MLflow run (its id is checkpointed). A run created beforehand by an
orchestrator (a study cell nested under its study) is named by ``EOSSL_MLFLOW_RUN_ID``.

A run that ends on an exception is ended here as FAILED (KILLED for a pre-emption or an interrupt) with
the error in its ``eossl.error`` tag: left open, MLflow's exit hook would close it as FINISHED. A resumed
run is RUNNING again and its ``eossl.error`` tag is removed (the failure stays in its logs).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from accelerate import Accelerator

from .config import TrainConfig

__all__ = [
    "ERROR_TAG",
    "artifact_root",
    "end_tracking_on_error",
    "git_commit",
    "local_tracking_uri",
    "relocate_local_store",
    "start_tracking",
]

ERROR_TAG = "eossl.error"
MAX_TAG_CHARS = 5000  # well under MLflow's limit on a tag value


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


def relocate_local_store(database: Path) -> None:
    """Point a moved run folder's SQLite store at its own ``mlartifacts`` again.

    MLflow records an experiment's artifact folder (and each run's) as an absolute URI: after the run folder
    moved, artifacts would be written under the old path. Rows under another ``.../mlartifacts`` are
    rewritten to the one beside the database; a store that did not move is left untouched.
    """
    import sqlite3
    from contextlib import closing

    if not database.exists():
        return
    new = (database.parent / "mlartifacts").as_uri()
    with closing(sqlite3.connect(database)) as db, db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
        if not {"experiments", "runs"} <= tables:
            return
        for exp_id, location in db.execute("select experiment_id, artifact_location from experiments"):
            if not location or not location.startswith("file://") or "/mlartifacts" not in location:
                continue
            old = location[: location.index("/mlartifacts") + len("/mlartifacts")]
            if old == new:
                continue
            db.execute(
                "update experiments set artifact_location = ? || substr(artifact_location, ?) "
                "where experiment_id = ?",
                (new, len(old) + 1, exp_id),
            )
            db.execute(
                "update runs set artifact_uri = ? || substr(artifact_uri, ?) "
                "where experiment_id = ? and artifact_uri like ?",
                (new, len(old) + 1, exp_id, old + "%"),
            )


def start_tracking(
    acc: Accelerator, cfg: TrainConfig, params: dict, tags: dict, run_id: str | None
) -> str | None:
    """Start (or continue) the run's MLflow run; returns its id on the main process."""
    import mlflow

    run_dir = Path(cfg.out).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(run_dir)
    if uri == local_tracking_uri(run_dir) and acc.is_main_process:
        relocate_local_store(run_dir / "mlflow.db")
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
    run = mlflow.active_run()
    if ERROR_TAG in mlflow.get_run(run.info.run_id).data.tags:  # this run failed before: it goes on now
        mlflow.MlflowClient().delete_tag(run.info.run_id, ERROR_TAG)
    return run.info.run_id


def end_tracking_on_error(exc: BaseException) -> None:
    """End the active MLflow run (if any) as FAILED, or KILLED for a pre-emption or an interrupt, with
    ``exc`` as its ``eossl.error`` tag. Never raises: the training error is what the user must see."""
    import mlflow

    from .preemption import Preempted

    run = mlflow.active_run()
    if run is None:
        return
    killed = isinstance(exc, (Preempted, KeyboardInterrupt))
    try:
        mlflow.set_tag(ERROR_TAG, f"{type(exc).__name__}: {exc}"[:MAX_TAG_CHARS])
    except Exception as tag_error:  # the tracking server may be what failed
        print(f"could not record the error in MLflow run {run.info.run_id}: {tag_error}", flush=True)
    try:
        mlflow.end_run(status="KILLED" if killed else "FAILED")
    except Exception as end_error:
        print(f"could not end MLflow run {run.info.run_id}: {end_error}", flush=True)
