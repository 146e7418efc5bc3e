"""The one training loop for every method, on one CPU, one GPU, many GPUs or many nodes (accelerate).

Each optimiser step reads in a fixed order: schedules -> autocast forward -> loss -> finite check ->
backward -> clip -> step -> EMA/queue -> log -> checkpoint. One precision path: accelerate's autocast and
(fp16 only) its gradient scaler.

Pre-emption: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they stop a job) sets a flag; at
the next step boundary every rank agrees on it (one all-reduce), the run checkpoints and ``train`` raises
:class:`Preempted`. Running the same command again resumes exactly there (launch/slurm requeues). Ctrl-C
(SIGINT) does the same, so an interactive stop loses no steps; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm import tqdm

from eossl.streaming.loader import LoaderConfig, SSLLoader
from eossl.streaming.plan import PlanConfig
from eossl.streaming.storage import StorageOptions

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_rng_state,
    load_tensor_file,
    publish,
    rng_state,
    save_tensor_file,
    staging_dir,
    state_digest,
    write_json_atomic,
)
from .config import TrainConfig, flatten, to_yaml
from .distributed import all_reduce_max, all_reduce_min
from .export import export_backbone
from .methods import get_method
from .schedules import cosine_schedule, scaled_lr
from .tracking import start_tracking

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "RunResult", "StopRequest", "train"]

# SIGTERM/SIGUSR1: pre-emption (SLURM, Kubernetes, studies); SIGINT: Ctrl-C, which a terminal sends to the whole
# process group, so every rank and reader worker gets it too.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; launch kits and studies resume on it


class Preempted(RuntimeError):
    """The run stopped on a pre-emption signal after writing a checkpoint; rerun the command to resume."""

    def __init__(self, step: int, signum: int, run_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after a checkpoint in "
                         f"{run_dir / 'checkpoints'}; run the same command again to resume")
        self.step, self.signum = step, signum


class StopRequest:
    """The stop signal this process received (``signum``, 0 for none), acted on at the next step boundary.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once: the user asked twice, so no checkpoint is waited for.
    It counts only from ``REPEAT_AFTER_S`` after the first: one Ctrl-C reaches a rank twice under ``accelerate
    launch`` (from the terminal to the process group, and forwarded by the launcher's agent). Other signals in
    between (a study's SIGUSR1) do not reset it.
    """

    REPEAT_AFTER_S = 1.0

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.signum = 0
        self.first_interrupt: float | None = None

    def __call__(self, signum: int, _frame=None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_interrupt is None:
                self.first_interrupt = now
            elif now - self.first_interrupt >= self.REPEAT_AFTER_S:
                raise KeyboardInterrupt
        if not self.signum:
            again = " (Ctrl-C again to stop without it)" if signum == signal.SIGINT else ""
            print(f"rank {self.rank}: {signal.Signals(signum).name} received: checkpointing at the next step "
                  f"boundary{again}", flush=True)
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle ``STOP_SIGNALS`` inside the block (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    mlflow_run_id: str | None
    backbone_dir: Path | None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _loader_config(cfg: TrainConfig, views) -> LoaderConfig:
    lc = cfg.loader
    return LoaderConfig(
        batch_size=cfg.batch_size, split=lc.split, views=views, device=lc.device, num_threads=lc.threads,
        workers=lc.workers, plan=PlanConfig(seed=cfg.seed, shuffle_buffer=lc.shuffle_buffer),
        storage=StorageOptions(cache_dir=lc.cache_dir, cache_bytes=int(lc.cache_gb * 2**30), retries=lc.retries,
                               timeout_s=lc.timeout_s),
    )


def _optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name must be sgd or adamw, got {o.name!r}")


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Run:
    """State of one run: built once, then ``fit()``; split in methods so each stays short."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # gloo ranks (see launch/accelerate/cpu_2proc.yaml)
        # Sensor pairs train only the query sensor's adapter (S2 query, S1 key) unless symmetric: DDP must
        # accept parameters without gradients.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.loader.mode == "pair")
        if cfg.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("precision=fp16 needs a CUDA GPU (its loss scaler runs there); use precision=bf16 on CPU")
        # 'auto': what the launcher says (accelerate launch exports its config's mixed_precision).
        precision = None if cfg.precision == "auto" else cfg.precision
        self.acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                               log_with="mlflow", kwargs_handlers=[ddp])
        if self.acc.mixed_precision == "fp16" and self.acc.device.type != "cuda":
            raise ValueError("mixed precision fp16 (from the accelerate config) needs a CUDA GPU; use bf16 on CPU")
        self.main = self.acc.is_main_process
        set_seed(cfg.seed)
        self.spec = get_method(cfg.method)
        views = self.spec.views(cfg)
        self.loader = SSLLoader(cfg.data, _loader_config(cfg, views), rank=self.acc.process_index,
                                world_size=self.acc.num_processes)
        self.method = self.spec.build(cfg, self.loader.channels, views.mode)
        if cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.method.encoder_q.compile()
        self.steps_per_epoch = max(len(self.loader) // cfg.grad_accum, 1)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = min(cfg.max_steps, self.total_steps) if cfg.max_steps else self.total_steps
        self.effective_batch = cfg.batch_size * self.acc.num_processes * cfg.grad_accum
        self.lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, self.effective_batch, cfg.optim.base_batch)
        warmup = cfg.optim.warmup_steps + round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.lr_schedule = (cosine_schedule(self.lr, cfg.optim.min_lr, self.total_steps, warmup)
                            if cfg.optim.schedule == "cosine" else np.full(self.total_steps, self.lr))
        self.schedules = self.spec.schedules(cfg, self.total_steps, self.steps_per_epoch)
        groups = (self.method.param_groups() if hasattr(self.method, "param_groups")
                  else [{"params": [p for p in self.method.parameters() if p.requires_grad]}])
        self.optimizer = _optimizer(cfg, groups, self.lr)
        self.step = 0
        self.mlflow_run_id = None
        self.history = self.run_dir / "history.jsonl"
        if resume:
            self._resume()
        self.model, self.optimizer = self.acc.prepare(self.method, self.optimizer)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        trainer = json.loads((ckpt / "trainer.json").read_text())
        if trainer["config_digest"] != self._config_digest():
            raise CheckpointError(f"{ckpt} was written with another configuration (only max_steps, and batch_size "
                                  "with the world size, may change on resume); start a new run folder")
        global_batch = self.cfg.batch_size * self.acc.num_processes
        if trainer.get("global_batch", global_batch) != global_batch:
            raise CheckpointError(
                f"{ckpt} was written at a global batch of {trainer['global_batch']} ({trainer['world_size']} ranks); "
                f"this run has {global_batch} ({self.cfg.batch_size} x {self.acc.num_processes} ranks). To resume on "
                f"another number of ranks keep the global batch: --set batch_size="
                f"{trainer['global_batch'] / self.acc.num_processes:g}")
        self.method.load_state_dict(load_tensor_file(ckpt / "model.pt"))
        self.optimizer.load_state_dict(load_tensor_file(ckpt / "optimizer.pt"))
        if self.acc.scaler is not None and (ckpt / "scaler.pt").exists():
            self.acc.scaler.load_state_dict(load_tensor_file(ckpt / "scaler.pt"))
        rng_file = ckpt / f"rng-rank{self.acc.process_index}.pt"
        if rng_file.exists():  # absent for new ranks after the world size grew: data order stays exact regardless
            load_rng_state(load_tensor_file(rng_file))
        self.loader.load_state_dict(trainer["loader"])
        self.step = trainer["step"]
        self.mlflow_run_id = trainer.get("mlflow_run_id")
        if self.main:
            self._truncate_history()
        if self.main:
            print(f"resumed from {ckpt} at step {self.step}")

    def _truncate_history(self) -> None:
        """Drop history rows logged after the checkpoint: the resumed run logs those steps again."""
        if not self.history.exists():
            return
        rows = [line for line in self.history.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        tmp = self.history.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, self.history)

    def _config_digest(self) -> str:
        # batch_size may change with the world size (elastic resume): the global batch is checked instead.
        skip = ("max_steps", "ckpt_every", "log_every", "batch_size")
        flat = {k: v for k, v in flatten(self.cfg).items() if k not in skip}
        return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def save_checkpoint(self) -> None:
        staging = staging_dir(self.run_dir, self.step)
        if self.main:
            staging.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        save_tensor_file(rng_state(), staging / f"rng-rank{self.acc.process_index}.pt")
        self.acc.wait_for_everyone()
        if self.main:
            method = self.acc.unwrap_model(self.model)
            save_tensor_file(method.state_dict(), staging / "model.pt")
            save_tensor_file(self.optimizer.state_dict(), staging / "optimizer.pt")
            if self.acc.scaler is not None:
                save_tensor_file(self.acc.scaler.state_dict(), staging / "scaler.pt")
            write_json_atomic(staging / "trainer.json", {
                "step": self.step, "epoch": self.loader.position.epoch, "loader": self.loader.state_dict(),
                "mlflow_run_id": self.mlflow_run_id, "world_size": self.acc.num_processes,
                "global_batch": self.cfg.batch_size * self.acc.num_processes,
                "config_digest": self._config_digest(),
            })
            publish(self.run_dir, self.step, keep=2)
        self.acc.wait_for_everyone()

    # -- the loop ------------------------------------------------------------------------------------
    def _tracking(self) -> None:
        manifest = self.loader.manifest
        spec = self.loader.views.input_spec
        mean, std = spec.normalisation(manifest)
        params = {**flatten(self.cfg), "effective_batch_size": self.effective_batch, "lr_scaled": self.lr,
                  "world_size": self.acc.num_processes, "steps_per_epoch": self.steps_per_epoch,
                  "mixed_precision": self.acc.mixed_precision,
                  "total_steps": self.total_steps}
        tags = {"git_commit": _git_commit(), "dataset_manifest_sha256": manifest.get("manifest_sha256", ""),
                "dataset": self.cfg.data, "lr_scaling_rule": self.cfg.optim.lr_scaling,
                "normalisation": json.dumps({"channels": spec.channel_names, "mean": mean.round(6).tolist(),
                                             "std": std.round(6).tolist()})}
        self.mlflow_run_id = start_tracking(self.acc, self.cfg, params, tags, self.mlflow_run_id)

    def _log_nonfinite(self, count: int) -> None:
        import mlflow

        mlflow.log_metric("nonfinite_steps", count, step=self.step)

    def _log(self, values: dict) -> None:
        self.acc.log(values, step=self.step)
        if self.main:
            with open(self.history, "a") as f:
                f.write(json.dumps({"step": self.step, **values}) + "\n")

    def _stop_requested(self) -> int:
        """The signal any rank received (0: none): every rank stops at the same step."""
        return int(all_reduce_max(torch.tensor(float(self.stop.signum), device=self.acc.device)))

    def _preempt(self, signum: int) -> None:
        self.save_checkpoint()
        if self.main:
            import mlflow

            mlflow.end_run(status="KILLED")  # reopened (RUNNING) by the resumed run
        raise Preempted(self.step, signum, self.run_dir)

    def fit(self) -> RunResult:
        self.stop = StopRequest(self.acc.process_index)
        with self.stop.installed():
            return self._fit()

    def _fit(self) -> RunResult:
        cfg, acc = self.cfg, self.acc
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        acc.wait_for_everyone()
        self._tracking()
        if self.main:
            print(f"precision {acc.mixed_precision}; effective batch size {self.effective_batch} (= {cfg.batch_size} x {acc.num_processes} ranks x "
                  f"{cfg.grad_accum} accumulation), lr {self.lr:.4g} ({cfg.optim.lr_scaling} scaling of "
                  f"{cfg.optim.lr} at batch {cfg.optim.base_batch}), {self.total_steps} steps planned, "
                  f"stopping at {self.stop_step}")
        bar = tqdm(total=self.stop_step, initial=self.step, disable=not self.main, unit="step", dynamic_ncols=True)
        loss_value, nonfinite, consecutive = float("nan"), 0, 0
        wait, t_last, samples = 0.0, time.perf_counter(), 0
        self.model.train()
        while self.step < self.stop_step:
            micro = 0
            batches = iter(self.loader)
            while self.step < self.stop_step:
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception:
                    if self.stop.signum:  # the signal also reached the reader's workers: stop cleanly
                        bar.close()
                        self._preempt(self.stop.signum)
                    raise
                wait += time.perf_counter() - t0
                views = [v.to(acc.device, non_blocking=True) for v in batch.views]
                samples += views[0].shape[0] * acc.num_processes
                values = {k: float(v[self.step]) for k, v in self.schedules.items()}
                for group in self.optimizer.param_groups:  # schedules first, indexed by global step
                    group["lr"] = float(self.lr_schedule[self.step])
                if "weight_decay" in values:  # the first group is the regularised one
                    self.optimizer.param_groups[0]["weight_decay"] = values["weight_decay"]
                unwrapped = acc.unwrap_model(self.model)
                if hasattr(unwrapped, "set_step"):
                    unwrapped.set_step(values, self.step // self.steps_per_epoch, cfg.dino.freeze_last_layer_epochs)
                with acc.accumulate(self.model):
                    with acc.autocast():
                        loss, logs = self.model(views)
                    finite = all_reduce_min(torch.isfinite(loss.detach()).float())  # all ranks skip together
                    if float(finite) < 1.0:
                        nonfinite += 1
                        consecutive += 1
                        unwrapped.discard_pending()
                        self.optimizer.zero_grad(set_to_none=True)
                        acc.print(f"step {self.step}: non-finite loss ({float(loss)}), step skipped "
                                  f"({consecutive} in a row)")
                        if self.main:
                            self._log_nonfinite(nonfinite)
                        if consecutive >= cfg.max_nonfinite_steps:
                            raise FloatingPointError(
                                f"{consecutive} consecutive non-finite losses at step {self.step}: training diverged "
                                "(with fp16 try bf16, a lower lr or teacher temperature, or gradient clipping); "
                                f"the last checkpoint is in {self.run_dir / 'checkpoints'}")
                        continue
                    consecutive = 0
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.clip_grad > 0:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
                    if acc.sync_gradients and hasattr(unwrapped, "before_optimizer_step"):
                        unwrapped.before_optimizer_step()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro += 1
                if not acc.sync_gradients:
                    continue
                unwrapped.after_step(values["momentum"])
                self.step += 1
                loss_value = float(acc.reduce(loss.detach().float(), reduction="mean"))
                logged = {"loss": loss_value}
                if self.step % cfg.log_every == 0 or self.step == self.stop_step:
                    elapsed = time.perf_counter() - t_last
                    logged.update({
                        "lr": float(self.lr_schedule[self.step - 1]), "epoch": self.loader.position.epoch,
                        "samples_per_s": samples / elapsed, "data_wait_fraction": wait / elapsed,
                        "memory_mb": _memory_mb(), "nonfinite_steps": nonfinite,
                        **{k: float(v) for k, v in logs.items()}, **{f"schedule_{k}": v for k, v in values.items()},
                    })
                    bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{samples / elapsed:.1f}")
                    wait, t_last, samples = 0.0, time.perf_counter(), 0
                self._log(logged)
                bar.update(1)
                signum = self._stop_requested()
                if signum:
                    bar.close()
                    self._preempt(signum)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < self.stop_step:
                    self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        backbone_dir = self._finish()
        return RunResult(self.run_dir, self.step, loss_value, self.mlflow_run_id, backbone_dir)

    def _finish(self) -> Path | None:
        acc = self.acc
        method = acc.unwrap_model(self.model)
        digests = {"rank": acc.process_index, "world_size": acc.num_processes, "step": self.step,
                   "params_sha256": state_digest(method, "params"), "state_sha256": state_digest(method)}
        if hasattr(method, "queue"):
            digests["queue_sha256"] = hashlib.sha256(method.queue.cpu().numpy().tobytes()
                                                     + method.queue_ptr.cpu().numpy().tobytes()).hexdigest()
        (self.run_dir / "ranks").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "ranks" / f"rank-{acc.process_index}.json", digests)
        backbone_dir = None
        if self.main:
            backbone_dir = export_backbone(method.backbone(), self.loader, self.cfg, self.step, self.run_dir)
            import mlflow

            mlflow.log_artifact(str(self.run_dir / "config.yaml"))
            mlflow.log_artifacts(str(backbone_dir), artifact_path="backbone")
        acc.wait_for_everyone()
        acc.end_training()
        return backbone_dir


def _lock_run_dir(run_dir: Path):
    """One training process group per run folder: a second one (a stale study re-run, a duplicate job)
    would interleave checkpoints. Global rank 0 holds an exclusive lock; the OS drops it when it dies."""
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".train.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise RuntimeError(f"{run_dir}: another process is training into this run folder (lock "
                           f"{run_dir / '.train.lock'}); stop it first, or use another --out") from None
    return lock


def train(cfg: TrainConfig, resume: bool = True) -> RunResult:
    """Run (or continue, when ``resume`` and RUN_DIR has a checkpoint) a pre-training run."""
    if not math.isfinite(cfg.optim.lr):
        raise ValueError("optim.lr must be finite")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lock = _lock_run_dir(Path(cfg.out))
    try:
        return _Run(cfg, resume).fit()
    finally:
        if lock is not None:
            lock.close()
