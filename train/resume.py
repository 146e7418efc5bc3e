"""A run's whole state at a step: written by every rank into one atomic checkpoint, checked and restored
on resume (see ``checkpoint`` for the files and their atomic publication).

What a resume may change is explicit: the loop's ``max_steps``, ``ckpt_every``, ``log_every``,
``system_metrics_every_s`` and ``batch_size`` (with the world size, at the same global batch), plus the
keys a method declares in ``resume_may_change``. Everything else is in the config digest a checkpoint is
checked against.

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

__all__ = ["RESUME_MAY_CHANGE", "RunCheckpointer", "config_digest", "truncate_history"]

# batch_size may change with the world size (elastic resume): the global batch is checked instead.
RESUME_MAY_CHANGE = ("max_steps", "ckpt_every", "log_every", "batch_size", "system_metrics_every_s")
# Locations, not content: the dataset is identified by its manifest digest instead.
LOCATIONS = ("out", "data")


def config_digest(cfg: TrainConfig, may_change: tuple[str, ...] = (), dataset_digest: str = "") -> str:
    """16 hex digits over every config value but those a resume may change and the locations, plus the
    dataset's content digest (its manifest's sha256)."""
    skip = (*RESUME_MAY_CHANGE, *LOCATIONS, *may_change)
    flat = {k: v for k, v in flatten(cfg).items() if k not in skip}
    flat["dataset_manifest_sha256"] = dataset_digest
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        cfg: the run's config (its batch size and digest are recorded and checked).
        digest: :func:`config_digest` of ``cfg`` with the method's ``resume_may_change``.
    """

    def __init__(self, acc: Accelerator, cfg: TrainConfig, digest: str):
        self.acc, self.cfg, self.digest = acc, cfg, digest
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
        if trainer["config_digest"] != self.digest:
            raise CheckpointError(
                f"{ckpt} was written with another configuration or another dataset (only max_steps, "
                "and batch_size with the world size, may change on resume; the dataset may move but "
                "its content must be the same); start a new run folder"
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
