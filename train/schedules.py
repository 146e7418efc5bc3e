"""Schedules precomputed once per run and indexed by global optimiser step (never hidden in objects)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_schedule", "scaled_lr"]


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then half-cosine from ``base`` to ``final``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    rest = total_steps - warmup_steps
    t = np.arange(rest) / max(rest, 1)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))
    return np.concatenate([warm, cos]).astype(np.float64)


def scaled_lr(lr: float, rule: str, global_batch: int, base_batch: int) -> float:
    """The learning rate for ``global_batch`` by a declared rule (none, linear or sqrt)."""
    if rule == "none":
        return lr
    ratio = global_batch / base_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown lr scaling rule {rule!r}")
