"""MoCo-v2 as a method object: query/key encoders, projection heads, the queue, the loss, the EMA.

The method owns its state as buffers (``queue``, ``queue_ptr``) so a checkpoint of the module is a
checkpoint of the method. The training loop calls ``forward(views)`` for the loss and, after every
optimiser step, ``after_step(values)`` for the key-encoder EMA (momentum ``values["momentum"]``, a constant
schedule of ``moco.momentum``) and the enqueue of the step's keys (the order the loop keeps for every
method: step, then EMA/queue).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eossl.streaming.inputs import InputSpec
from eossl.streaming.views import ViewConfig

from .backbones import Encoder, build_encoder
from .config import TrainConfig
from .distributed import all_gather_cat, broadcast_, rank, world_size
from .method import SSLMethod

__all__ = ["MoCo", "ProjectionHead", "build_moco", "moco_views"]


class ProjectionHead(nn.Module):
    """MoCo-v2 MLP head: Linear -> ReLU -> Linear (2048-2048-128 on ResNet-50)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MoCo(SSLMethod):
    """MoCo-v2 on two views.

    Args:
        encoder: the query encoder (the key encoder is a copy updated by EMA).
        dim, hidden: projection sizes.
        queue_size: number of negatives K.
        temperature: InfoNCE temperature T.
        view_sensors: adapter key of each view (e.g. ['s1', 's2'] for sensor pairs, [None, None] otherwise).
        query_view: index of the view used as query (1: the S2 view of a sensor pair, as in the study).
        symmetric: also contrast the other direction and average.
        shuffle_bn: shuffle keys across ranks / split them in one process before the key encoder.
        bn_splits: chunks of the key batch in one process.
    """

    def __init__(
        self,
        encoder: Encoder,
        dim: int,
        hidden: int,
        queue_size: int,
        temperature: float,
        view_sensors: list[str | None],
        query_view: int = 0,
        symmetric: bool = False,
        shuffle_bn: bool = True,
        bn_splits: int = 2,
    ):
        super().__init__()
        self.encoder_q = encoder
        self.head_q = ProjectionHead(encoder.feature_dim, hidden, dim)
        self.encoder_k = copy.deepcopy(encoder)
        self.head_k = copy.deepcopy(self.head_q)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.view_sensors = view_sensors
        self.query_view = query_view
        self.symmetric = symmetric
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits
        # queue: C x K unit vectors; queue_ptr: next column to overwrite.
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._pending: list[torch.Tensor] = []

    def key_parameters(self):
        yield from self.encoder_k.parameters()
        yield from self.head_k.parameters()

    def query_pairs(self):
        return zip(
            [*self.encoder_q.parameters(), *self.head_q.parameters()],
            [*self.encoder_k.parameters(), *self.head_k.parameters()],
            strict=True,
        )

    # -- keys with shuffled BatchNorm ----------------------------------------------------------------
    @torch.no_grad()
    def _keys(self, x: torch.Tensor, sensor: str | None) -> torch.Tensor:
        if not self.shuffle_bn:
            return F.normalize(self.head_k(self.encoder_k(x, sensor)), dim=1)
        if world_size() > 1:
            # Across ranks (MoCo's _batch_shuffle_ddp): every rank encodes a random slice of the global batch.
            n = x.shape[0]
            x_all = all_gather_cat(x)
            perm = broadcast_(torch.randperm(x_all.shape[0], device=x.device))
            mine = perm.view(world_size(), -1)[rank()]
            k_mine = F.normalize(self.head_k(self.encoder_k(x_all[mine], sensor)), dim=1)
            k_all = all_gather_cat(k_mine)
            inverse = torch.argsort(perm)
            return k_all[inverse].view(world_size(), n, -1)[rank()]
        # One process: BN statistics over shuffled chunks differ from the query batch's.
        perm = torch.randperm(x.shape[0], device=x.device)
        chunks = [self.encoder_k(c, sensor) for c in x[perm].chunk(max(1, self.bn_splits))]
        k = F.normalize(self.head_k(torch.cat(chunks)), dim=1)
        return k[torch.argsort(perm)]

    # -- loss ----------------------------------------------------------------------------------------
    def _contrast(self, xq: torch.Tensor, sq: str | None, xk: torch.Tensor, sk: str | None):
        q = F.normalize(self.head_q(self.encoder_q(xq, sq)), dim=1).float()  # N x C
        k = self._keys(xk, sk).float()  # N x C
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N x 1
        l_neg = q @ self.queue.clone().detach().float()  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature  # N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._pending.append(k.detach())
        acc = (logits.argmax(dim=1) == 0).float().mean()
        return F.cross_entropy(logits, labels), acc

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        qv, kv = self.query_view, 1 - self.query_view
        loss, acc = self._contrast(views[qv], self.view_sensors[qv], views[kv], self.view_sensors[kv])
        if self.symmetric:
            loss2, acc2 = self._contrast(views[kv], self.view_sensors[kv], views[qv], self.view_sensors[qv])
            loss, acc = (loss + loss2) / 2, (acc + acc2) / 2
        return loss, {"acc": acc.detach()}

    # -- building, for the loop ----------------------------------------------------------------------
    @classmethod
    def views(cls, cfg: TrainConfig) -> ViewConfig:
        return moco_views(cfg)

    @classmethod
    def build(cls, cfg: TrainConfig, channels: list[int], mode: str) -> MoCo:
        return build_moco(cfg, channels, mode)

    @classmethod
    def schedules(cls, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """MoCo's key-encoder momentum is constant."""
        return {"momentum": np.full(total_steps, cfg.moco.momentum)}

    def compile_target(self) -> nn.Module:
        return self.encoder_q

    # -- per-step state ------------------------------------------------------------------------------
    def after_step(self, values: Mapping[str, float]) -> None:
        """After each optimiser step: key encoder EMA (``values["momentum"]``), then the enqueue."""
        self._momentum_update_key_encoder(values["momentum"])
        self._dequeue_and_enqueue()

    @torch.no_grad()
    def _momentum_update_key_encoder(self, momentum: float) -> None:
        """As in MoCo, only parameters follow the EMA; the key encoder's BN statistics come from its own
        (shuffled) forward passes."""
        for pq, pk in self.query_pairs():
            pk.mul_(momentum).add_(pq.detach(), alpha=1 - momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self) -> None:
        """Write the keys of the step (gathered from every rank) round the queue."""
        if not self._pending:
            return
        keys = all_gather_cat(torch.cat(self._pending))  # (N x world x micro-batches) x C
        self._pending.clear()
        k_total = self.queue.shape[1]
        idx = (int(self.queue_ptr) + torch.arange(keys.shape[0], device=keys.device)) % k_total
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (int(self.queue_ptr) + keys.shape[0]) % k_total

    def discard_pending(self) -> None:
        """Drop keys of a skipped (non-finite) step."""
        self._pending.clear()

    def backbone(self) -> Encoder:
        return self.encoder_q

    def state_digests(self) -> dict[str, str]:
        """The queue and its pointer: equal on every rank (each enqueues the keys gathered from all)."""
        data = self.queue.cpu().numpy().tobytes() + self.queue_ptr.cpu().numpy().tobytes()
        return {"queue_sha256": hashlib.sha256(data).hexdigest()}


def moco_views(cfg: TrainConfig) -> ViewConfig:
    """The loader's views for the configured MoCo mode."""
    lc = cfg.loader
    inputs = InputSpec.parse(lc.sensors if lc.mode in ("single", "multicrop") else "s1s2", lc.s2_bands)
    return ViewConfig(
        mode=lc.mode,
        inputs=inputs,
        size=lc.size,
        augment=lc.augment_config(),
        pair_augment=lc.augment,
        pair_geometry=lc.resolved_pair_geometry(),
    )


def build_moco(cfg: TrainConfig, channels: list[int], mode: str) -> MoCo:
    """MoCo for the loader's views (``channels`` per view)."""
    if mode == "multicrop":
        raise ValueError("MoCo takes two views; multicrop is for DINO")
    if mode == "pair":
        view_sensors: list[str | None] = ["s1", "s2"]
        encoder = build_encoder(cfg.backbone, {"s1": channels[0], "s2": channels[1]})
        query_view = 1  # sensor-based positive pairs: S2 query, S1 key (the study's setting)
    else:
        encoder = build_encoder(cfg.backbone, {"input": channels[0]})
        view_sensors = ["input", "input"] if cfg.backbone.adapter == "conv1x1" else [None, None]
        query_view = 0
    m = cfg.moco
    return MoCo(
        encoder,
        m.dim,
        m.hidden,
        m.queue_size,
        m.temperature,
        view_sensors,
        query_view,
        m.symmetric,
        m.shuffle_bn,
        m.bn_splits,
    )
