"""The contract between the training loop and a self-supervised method: :class:`SSLMethod`.

The loop knows no method by name. It asks the method's class for the loader's views, the module, the
per-step schedules and the method's config defaults, and calls every per-step hook below on every step,
in the documented order (schedules -> forward/loss -> finite check -> backward -> clip ->
before-optimizer-step -> step -> after-step). Every hook has a no-op (or the common) default, so a
method overrides only what it does differently: MoCo its queue and key-encoder EMA, DINO its teacher
EMA, center, temperature schedule and frozen last layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from eossl.streaming.views import ViewConfig

    from .backbones import Encoder
    from .config import TrainConfig

__all__ = ["ClipFn", "SSLMethod"]

# The loop's gradient clipper: (parameters, max_norm) -> their total norm, scaling their gradients by
# min(1, max_norm / (norm + 1e-6)) (``torch.nn.utils.clip_grad_norm_``). The loop unscales fp16 gradients
# once before ``clip_gradients``, so a method may call it any number of times (once per tensor).
ClipFn = Callable[[Iterable[torch.Tensor], float], Any]


class SSLMethod(nn.Module):
    """Base class of every method the loop trains; register a subclass in ``train/methods.py``.

    Class attributes:
        config_defaults: dotted config keys -> values applied over the dataclass defaults (which are
            MoCo's) before the YAML file and ``--set``: the method's recipe (DINO: a ViT, AdamW, ...).
        resume_may_change: dotted config keys, besides the loop's own, that a resumed run may change
            (they are left out of the config digest a checkpoint is checked against).
    """

    config_defaults: ClassVar[Mapping[str, Any]] = {}
    resume_may_change: ClassVar[tuple[str, ...]] = ()

    # -- built once per run (class methods: the loop calls them before a module exists) ------------
    @classmethod
    def views(cls, cfg: TrainConfig) -> ViewConfig:
        """The loader's views for this config."""
        raise NotImplementedError(f"{cls.__name__} must define views(cfg)")

    @classmethod
    def build(cls, cfg: TrainConfig, channels: list[int], mode: str) -> SSLMethod:
        """The method module for views of ``channels`` (one count per view) in view ``mode``; reads the
        method's own config section."""
        raise NotImplementedError(f"{cls.__name__} must define build(cfg, channels, mode)")

    @classmethod
    def schedules(cls, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step values (one array of ``total_steps``) the loop indexes by global step and hands to
        ``set_step`` and ``after_step``; a ``weight_decay`` schedule also sets the first parameter group's
        weight decay. Default: none."""
        return {}

    # -- what the loop trains and compiles ---------------------------------------------------------
    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on a batch of views, and detached values to log."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(views)")

    def backbone(self) -> Encoder:
        """The encoder exported at the end of the run."""
        raise NotImplementedError(f"{type(self).__name__} must define backbone()")

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups. Default: one group of the trainable parameters."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def compile_target(self) -> nn.Module:
        """The module ``compile=true`` compiles in place (state-dict keys unchanged). Default: the
        exported backbone; methods whose exported backbone is not the trained one say which is."""
        return self.backbone()

    # -- per-step hooks, in the order the loop calls them -------------------------------------------
    def set_step(self, values: Mapping[str, float], epoch: int) -> None:
        """Before the forward pass: this step's schedule values and the epoch it belongs to."""

    def discard_pending(self) -> None:
        """The step's loss was not finite and the step is skipped: drop what the forward pass queued
        for ``after_step`` (keys, teacher outputs)."""

    def clip_gradients(self, clip: ClipFn, max_norm: float) -> None:
        """After backward (gradients unscaled and, with several ranks, averaged), once per optimiser
        step. Default: one global norm over every parameter, ``max_norm`` (``optim.clip_grad``) 0
        disabling it; DINO clips each tensor separately."""
        if max_norm > 0:
            clip(self.parameters(), max_norm)

    def before_optimizer_step(self) -> None:
        """After clipping, just before the optimiser step: a last say on gradients."""

    def after_step(self, values: Mapping[str, float]) -> None:
        """After each optimiser step: EMA encoders, queues, centers (``values``: this step's schedules)."""

    # -- what the run records ------------------------------------------------------------------------
    def state_digests(self) -> dict[str, str]:
        """Digests of method state written to ``ranks/rank-R.json`` besides those of all parameters
        and all state (MoCo: its queue, equal on every rank). Default: none."""
        return {}
