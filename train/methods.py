"""The registry of self-supervised methods the training loop knows.

A method contributes two functions: the loader's views for a config, and the method module built for the
views' channel counts. The module implements ``forward(views) -> (loss, logs)``, ``after_step(momentum)``,
``discard_pending()`` and ``backbone() -> Encoder``; the loop never asks which method it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from eossl.streaming.views import ViewConfig

from .config import TrainConfig
from .moco import build_moco, moco_views

__all__ = ["METHODS", "MethodSpec", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    views: Callable[[TrainConfig], ViewConfig]
    build: Callable[[TrainConfig, list[int], str], nn.Module]
    momentum: Callable[[TrainConfig, int], np.ndarray]  # EMA momentum per optimiser step


METHODS: dict[str, MethodSpec] = {
    "moco": MethodSpec(views=moco_views, build=build_moco,
                       momentum=lambda cfg, total: np.full(total, cfg.moco.momentum)),  # MoCo: constant
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
