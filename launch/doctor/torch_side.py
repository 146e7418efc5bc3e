"""The torch side of ``eossl doctor``: training steps, autocast numerics, throughput, compile, NCCL.

Methods are built by their own classes (``eossl.train.methods``) and fed synthetic tensors made on the
device, so nothing here needs DALI, a dataset, zarr, rasterio or MLflow: it runs on a bare GPU image with
torch alone. CUDA-only checks report 'not applicable' without a GPU.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Mapping

import torch

from eossl.streaming.views import ViewSet
from eossl.train.config import load_config
from eossl.train.methods import get_method

from .report import FAIL, NOT_APPLICABLE, PASS, Check

__all__ = ["autocast_check", "compile_check", "nccl_check", "throughput_check", "train_check"]

# Small enough for a few CPU steps in seconds; data/out are required by the config but never read here.
TINY = {
    "moco": {"backbone": "resnet18", "size": "64", "batch_size": "4", "queue_size": "64", "hidden": "128"},
    "dino": {
        "backbone": "vit_tiny_patch16_224",
        "batch_size": "4",
        "size": "64",
        "local_size": "32",
        "n_local": "2",
        "out_dim": "256",
    },
}
# The default recipes the throughput check measures: ResNet-50 MoCo and ViT-S/16 DINO (2 x 224 + 6 x 96).
RECIPES = {"moco": {"backbone": "resnet50", "size": "224"}, "dino": {}}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PLACEHOLDER = {"data": "unused", "out": "unused"}


class _Synthetic:
    """A method module and one batch of random views of its exact shapes, on ``device``."""

    def __init__(self, method: str, overrides: Mapping[str, str], batch: int, device: torch.device):
        self.cfg = cfg = load_config(method, None, {**overrides, "batch_size": str(batch), **_PLACEHOLDER})
        cls = get_method(method)
        views = cls.views(cfg)
        vset = ViewSet(views)
        channels = [vset.channels(v) for v in range(len(vset.views))]
        torch.manual_seed(0)
        self.module = cls.build(cfg, channels, views.mode).to(device)
        self.schedules = cls.schedules(cfg, 1000, 100)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.views = [
            torch.randn(batch, c, v.size, v.size, generator=gen).to(device)
            for c, v in zip(channels, vset.views, strict=True)
        ]

    def step_values(self, step: int) -> dict[str, float]:
        return {k: float(v[step]) for k, v in self.schedules.items()}


def _autocast(device: torch.device, precision: str):
    enabled = precision in _DTYPES
    return torch.autocast(device.type, dtype=_DTYPES.get(precision, torch.float32), enabled=enabled)


def _steps(s: _Synthetic, device: torch.device, precision: str, steps: int) -> list[float]:
    """``steps`` optimiser steps in the loop's order; the losses (fp16 through a gradient scaler)."""
    opt = torch.optim.SGD(s.module.param_groups(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    losses = []
    for step in range(steps):
        values = s.step_values(step)
        s.module.set_step(values, 0)
        with _autocast(device, precision):
            loss, _ = s.module(s.views)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        s.module.after_step(values)
        losses.append(float(loss.detach()))
    return losses


def train_check(method: str, overrides: Mapping[str, str], device: torch.device, precision: str, steps: int):
    """``steps`` training steps of ``method`` on ``device`` in ``precision`` ('no', 'bf16', 'fp16')."""
    name = f"train_{device.type}_{precision}"
    if precision == "fp16" and device.type != "cuda":
        return Check(name, NOT_APPLICABLE, "fp16 needs a CUDA device (use bf16 on CPU)")
    s = _Synthetic(method, {**TINY[method], **overrides}, int(overrides.get("batch_size", 4)), device)
    losses = _steps(s, device, precision, steps)
    return Check(
        name,
        PASS,
        f"{method} {s.cfg.backbone.name}: losses {[round(x, 4) for x in losses]}",
        {"method": method, "backbone": s.cfg.backbone.name, "losses": losses},
    )


def autocast_check(device: torch.device, precision: str, rtol: float = 0.05) -> Check:
    """Each method's loss under CUDA autocast against the same module and batch in float32."""
    name = f"autocast_losses_{precision}"
    if device.type != "cuda":
        return Check(name, NOT_APPLICABLE, "CUDA autocast needs a CUDA device")
    values, bad = {}, []
    for method in TINY:
        s = _Synthetic(method, TINY[method], 8, device)
        s.module.set_step(s.step_values(0), 0)
        twin = copy.deepcopy(s.module)  # identical state: the forward's side effects stay apart
        with torch.no_grad():
            ref = float(s.module(s.views)[0].double())
            with _autocast(device, precision):
                low = float(twin(s.views)[0].double())
        values[method] = {"float32": ref, precision: low, "relative_error": abs(low - ref) / abs(ref)}
        if not values[method]["relative_error"] <= rtol:
            bad.append(method)
    status = FAIL if bad else PASS
    detail = ", ".join(f"{m} rel. error {v['relative_error']:.2e}" for m, v in values.items())
    return Check(name, status, detail + (f" > {rtol} for {bad}" if bad else ""), values)


def throughput_check(device: torch.device, steps: int, batch: int = 64) -> Check:
    """Compute-only samples/s of the default recipes in bf16 (synthetic batches already on the GPU)."""
    if device.type != "cuda":
        return Check("throughput", NOT_APPLICABLE, "measured on a CUDA device only")
    values = {}
    for method, recipe in RECIPES.items():
        s = _Synthetic(method, recipe, batch, device)
        s.module = s.module.to(memory_format=torch.channels_last)
        _steps(s, device, "bf16", 3)  # warm-up: cuDNN autotuning, allocator
        torch.cuda.synchronize()
        start = time.perf_counter()
        _steps(s, device, "bf16", steps)
        torch.cuda.synchronize()
        rate = batch * steps / (time.perf_counter() - start)
        values[method] = {"backbone": s.cfg.backbone.name, "batch": batch, "samples_per_s": round(rate, 1)}
    detail = ", ".join(f"{m} {v['backbone']} {v['samples_per_s']} samples/s" for m, v in values.items())
    return Check("throughput", PASS, detail + " (bf16, compute only)", values)


def compile_check(device: torch.device, steps: int) -> Check:
    """torch.compile of the MoCo backbone (what ``compile=true`` compiles) through ``steps`` steps."""
    if device.type != "cuda":
        return Check("compile", NOT_APPLICABLE, "checked on a CUDA device only (slow on CPU)")
    s = _Synthetic("moco", TINY["moco"], 8, device)
    s.module.compile_target().compile()
    losses = _steps(s, device, "bf16", steps)
    return Check("compile", PASS, f"{steps} compiled steps, losses {[round(x, 4) for x in losses]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nccl_check(device: torch.device) -> Check:
    """A one-process NCCL group: all-reduce and broadcast on the GPU (the library loads and runs)."""
    import torch.distributed as dist

    if device.type != "cuda":
        return Check("nccl", NOT_APPLICABLE, "NCCL needs a CUDA device")
    if dist.is_initialized():
        return Check("nccl", NOT_APPLICABLE, "a process group already exists in this process")
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    from datetime import timedelta

    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
        device_id=device,
    )
    try:
        x = torch.arange(4, device=device, dtype=torch.float32)
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        torch.cuda.synchronize()
        ok = x.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()
    return Check(
        "nccl", PASS if ok else FAIL, "all-reduce and broadcast in a group of 1" if ok else f"got {x}"
    )
