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

__all__ = ["PAIRINGS", "MoCo", "ProjectionHead", "build_moco", "info_nce", "key_std", "moco_views"]

PAIRINGS = ("fixed", "mixed", "symmetric")


def _unit(z: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in float32, autocast off (a norm in bf16 is off by ~1e-3)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        return F.normalize(z.float(), dim=1)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE loss of unit queries ``q`` (N x C) against their keys ``k`` (N x C) and the
    queue's negatives (C x K), and the logits (N x (1+K), the positive first).

    Computed in float32 with autocast off: inside autocast the products would run in bf16/fp16 again
    whatever the inputs' dtype (the loss off by ~1e-4, its gradient by ~1e-2 relative, at K = 65,536).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
        l_neg = q @ queue  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels), logits


@torch.no_grad()
def key_std(keys: torch.Tensor) -> torch.Tensor:
    """Standard deviation over the batch of the unit keys, averaged over dimensions: ~1/sqrt(C) for keys
    spread over the sphere, 0 when every sample maps to the same key (a collapsed embedding)."""
    if keys.shape[0] < 2:
        return keys.new_zeros(())
    return keys.float().std(dim=0).mean()


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
        pairing: 'fixed' (view ``query_view`` is the query, the other the key), 'mixed' (the first half
            of the batch as in 'fixed', the second half the other way round, so both sensors' adapters
            are trained: the MoCo study's released code) or 'symmetric' (both directions on the whole
            batch, losses averaged).
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
        pairing: str = "fixed",
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
        if pairing not in PAIRINGS:
            raise ValueError(f"moco.pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        self.pairing = pairing
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
            return _unit(self.head_k(self.encoder_k(x, sensor)))
        if world_size() > 1:
            # Across ranks (MoCo's _batch_shuffle_ddp): every rank encodes a random slice of the global batch.
            n = x.shape[0]
            x_all = all_gather_cat(x)
            perm = broadcast_(torch.randperm(x_all.shape[0], device=x.device))
            mine = perm.view(world_size(), -1)[rank()]
            k_mine = _unit(self.head_k(self.encoder_k(x_all[mine], sensor)))
            k_all = all_gather_cat(k_mine)
            inverse = torch.argsort(perm)
            return k_all[inverse].view(world_size(), n, -1)[rank()]
        # One process: BN statistics over shuffled chunks differ from the query batch's.
        perm = torch.randperm(x.shape[0], device=x.device)
        chunks = [self.encoder_k(c, sensor) for c in x[perm].chunk(max(1, self.bn_splits))]
        k = _unit(self.head_k(torch.cat(chunks)))
        return k[torch.argsort(perm)]

    # -- loss ----------------------------------------------------------------------------------------
    def _contrast(self, xq: torch.Tensor, sq: str | None, xk: torch.Tensor, sk: str | None):
        """The InfoNCE loss and top-1 accuracy of queries ``xq`` (sensor ``sq``) against keys ``xk``."""
        q = _unit(self.head_q(self.encoder_q(xq, sq)))  # N x C, float32
        k = self._keys(xk, sk)  # N x C, float32
        self._pending.append(k.detach())
        loss, logits = info_nce(q, k, self.queue.clone().detach(), self.temperature)
        acc = (logits.detach().argmax(dim=1) == 0).float().mean()
        return loss, acc, k.detach()

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        qv, kv = self.query_view, 1 - self.query_view
        sensors = self.view_sensors
        if self.pairing == "mixed":
            # First half: the fixed direction; second half: the other way round. The halves are weighted
            # by their sizes, so the loss is the mean over the batch's queries.
            n = views[0].shape[0]
            h = (n + 1) // 2
            parts = [
                self._contrast(views[qv][:h], sensors[qv], views[kv][:h], sensors[kv]),
                self._contrast(views[kv][h:], sensors[kv], views[qv][h:], sensors[qv]) if h < n else None,
            ]
            done = [(p, w) for p, w in zip(parts, (h, n - h), strict=True) if p is not None]
            loss = sum(p[0] * w for p, w in done) / n
            acc = sum(p[1] * w for p, w in done) / n
            keys = torch.cat([p[2] for p, _ in done])
        else:
            loss, acc, keys = self._contrast(views[qv], sensors[qv], views[kv], sensors[kv])
            if self.pairing == "symmetric":
                loss2, acc2, keys2 = self._contrast(views[kv], sensors[kv], views[qv], sensors[qv])
                loss, acc, keys = (loss + loss2) / 2, (acc + acc2) / 2, torch.cat([keys, keys2])
        return loss, {"acc": acc.detach(), "key_std": key_std(keys)}

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
    inputs = InputSpec.parse(
        lc.sensors if lc.mode in ("single", "multicrop", "temporal") else "s1s2", lc.s2_bands
    )
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
        m.pairing,
        m.shuffle_bn,
        m.bn_splits,
    )
