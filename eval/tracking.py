"""Where evaluation grids log, and how a cell is linked to the pre-training run it scores.

The store is the project's one store (``eossl.train.tracking.default_tracking_uri``: ``MLFLOW_TRACKING_URI``
when set, else ``mlflow.db`` in the current folder), the same one ``eossl train`` logs to: a backbone's
training run and its scores are found together. A cell run of a pre-trained row carries the training run's
id as the tag ``eossl.pretrain_run_id`` and a link to it (``eossl.pretrain_run``), read from the run's latest
checkpoint (``trainer.json``) or its model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from eossl.train.tracking import default_tracking_uri, ensure_experiment, point_mlflow_at, quiet_mlflow_logs

__all__ = ["eval_experiment", "pretrain_run_id", "pretrain_tags"]


def eval_experiment(out: Path, experiment: str) -> str:
    """Create ``out``, point MLflow at the project's store and return the experiment's id (created if new)."""
    out.mkdir(parents=True, exist_ok=True)
    quiet_mlflow_logs()
    uri = default_tracking_uri()
    point_mlflow_at(uri)
    return ensure_experiment(experiment, uri)


def _trainer_json(path: Path) -> Path | None:
    """``trainer.json`` of a checkpoint folder, or of a run folder's latest checkpoint."""
    if (path / "trainer.json").exists():
        return path / "trainer.json"
    pointer = path / "checkpoints" / "latest"
    if pointer.exists():
        candidate = path / "checkpoints" / pointer.read_text().strip() / "trainer.json"
        if candidate.exists():
            return candidate
    return None


def pretrain_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id of a pre-training run (or one of its checkpoints); None when it recorded none."""
    path = Path(run_dir)
    card = path / "backbone" / "model_card.json"
    if card.exists():
        run_id = json.loads(card.read_text()).get("mlflow_run_id")
        if run_id:
            return str(run_id)
    trainer = _trainer_json(path)
    if trainer is None:
        return None
    return json.loads(trainer.read_text()).get("mlflow_run_id") or None


def pretrain_tags(run_dir: str | Path | None) -> dict[str, str]:
    """Tags linking an evaluation run to its pre-training run: id, a link and the run folder (absolute)."""
    if run_dir is None:
        return {}
    tags = {"eossl.pretrain_dir": str(Path(run_dir).resolve())}
    run_id = pretrain_run_id(run_dir)
    if run_id:
        import mlflow

        tags["eossl.pretrain_run_id"] = run_id
        try:
            run = mlflow.get_run(run_id)
            tags["eossl.pretrain_run"] = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
        except Exception:  # the training run logged to another store: the id still names it
            tags["eossl.pretrain_run"] = f"runs:/{run_id}"
    return tags
