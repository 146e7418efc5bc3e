"""A run's whole state at a step: written by every rank into one atomic checkpoint, checked and restored
on resume (see ``checkpoint`` for the files and their atomic publication).

What a resume may change is explicit: the loop's ``max_steps``, ``ckpt_every``, ``log_every``,
``system_metrics_every_s`` and ``batch_size`` (with the world size, at the same global batch), plus the
keys a method declares in ``resume_may_change``. Everything else is recorded in the checkpoint with its
digest and checked on resume; a refusal names each key that changed. A setting added to eossl after a
checkpoint was written resumes at its default (the run then behaves as it did before the setting existed).

Where things are is not part of a run's identity: ``out`` and ``data`` (paths, URLs) are left out of the
digest, and the dataset enters it by its content digest (the manifest's sha256) instead. A run folder can
be moved, and a run resumed on another cluster where the dataset lies elsewhere, as long as it is the same
dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoint import (
    CheckpointError,
    fresh_staging_dir,
    latest_checkpoint,
    load_rng_state,
    load_tensor_file,
    publish,
    rng_state,
    save_tensor_file,
    staging_dir,
    write_json_atomic,
)
from .config import TrainConfig, flatten
from .distributed import all_gather_objects

__all__ = [
    "RESUME_MAY_CHANGE",
    "RunCheckpointer",
    "config_changes",
    "config_digest",
    "resume_values",
    "truncate_history",
]

# batch_size may change with the world size (elastic resume): the global batch is checked instead.
RESUME_MAY_CHANGE = ("max_steps", "ckpt_every", "log_every", "batch_size", "system_metrics_every_s")
# Locations, not content: the dataset is identified by its manifest digest instead, and the starting
# weights were read once, at the first step (a resume reads the checkpoint and starting_weights.json).
LOCATIONS = ("out", "data", "backbone.weights")


def resume_values(cfg: TrainConfig, may_change: tuple[str, ...] = (), dataset_digest: str = "") -> dict:
    """Every config value a checkpoint is checked against, as JSON values: all but those a resume may
    change and the locations, plus the dataset's content digest (its manifest's sha256)."""
    skip = (*RESUME_MAY_CHANGE, *LOCATIONS, *may_change)
    flat = {k: v for k, v in flatten(cfg).items() if k not in skip}
    flat["dataset_manifest_sha256"] = dataset_digest
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def config_digest(cfg: TrainConfig, may_change: tuple[str, ...] = (), dataset_digest: str = "") -> str:
    """16 hex digits over :func:`resume_values`."""
    values = resume_values(cfg, may_change, dataset_digest)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def config_changes(recorded: dict, current: dict, defaults: dict) -> list[str]:
    """``key: checkpoint value -> this run's value`` for every value a resume may not change.

    A key the checkpoint does not record is a setting added to eossl after it was written: it counts only
    when this run sets it away from its default (at the default, the run behaves as before the setting
    existed). A key only the checkpoint records was removed or renamed since: it counts.
    """
    changes = []
    for key in sorted(set(recorded) | set(current)):
        if key not in recorded:
            if current[key] != defaults.get(key, current[key]):
                changes.append(f"{key}: (not in the checkpoint) -> {current[key]!r}")
        elif key not in current:
            changes.append(f"{key}: {recorded[key]!r} -> (no such setting now)")
        elif recorded[key] != current[key]:
            changes.append(f"{key}: {recorded[key]!r} -> {current[key]!r}")
    return changes


def truncate_history(history: Path, step: int) -> None:
    """Drop history rows logged after ``step``: the resumed run logs those steps again."""
    if not history.exists():
        return
    rows = [
        line for line in history.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    tmp = history.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, history)


class RunCheckpointer:
    """Saves and restores the method, optimiser, loss scaler, every rank's RNGs and the loader position.

    Args:
        acc: the run's accelerator (rank, world size, scaler, barriers).
        cfg: the run's config (its batch size and values are recorded and checked).
        may_change: the method's ``resume_may_change``.
        dataset_digest: the dataset's content digest (its manifest's sha256).
    """

    def __init__(self, acc: Accelerator, cfg: TrainConfig, may_change: tuple[str, ...], dataset_digest: str):
        self.acc, self.cfg = acc, cfg
        self.values = resume_values(cfg, may_change, dataset_digest)
        self.digest = config_digest(cfg, may_change, dataset_digest)
        defaults = TrainConfig(method=cfg.method, data=cfg.data, out=cfg.out)
        self.defaults = resume_values(defaults, may_change, dataset_digest)
        self.run_dir = Path(cfg.out)

    def save(self, step: int, method: torch.nn.Module, optimizer, loader, mlflow_run_id: str | None) -> None:
        """Every rank writes its RNG states, rank 0 the rest; published once all are written."""
        acc = self.acc
        staging = staging_dir(self.run_dir, step)
        if acc.is_main_process:
            fresh_staging_dir(self.run_dir, step)
        acc.wait_for_everyone()
        try:
            self._write(staging, step, method, optimizer, loader, mlflow_run_id)
        except OSError as exc:
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint of step {step} not written: {exc}. The last complete checkpoint "
                f"({latest_checkpoint(self.run_dir) or 'none'}) is unchanged"
            ) from exc
        acc.wait_for_everyone()

    def _write(self, staging: Path, step: int, method, optimizer, loader, mlflow_run_id) -> None:
        acc = self.acc
        save_tensor_file(rng_state(), staging / f"rng-rank{acc.process_index}.pt")
        corrupt = all_gather_objects(loader.corrupt_state())  # every rank's skipped samples (a collective)
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_tensor_file(method.state_dict(), staging / "model.pt")
            save_tensor_file(optimizer.state_dict(), staging / "optimizer.pt")
            if acc.scaler is not None:
                save_tensor_file(acc.scaler.state_dict(), staging / "scaler.pt")
            write_json_atomic(
                staging / "trainer.json",
                {
                    "step": step,
                    "epoch": loader.position.epoch,
                    "loader": loader.state_dict(),
                    "replaced_samples": corrupt,  # one entry per rank
                    "mlflow_run_id": mlflow_run_id,
                    "world_size": acc.num_processes,
                    "global_batch": self.cfg.batch_size * acc.num_processes,
                    "config_digest": self.digest,
                    "config": self.values,  # what the digest covers, so a refusal names the keys
                },
            )
            publish(self.run_dir, step, keep=2)

    def restore(self, method: torch.nn.Module, optimizer, loader) -> tuple[int, str | None] | None:
        """Load the latest checkpoint into the run's objects: (step, MLflow run id), or None without one.

        Raises:
            CheckpointError: the checkpoint was written with another config or another global batch.
        """
        acc = self.acc
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return None
        trainer = json.loads((ckpt / "trainer.json").read_text())
        self._check(ckpt, trainer)
        method.load_state_dict(load_tensor_file(ckpt / "model.pt"))
        optimizer.load_state_dict(load_tensor_file(ckpt / "optimizer.pt"))
        if acc.scaler is not None and (ckpt / "scaler.pt").exists():
            acc.scaler.load_state_dict(load_tensor_file(ckpt / "scaler.pt"))
        rng_file = ckpt / f"rng-rank{acc.process_index}.pt"
        # Absent for new ranks after the world size grew: the data order stays exact regardless.
        if rng_file.exists():
            load_rng_state(load_tensor_file(rng_file))
        loader.load_state_dict(trainer["loader"])
        if "replaced_samples" in trainer:  # absent in checkpoints of older eossl: the counts restart
            loader.load_corrupt_state(trainer["replaced_samples"])
        step = trainer["step"]
        if acc.is_main_process:
            truncate_history(self.run_dir / "history.jsonl", step)
            print(f"resumed from {ckpt} at step {step}")
        return step, trainer.get("mlflow_run_id")

    def _check(self, ckpt: Path, trainer: dict) -> None:
        rule = (
            "only max_steps, ckpt_every, log_every, system_metrics_every_s, and batch_size with the world "
            "size, may change on resume; the dataset may move but its content must be the same"
        )
        if "config" in trainer:  # the values are recorded: name what changed
            changes = config_changes(trainer["config"], self.values, self.defaults)
            if changes:
                raise CheckpointError(
                    f"{ckpt} was written with another configuration or another dataset ({rule}): "
                    f"{'; '.join(changes)}. Resume with the checkpoint's values, or start a new run folder"
                )
        elif trainer["config_digest"] != self.digest:  # a checkpoint of an older eossl: its digest only
            raise CheckpointError(
                f"{ckpt} was written with another configuration or another dataset ({rule}); "
                "start a new run folder"
            )
        ranks = self.acc.num_processes
        global_batch = self.cfg.batch_size * ranks
        if trainer.get("global_batch", global_batch) != global_batch:
            raise CheckpointError(
                f"{ckpt} was written at a global batch of {trainer['global_batch']} ({trainer['world_size']} "
                f"ranks); this run has {global_batch} ({self.cfg.batch_size} x {ranks} ranks). To resume on "
                f"another number of ranks keep the global batch: --set batch_size="
                f"{trainer['global_batch'] / ranks:g}"
            )
