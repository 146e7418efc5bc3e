"""Collectives that are safe in one process: without a process group they are identities.

Losses, queues and centers call these, so every method runs and is tested on one CPU process and gets
the multi-rank behaviour unchanged under ``accelerate launch``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_cat",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_min",
    "broadcast_",
    "is_dist",
    "rank",
    "world_size",
]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0; no gradient."""
    if not is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` without a process group."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(x, src)
    return x


@torch.no_grad()
def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x, op=op)
    return x


def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.MIN)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.MAX)
