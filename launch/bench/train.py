"""``eossl bench train``: is training fed fast enough? The same loop, fed twice in one run.

1. by the real streaming pipeline (DALI, from the dataset), and
2. by synthetic tensors already on the device, of the views' exact shapes (the compute-only ceiling).

``data_fed_over_compute_only`` = (1) / (2) samples/s: 1.0 means the GPU (or CPU) never waits for data.
The data-wait fraction is the share of wall time spent waiting for the next batch in (1).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from eossl.streaming.loader import Batch
from eossl.train.config import load_config
from eossl.train.loop import _Run

from .configs import TrainBenchConfig
from .harness import write_sample_dataset

__all__ = ["SyntheticLoader", "bench_train", "bench_train_command", "default_overrides"]


class SyntheticLoader:
    """Stands in for SSLLoader: the same batches' shapes, made once on the device, no I/O."""

    def __init__(self, real, device: torch.device, steps: int):
        self.real = real
        self.manifest, self.views, self.rows = real.manifest, real.views, real.rows
        self.channels = real.channels
        self.position = real.position
        batch = next(iter(real))
        self._views = [v.to(device).contiguous(memory_format=torch.channels_last) for v in batch.views]
        self._batch = batch
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            yield Batch(
                views=self._views,
                rows=self._batch.rows,
                positions=self._batch.positions,
                substituted=0,
                epoch=0,
                step=step,
            )

    def state_dict(self) -> dict:
        return {}


def _steady_rate(history: Path, warmup_steps: int) -> tuple[float, float]:
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    rows = [r for r in rows if "samples_per_s" in r and r["step"] > warmup_steps]
    if not rows:
        raise RuntimeError("no steady-state measurements: increase --steps")
    return float(np.median([r["samples_per_s"] for r in rows])), float(
        np.median([r["data_wait_fraction"] for r in rows])
    )


def bench_train(
    dataset: str,
    method: str = TrainBenchConfig.method,
    steps: int = TrainBenchConfig.steps,
    overrides: dict | None = None,
) -> dict:
    """Run ``steps`` optimiser steps twice (real data, synthetic data) and compare samples/s."""
    overrides = dict(overrides or {})
    tmp = Path(tempfile.mkdtemp(prefix="eossl-bench-train-"))
    warmup = max(steps // 5, 2)
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "method": method,
        "steps": steps,
        "warmup_steps": warmup,
    }
    try:
        for name in ("data_fed", "compute_only"):
            base = {
                "log_every": "1",
                "ckpt_every": "0",
                "max_steps": str(steps),
                "epochs": "1000",
                **overrides,
                "data": dataset,
                "out": str(tmp / name),
                "experiment": "eossl-bench",
            }
            cfg = load_config(method, None, base)
            run = _Run(cfg, resume=False)
            if name == "compute_only":
                run.loader = SyntheticLoader(run.loader, run.acc.device, steps)
            run.fit()
            rate, wait = _steady_rate(tmp / name / "history.jsonl", warmup)
            results[name] = {"samples_per_s": round(rate, 2), "data_wait_fraction": round(wait, 4)}
            if name == "data_fed":
                results["config"] = {
                    "backbone": cfg.backbone.name,
                    "batch_size": cfg.batch_size,
                    "precision": cfg.precision,
                    "mode": cfg.loader.mode,
                    "size": cfg.loader.size,
                    "loader_device": run.loader.device,
                    "world_size": run.acc.num_processes,
                }
        results["data_fed_over_compute_only"] = round(
            results["data_fed"]["samples_per_s"] / results["compute_only"]["samples_per_s"], 3
        )
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_overrides(method: str, gpu: bool) -> dict[str, str]:
    """The model and loader the bench trains unless ``--set`` says otherwise: sized for the device.

    DINO: ViT-S/16 multi-crop (2 x 224 + 6 x 96) on a GPU, a tiny ViT on CPU. MoCo: ResNet-50 in bf16
    with DALI on the GPU, a ResNet-18 at 96 px on CPU.
    """
    if method == "dino":
        return (
            {
                "backbone": "vit_small_patch16_224",
                "batch_size": "64",
                "precision": "bf16",
                "device": "gpu",
                "workers": "4",
                "threads": "4",
                "split": "all",
            }
            if gpu
            else {
                "backbone": "vit_tiny_patch16_224",
                "batch_size": "16",
                "size": "64",
                "local_size": "32",
                "n_local": "4",
                "out_dim": "4096",
                "workers": "1",
                "threads": "2",
                "split": "all",
            }
        )
    if gpu:
        return {
            "backbone": "resnet50",
            "batch_size": "64",
            "precision": "bf16",
            "size": "224",
            "queue_size": "4096",
            "device": "gpu",
            "workers": "4",
            "threads": "4",
            "split": "all",
        }
    return {
        "backbone": "resnet18",
        "batch_size": "16",
        "size": "96",
        "queue_size": "1024",
        "hidden": "512",
        "workers": "1",
        "threads": "2",
        "split": "all",
    }


def bench_train_command(cfg: TrainBenchConfig, overrides: dict[str, str]) -> dict:
    """``eossl bench train``: the device's defaults under ``overrides``; a synthetic dataset without data.

    The synthetic dataset lives in a temporary folder removed afterwards, also on error.
    """
    overrides = {**default_overrides(cfg.method, torch.cuda.is_available()), **overrides}
    if cfg.data is not None:
        return bench_train(cfg.data, cfg.method, cfg.steps, overrides)
    with tempfile.TemporaryDirectory(prefix="eossl-bench-data-") as tmp:
        _, dataset = write_sample_dataset(tmp, cfg.patches)
        return bench_train(dataset, cfg.method, cfg.steps, overrides)
