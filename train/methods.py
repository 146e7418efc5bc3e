"""The registry of self-supervised methods the training loop knows.

A method contributes two functions: the loader's views for a config, and the method module built for the
views' channel counts. The module implements ``forward(views) -> (loss, logs)``, ``after_step(momentum)``,
``discard_pending()`` and ``backbone() -> Encoder``, and optionally ``param_groups()``, ``set_step(values,
epoch, freeze_last_layer_epochs)`` and ``before_optimizer_step()``; the loop never asks which method it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from eossl.streaming.views import ViewConfig

from .config import TrainConfig
from .dino import build_dino, dino_schedules, dino_views
from .moco import build_moco, moco_views

__all__ = ["METHODS", "MethodSpec", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    views: Callable[[TrainConfig], ViewConfig]
    build: Callable[[TrainConfig, list[int], str], nn.Module]
    # Per-step schedules (at least "momentum") for (config, total steps, steps per epoch).
    schedules: Callable[[TrainConfig, int, int], dict[str, np.ndarray]]


METHODS: dict[str, MethodSpec] = {
    "moco": MethodSpec(views=moco_views, build=build_moco,  # MoCo: constant momentum
                       schedules=lambda cfg, total, per_epoch: {"momentum": np.full(total, cfg.moco.momentum)}),
    "dino": MethodSpec(views=dino_views, build=build_dino, schedules=dino_schedules),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
