"""A run's parts built from its config: the accelerator, the loader's config, the optimiser, the lr schedule.

Pure functions of the config (and the world the launcher set up), kept out of the loop so that the loop
reads as the order of a step.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from eossl.streaming.loader import LoaderConfig
from eossl.streaming.plan import PlanConfig
from eossl.streaming.storage import StorageOptions
from eossl.streaming.views import ViewConfig

from .config import TrainConfig
from .schedules import cosine_schedule

__all__ = ["build_accelerator", "build_optimizer", "compile_backend", "loader_config", "lr_schedule"]


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's accelerator: precision from the config or the launcher, gloo ranks without a GPU."""
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo ranks (see launch/accelerate/cpu_2proc.yaml)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    # Sensor pairs with moco.pairing=fixed train only the query sensor's adapter (S2 query, S1 key): DDP must
    # accept parameters without gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.loader.mode == "pair")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "precision=fp16 needs a CUDA GPU (its loss scaler runs there); use precision=bf16 on CPU"
        )
    # 'auto': what the launcher says (accelerate launch exports its config's mixed_precision).
    precision = None if cfg.precision == "auto" else cfg.precision
    acc = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="mlflow",
        kwargs_handlers=[ddp],
    )
    if acc.mixed_precision == "fp16" and acc.device.type != "cuda":
        raise ValueError(
            "mixed precision fp16 (from the accelerate config) needs a CUDA GPU; use bf16 on CPU"
        )
    return acc


def loader_config(cfg: TrainConfig, views: ViewConfig) -> LoaderConfig:
    """The streaming loader's settings for the run's ``loader`` section and the method's views."""
    lc = cfg.loader
    return LoaderConfig(
        batch_size=cfg.batch_size,
        split=lc.split,
        views=views,
        device=lc.device,
        cpu_augment=lc.cpu_augment,
        num_threads=lc.threads,
        workers=lc.workers,
        readers=lc.readers,
        on_corrupt=lc.on_corrupt,
        max_corrupt_fraction=lc.max_corrupt_fraction,
        plan=PlanConfig(seed=cfg.seed, shuffle_buffer=lc.shuffle_buffer, node_affinity=lc.node_affinity),
        storage=StorageOptions(
            cache_dir=lc.cache_dir,
            cache_bytes=int(lc.cache_gb * 2**30),
            read_while_downloading=lc.read_while_downloading,
            map_files=lc.map_files,
            retries=lc.retries,
            timeout_s=lc.timeout_s,
        ),
    )


def compile_backend(name: str) -> str:
    """``name`` when torch.compile knows that backend; else a ValueError that lists the ones it knows."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ValueError(f"compile_backend must be one of {', '.join(sorted(known))}, got {name!r}")
    return name


def build_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """``optim.name`` over ``params`` (parameter groups); the lr is set again every step by the schedule."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name must be sgd or adamw, got {o.name!r}")


def lr_schedule(cfg: TrainConfig, lr: float, total_steps: int, steps_per_epoch: int) -> np.ndarray:
    """Per-step learning rate: warm-up (``optim.warmup_steps`` + ``optim.warmup_epochs``), then cosine to
    ``optim.min_lr``, or constant."""
    o = cfg.optim
    if o.schedule != "cosine":
        return np.full(total_steps, lr)
    warmup = o.warmup_steps + round(o.warmup_epochs * steps_per_epoch)
    return cosine_schedule(lr, o.min_lr, total_steps, warmup)
