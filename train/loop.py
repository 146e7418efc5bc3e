"""The one training loop for every method, on one CPU, one GPU, many GPUs or many nodes (accelerate).

The loop never asks which method it runs: it calls the hooks of :class:`~eossl.train.method.SSLMethod`
unconditionally. Each optimiser step (``_Run._train_step``) reads in a fixed order: schedules -> autocast
forward and loss -> finite check -> backward -> clip -> step -> EMA/queue/center -> log; then, at the step
boundary, the stop-request check and the periodic checkpoint. One precision path: accelerate's autocast
and (fp16 only) its gradient scaler.

Pre-emption and Ctrl-C (``train/preemption.py``): a stop signal is acted on at the next step boundary,
where every rank agrees on it, the run checkpoints and ``train`` raises :class:`Preempted`; running the
same command again resumes exactly there (``train/resume.py``).

Failures: when the loader cannot deliver a batch (storage unavailable after its retries, a reader worker
that died), every rank agrees on it before the next forward, the run checkpoints at the last completed
step and ``train`` raises :class:`DataUnavailable` (exit code 76), so nothing since the last periodic
checkpoint is lost. A run that ends on any exception is marked FAILED in MLflow (KILLED when pre-empted
or interrupted) with the error in its ``eossl.error`` tag: MLflow's own exit hook would mark it FINISHED.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from eossl.streaming.loader import CorruptDataError, SSLLoader
from eossl.streaming.storage_errors import CorruptShardError

from .builders import build_accelerator, build_optimizer, compile_backend, loader_config, lr_schedule
from .checkpoint import latest_checkpoint, state_digest, write_json_atomic
from .config import TrainConfig, flatten, to_yaml
from .distributed import all_reduce_max, all_reduce_min
from .export import export_backbone
from .input_norm import input_norm, save_input_norm, saved_input_norm
from .methods import get_method
from .preemption import DataUnavailable, Preempted, StopRequest, lock_run_dir
from .progress import Countdown, interactive, log_line
from .resume import RunCheckpointer
from .schedules import scaled_lr
from .tracking import end_tracking_on_error, git_commit, log_dataset_input, start_tracking
from .weights import apply_starting_weights, read_starting_weights

__all__ = ["RunResult", "train"]


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    mlflow_run_id: str | None
    backbone_dir: Path | None


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class _Meter:
    """Counters between two logged steps (throughput, data wait) and of skipped non-finite steps."""

    wait: float = 0.0
    samples: int = 0
    t_last: float = field(default_factory=time.perf_counter)
    nonfinite: int = 0
    consecutive: int = 0

    def restart(self) -> None:
        self.wait, self.samples, self.t_last = 0.0, 0, time.perf_counter()


class _Run:
    """State of one run: built once, then ``fit()``; split in methods so each stays short."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.acc = build_accelerator(cfg)
        self.main = self.acc.is_main_process
        set_seed(cfg.seed)
        method_cls = get_method(cfg.method)
        views = method_cls.views(cfg)
        self.loader = SSLLoader(
            cfg.data,
            loader_config(cfg, views),
            rank=self.acc.process_index,
            world_size=self.acc.num_processes,
        )
        self.method = method_cls.build(cfg, self.loader.channels, views.mode)
        self._starting_weights(resume)
        if cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.method.compile_target().compile(backend=compile_backend(cfg.compile_backend))
        self.steps_per_epoch = max(len(self.loader) // cfg.grad_accum, 1)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = min(cfg.max_steps, self.total_steps) if cfg.max_steps else self.total_steps
        self.effective_batch = cfg.batch_size * self.acc.num_processes * cfg.grad_accum
        self.lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, self.effective_batch, cfg.optim.base_batch)
        self.lr_schedule = lr_schedule(cfg, self.lr, self.total_steps, self.steps_per_epoch)
        self.schedules = method_cls.schedules(cfg, self.total_steps, self.steps_per_epoch)
        self.optimizer = build_optimizer(cfg, self.method.param_groups(), self.lr)
        self.checkpointer = RunCheckpointer(
            self.acc, cfg, method_cls.resume_may_change, self.loader.manifest.get("manifest_sha256", "")
        )
        self.step = 0
        self.mlflow_run_id = None
        self.history = self.run_dir / "history.jsonl"
        if resume:
            restored = self.checkpointer.restore(self.method, self.optimizer, self.loader)
            if restored is not None:
                self.step, self.mlflow_run_id = restored
        self.model, self.optimizer = self.acc.prepare(self.method, self.optimizer)
        self.method = self.acc.unwrap_model(self.model)  # the hooks' module (DDP wraps it in ``model``)

    def _starting_weights(self, resume: bool) -> None:
        """Load ``backbone.weights`` into every encoder and fix the encoder's input normalisation.

        A run resuming from a checkpoint takes both from what it recorded at its start: its checkpoint
        replaces the starting weights anyway, and their file need not be there any more.
        """
        cfg, view_set = self.cfg, self.loader.views
        self.input_norm, self.starting = saved_input_norm(self.run_dir)
        if resume and self.input_norm is not None and latest_checkpoint(self.run_dir) is not None:
            return
        specs = [view_set.view_spec(v) for v in range(len(view_set.views))]
        view_channels = [spec.channel_names for spec in specs]
        weights = None
        self.starting = None
        if cfg.backbone.weights:
            weights = read_starting_weights(cfg.backbone.weights, cfg.backbone.weights_input)
            self.starting = apply_starting_weights(self.method, weights, view_channels)
        stats = [spec.normalisation(self.loader.manifest) for spec in specs]
        self.input_norm = input_norm(view_channels, stats, cfg.backbone.normalisation, weights)

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step, self.method, self.optimizer, self.loader, self.mlflow_run_id)

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        self.stop = StopRequest(self.acc.process_index)
        try:
            with self.stop.installed():
                return self._fit()
        except BaseException as exc:  # recorded as what it was, then raised on
            if self.main:
                end_tracking_on_error(exc)
            raise

    def _fit(self) -> RunResult:
        self._start()
        # A bar on a terminal; in a log file (a cluster job's output) plain timestamped lines instead.
        self.plain = self.main and not interactive()
        self.bar = tqdm(
            total=self.stop_step,
            initial=self.step,
            disable=not self.main or self.plain,
            unit="step",
            dynamic_ncols=True,
        )
        self.countdown = Countdown(self.stop_step, self.step)
        self.meter = _Meter()
        self.boundary = self.loader.position  # the loader's position at the last completed step
        loss = float("nan")
        self.model.train()
        while self.step < self.stop_step:  # one pass of the loader per iteration: an epoch
            for views in self._batches():
                step_loss = self._train_step(views)
                if step_loss is not None:  # an optimiser step completed
                    loss = step_loss
                    self._step_boundary()
        self.bar.close()
        self.save_checkpoint()
        backbone_dir = self._finish()
        return RunResult(self.run_dir, self.step, loss, self.mlflow_run_id, backbone_dir)

    def _start(self) -> None:
        """Run folder, config.yaml, tracking, and the run's sizes on the console."""
        cfg, acc = self.cfg, self.acc
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            save_input_norm(self.run_dir, self.input_norm, self.starting)
        acc.wait_for_everyone()
        self._tracking()
        if self.main:
            print(
                f"precision {acc.mixed_precision}; effective batch size {self.effective_batch} (= "
                f"{cfg.batch_size} x {acc.num_processes} ranks x {cfg.grad_accum} accumulation), lr "
                f"{self.lr:.4g} ({cfg.optim.lr_scaling} scaling of {cfg.optim.lr} at batch "
                f"{cfg.optim.base_batch}), {self.total_steps} steps planned, stopping at {self.stop_step}"
            )
            if self.starting is not None:
                print(
                    f"starting weights {self.starting['source']} ({self.starting['first_layer']}; adapters "
                    f"{self.starting['adapters']}); input normalisation {self.input_norm.choice}"
                )

    def _batches(self) -> Iterator[list[torch.Tensor]]:
        """One pass of the loader, views on the device, until the last planned step."""
        batches = iter(self.loader)
        while self.step < self.stop_step:
            t0 = time.perf_counter()
            failure: Exception | None = None
            try:
                batch = next(batches)
            except StopIteration:  # every rank has len(loader) batches: all stop here together
                return
            except Exception as exc:
                if self.stop.signum:  # the signal also reached the reader's workers: stop cleanly
                    self._preempt(self.stop.signum)
                failure = exc
            if self._any_rank_failed(failure is not None):
                self._data_unavailable(failure)
            self.meter.wait += time.perf_counter() - t0
            views = self.input_norm.apply([v.to(self.acc.device, non_blocking=True) for v in batch.views])
            self.meter.samples += views[0].shape[0] * self.acc.num_processes
            yield views

    def _train_step(self, views: list[torch.Tensor]) -> float | None:
        """One micro-batch; the loss (mean over ranks) when it completed an optimiser step, else None."""
        acc, method = self.acc, self.method
        # Schedules, indexed by global step, into the optimiser and the method.
        values = self._apply_schedules()
        with acc.accumulate(self.model):
            # Forward and loss under autocast.
            with acc.autocast():
                loss, logs = self.model(views)
            # Finite check: every rank skips a non-finite step together.
            if not self._finite(loss):
                return None
            # Backward (scaled under fp16; gradients all-reduced on the last micro-batch).
            acc.backward(loss)
            # Clip, then the method's last say on gradients (once per optimiser step).
            if acc.sync_gradients:
                # fp16: unscale once, so the method may clip any way (per tensor: several calls).
                acc.unscale_gradients()
                method.clip_gradients(torch.nn.utils.clip_grad_norm_, self.cfg.optim.clip_grad)
                method.before_optimizer_step()
            # Optimiser step (accelerate skips it between accumulated micro-batches).
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            return None
        # EMA encoders, queue, center.
        method.after_step(values)
        self.step += 1
        # Log.
        loss_value = float(acc.reduce(loss.detach().float(), reduction="mean"))
        self._log_step(loss_value, logs, values)
        return loss_value

    def _apply_schedules(self) -> dict[str, float]:
        values = {k: float(v[self.step]) for k, v in self.schedules.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[self.step])
        if "weight_decay" in values:  # the first group is the regularised one
            self.optimizer.param_groups[0]["weight_decay"] = values["weight_decay"]
        self.method.set_step(values, self.step // self.steps_per_epoch)
        return values

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite; a skipped step is counted, logged, and fatal when repeated."""
        finite = all_reduce_min(torch.isfinite(loss.detach()).float())  # all ranks skip together
        meter = self.meter
        if float(finite) >= 1.0:
            meter.consecutive = 0
            return True
        meter.nonfinite += 1
        meter.consecutive += 1
        self.method.discard_pending()
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.print(
            f"step {self.step}: non-finite loss ({float(loss.detach())}), step skipped "
            f"({meter.consecutive} in a row)"
        )
        if self.main:
            self._log_nonfinite(meter.nonfinite)
        if meter.consecutive >= self.cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{meter.consecutive} consecutive non-finite losses at step {self.step}: training diverged "
                "(with fp16 try bf16, a lower lr or teacher temperature, or gradient clipping); "
                f"the last checkpoint is in {self.run_dir / 'checkpoints'}"
            )
        return False

    def _step_boundary(self) -> None:
        """After a completed step: stop on a signal any rank received, else checkpoint when due."""
        self.boundary = self.loader.position
        signum = self._stop_requested()
        if signum:
            self._preempt(signum)
        every = self.cfg.ckpt_every
        if every and self.step % every == 0 and self.step < self.stop_step:
            self.save_checkpoint()

    # -- tracking and logs ---------------------------------------------------------------------------
    def _tracking(self) -> None:
        manifest = self.loader.manifest
        spec = self.loader.views.input_spec
        mean, std = spec.normalisation(manifest)
        params = {
            **flatten(self.cfg),
            "effective_batch_size": self.effective_batch,
            "lr_scaled": self.lr,
            "world_size": self.acc.num_processes,
            "steps_per_epoch": self.steps_per_epoch,
            "mixed_precision": self.acc.mixed_precision,
            "total_steps": self.total_steps,
        }
        if self.loader.partners is not None:  # temporal views: samples whose two views share one season
            params["temporal_samples_without_partner"] = self.loader.partners.alone
        tags = {
            "git_commit": git_commit(),
            "dataset_manifest_sha256": manifest.get("manifest_sha256", ""),
            "dataset": self.cfg.data,
            "lr_scaling_rule": self.cfg.optim.lr_scaling,
            "data_member_checksums": "crc32c" if self.loader.checksums else "absent (reads unchecked)",
            "normalisation": json.dumps(
                {"channels": spec.channel_names, "mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
            ),
        }
        tags["eossl.input_norm"] = json.dumps(self.input_norm.to_json())[:5000]
        if self.starting is not None:
            tags["eossl.starting_weights"] = json.dumps(self.starting)[:5000]
        self.mlflow_run_id = start_tracking(
            self.acc, self.cfg, params, tags, self.mlflow_run_id, description=_run_description(self.cfg)
        )
        if self.main:
            log_dataset_input(self.cfg.data, manifest, context="training")

    def _log_nonfinite(self, count: int) -> None:
        import mlflow

        mlflow.log_metric("nonfinite_steps", count, step=self.step)

    def _log_step(self, loss: float, logs: dict[str, torch.Tensor], values: dict[str, float]) -> None:
        """The loss every step; throughput, schedules and the method's logs every ``log_every`` steps."""
        # Every rank's total in the run, resumes included (the loader's counts are in the checkpoint).
        substituted = torch.tensor(float(self.loader.substituted), device=self.acc.device)
        logged: dict[str, float] = {
            "loss": loss,
            "replaced_samples": float(self.acc.reduce(substituted, "sum")),
        }
        self.countdown.advance()
        if self.step % self.cfg.log_every == 0 or self.step == self.stop_step:
            meter = self.meter
            elapsed = time.perf_counter() - meter.t_last
            logged.update(
                {
                    "lr": float(self.lr_schedule[self.step - 1]),
                    "epoch": self.loader.position.epoch,
                    "samples_per_s": meter.samples / elapsed,
                    "data_wait_fraction": meter.wait / elapsed,
                    "memory_mb": _memory_mb(),
                    "nonfinite_steps": meter.nonfinite,
                    **{k: float(v) for k, v in logs.items()},
                    **{f"schedule_{k}": v for k, v in values.items()},
                }
            )
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{meter.samples / elapsed:.1f}")
            if self.plain:
                self._plain_line(logged)
            meter.restart()
        self.acc.log(logged, step=self.step)
        if self.main:
            with open(self.history, "a") as f:
                f.write(json.dumps({"step": self.step, **logged}) + "\n")
        self.bar.update(1)
        if self.plain and self.step % self.steps_per_epoch == 0:
            log_line(
                f"epoch {self.step // self.steps_per_epoch}/{self.cfg.epochs} done at step "
                f"{self.step}/{self.stop_step}, loss {loss:.4f}, elapsed {self.countdown.elapsed()}, "
                f"ETA {self.countdown.eta()}"
            )

    def _plain_line(self, logged: dict[str, float]) -> None:
        """The progress line of a log file: a bar's carriage returns would make it one endless line."""
        log_line(
            f"step {self.step}/{self.stop_step} epoch {logged['epoch'] + 1}/{self.cfg.epochs} "
            f"loss {logged['loss']:.4f} "
            f"lr {logged['lr']:.4g} samples/s {logged['samples_per_s']:.1f} "
            f"data-wait {logged['data_wait_fraction']:.0%} ETA {self.countdown.eta()}"
        )

    # -- stopping and finishing ----------------------------------------------------------------------
    def _stop_requested(self) -> int:
        """The signal any rank received (0: none): every rank stops at the same step."""
        return int(all_reduce_max(torch.tensor(float(self.stop.signum), device=self.acc.device)))

    def _preempt(self, signum: int) -> None:
        self.bar.close()
        self.save_checkpoint()
        raise Preempted(self.step, signum, self.run_dir)  # MLflow: KILLED, reopened by the resumed run

    def _any_rank_failed(self, failed: bool) -> bool:
        """Whether any rank's loader failed on this batch. One small all-reduce per micro-batch with more
        than one rank, so that every rank checkpoints together instead of the others waiting in the next
        step's gradient all-reduce for a rank that left."""
        if self.acc.num_processes == 1:
            return failed
        flag = torch.tensor(float(failed), device=self.acc.device)
        return bool(float(all_reduce_max(flag)) > 0)

    def _data_unavailable(self, failure: Exception | None) -> None:
        """Checkpoint at the last completed step (the model and optimiser are consistent there; the loader
        rewinds to it, since ranks that did read this batch moved past it), then stop with exit code 76, or
        with the error itself when the data is damaged (corrupt shards: retrying cannot help)."""
        self.bar.close()
        cause: BaseException = failure or RuntimeError("another rank's loader failed (see that rank's log)")
        if _worker_died(cause):
            cause = RuntimeError(
                f"a reader worker process of rank {self.acc.process_index} died (killed, or out of memory: "
                f"see the kernel log) ({cause})"
            )
        self.acc.print(f"step {self.step}: the loader failed ({cause}); checkpointing before stopping")
        self.loader.position = self.boundary
        self.save_checkpoint()
        if isinstance(failure, (CorruptDataError, CorruptShardError)):
            raise failure  # the bytes themselves are damaged: a requeued job would meet them again
        raise DataUnavailable(self.step, self.run_dir, cause) from failure

    def _finish(self) -> Path | None:
        """Every rank's digests, then (rank 0) the exported backbone and the MLflow artifacts."""
        acc, method = self.acc, self.method
        digests = {
            "rank": acc.process_index,
            "world_size": acc.num_processes,
            "step": self.step,
            "params_sha256": state_digest(method, "params"),
            "state_sha256": state_digest(method),
            **method.state_digests(),
        }
        (self.run_dir / "ranks").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "ranks" / f"rank-{acc.process_index}.json", digests)
        backbone_dir = None
        if self.main:
            backbone_dir = export_backbone(
                method.backbone(),
                self.loader,
                self.cfg,
                self.step,
                self.run_dir,
                self.input_norm,
                self.starting,
                self.mlflow_run_id,
            )
            import mlflow

            mlflow.log_artifact(str(self.run_dir / "config.yaml"))
            mlflow.log_artifacts(str(backbone_dir), artifact_path="backbone")
            # The model card becomes the run's description (shown on the run's page in the MLflow UI).
            mlflow.set_tag("mlflow.note.content", (backbone_dir / "README.md").read_text())
        acc.wait_for_everyone()
        acc.end_training()
        return backbone_dir


def _run_description(cfg: TrainConfig) -> str:
    """The MLflow run's description: what trains on what (the exported model card has the full detail)."""
    return (
        f"{cfg.method} pre-training of {cfg.backbone.name} on `{cfg.data}`: {cfg.epochs} epochs"
        + (f", stopping at step {cfg.max_steps}" if cfg.max_steps else "")
        + f", batch {cfg.batch_size} per device, seed {cfg.seed}. The exported backbone's model card "
        "(backbone/model_card.json, backbone/README.md) says which bands, in which order and normalised how."
    )


def _worker_died(exc: BaseException) -> bool:
    """Whether DALI reported a reader worker process gone (its message says only that receiving stopped)."""
    text = " ".join(str(e) for e in (exc, exc.__cause__) if e is not None).lower()
    return "worker" in text and any(w in text for w in ("interrupted", "terminated", "died", "exited"))


def train(cfg: TrainConfig, resume: bool = True) -> RunResult:
    """Run (or continue, when ``resume`` and RUN_DIR has a checkpoint) a pre-training run."""
    if not math.isfinite(cfg.optim.lr):
        raise ValueError("optim.lr must be finite")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lock = lock_run_dir(Path(cfg.out))
    try:
        return _Run(cfg, resume).fit()
    finally:
        if lock is not None:
            lock.close()
