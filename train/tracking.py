"""MLflow tracking through accelerate's tracker: main process only, one run per training run.

One store per project: the tracking URI is MLflow's standard ``MLFLOW_TRACKING_URI``; without it, MLflow's
own default, a SQLite store ``mlflow.db`` in the current folder (artifacts in ``mlartifacts`` beside it).
Training, evaluation and studies started from the same folder therefore share one store, and one
``mlflow ui`` (started in that folder) shows them together. A resumed run continues the same MLflow run (its
id is checkpointed). A run created beforehand by an orchestrator (a study cell nested under its study) is
named by ``EOSSL_MLFLOW_RUN_ID``.

Tags that describe one run (commit, dataset, normalisation) are set on the run only: the experiment is
created here, without tags, before accelerate's tracker (which would copy the first run's tags onto a new
experiment) finds it.

A run that ends on an exception is ended here as FAILED (KILLED for a pre-emption or an interrupt) with
the error in its ``eossl.error`` tag: left open, MLflow's exit hook would close it as FINISHED. A resumed
run is RUNNING again and its ``eossl.error`` tag is removed (the failure stays in its logs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator

from .config import TrainConfig

__all__ = [
    "ERROR_TAG",
    "artifact_root",
    "default_tracking_uri",
    "point_mlflow_at",
    "end_tracking_on_error",
    "ensure_experiment",
    "git_commit",
    "local_tracking_uri",
    "log_dataset_input",
    "quiet_mlflow_logs",
    "relocate_local_store",
    "start_tracking",
    "system_metrics",
]

# MLflow's and its migration tool's INFO lines ("Creating initial MLflow database tables...") on a new store.
_NOISY_LOGGERS = ("mlflow", "alembic")
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


def quiet_mlflow_logs() -> None:
    """Keep MLflow's own INFO lines (database creation and migrations) out of every command's output."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def local_tracking_uri(folder: Path) -> str:
    """The SQLite store ``mlflow.db`` of ``folder`` (artifacts in ``mlartifacts`` beside it)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<current folder>/mlflow.db`` (MLflow's default).

    Resolved to an absolute path once, so a process that changes folder later still writes to the same store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(Path.cwd())


def point_mlflow_at(uri: str) -> None:
    """Make ``uri`` this process's MLflow store without changing its environment.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` so that child
    processes inherit it. Evaluations and studies run inside a caller's process (a notebook, a study, a
    test session): that write would silently send every later run and every process it starts to this
    store. The caller's variable is put back as it was.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The experiment's id in the current store, created (without tags) when new."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_root(tracking_uri))


def log_dataset_input(data: str, manifest: dict, context: str) -> None:
    """The dataset as an MLflow dataset input of the active run: name, digest (manifest sha256), source.

    Runs that read the same dataset then share one dataset entry in the MLflow UI, and a dataset that
    changed (another digest) is visible at a glance.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = data if "://" in data else str(Path(data).resolve())  # a local path logged absolute
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    name = Path(data.rstrip("/")).name or data
    # MLflow keeps at most 36 characters of a digest: a 32-hex prefix (the full one is a run tag).
    digest = (manifest.get("manifest_sha256") or "")[:32] or None
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest), context=context)


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


def system_metrics(every_s: float) -> bool:
    """Whether MLflow's system metrics can be logged every ``every_s`` seconds (0: not asked for).

    MLflow samples with ``psutil`` (and refuses to start a run without it) and reads GPUs with ``pynvml``:
    a missing package is said, never fatal, since the metrics are a help, not the run's purpose.
    """
    if every_s <= 0:
        return False
    if importlib.util.find_spec("psutil") is None:
        print(
            "system metrics not logged: the psutil package is not installed (pip install psutil)", flush=True
        )
        return False
    if importlib.util.find_spec("pynvml") is None:
        print(
            "system metrics without GPU figures: the pynvml package is not installed "
            "(pip install nvidia-ml-py); CPU, memory, disk and network are logged",
            flush=True,
        )
    return True


@contextlib.contextmanager
def _system_metrics_env(every_s: float) -> Iterator[None]:
    """MLflow's switches for the run started inside (its monitor reads them then), put back afterwards so
    that no later run of this process, and no process it starts, inherits them."""
    values = {
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": str(every_s),
        "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
    }
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_tracking(
    acc: Accelerator,
    cfg: TrainConfig,
    params: dict,
    tags: dict,
    run_id: str | None,
    description: str | None = None,
) -> str | None:
    """Start (or continue) the run's MLflow run; returns its id on the main process.

    Only the main process talks to MLflow (accelerate's trackers live there too): the other ranks return
    at once without importing it, ~3 CPU-seconds less to start each of them.
    """
    if not acc.is_main_process:
        return None
    import mlflow

    run_dir = Path(cfg.out).resolve()
    quiet_mlflow_logs()
    uri = default_tracking_uri()
    if uri.startswith("sqlite:///"):  # a moved project folder: artifacts beside it
        relocate_local_store(Path(uri.removeprefix("sqlite:///")).resolve())
    point_mlflow_at(uri)
    ensure_experiment(cfg.experiment, uri)  # before accelerate: it would tag a new one with the run's tags
    init = {"run_name": run_dir.name, "tags": tags}
    if description:
        init["description"] = description
    resumed = bool(run_id)
    run_id = run_id or os.environ.get("EOSSL_MLFLOW_RUN_ID") or None
    if run_id:
        init["run_id"] = run_id
    # A resumed run keeps the params logged at its start (MLflow refuses changed param values).
    sampled = system_metrics(cfg.system_metrics_every_s)
    with _system_metrics_env(cfg.system_metrics_every_s) if sampled else contextlib.nullcontext():
        acc.init_trackers(cfg.experiment, config=None if resumed else params, init_kwargs={"mlflow": init})
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
