"""Epoch plans: which sample every rank reads at every step, as a pure function of (seed, epoch).

The global order of an epoch does not depend on the number of ranks or reader workers:

  1. shard order: the shards holding the selected samples, permuted by ``rng(seed, epoch)``;
  2. stream: their samples shard after shard (dataset order inside a shard);
  3. bounded shuffle buffer: a buffer of ``shuffle_buffer`` samples, each emitted sample replaced by the
     next of the stream (as ``webdataset.shuffle`` does, but seeded), which mixes samples across
     ~buffer/shard_size neighbouring shards while keeping reads local;
  4. padding: the sequence is extended by its own first samples to a multiple of the global batch,
     so every rank gets exactly ``steps_per_epoch`` full batches (unequal counts hang DDP);
  5. step ``k`` is the slice ``[k*G, (k+1)*G)`` of that sequence; rank ``r`` of ``W`` takes the ``r``-th
     ``G/W`` of it.

Only the global batch size ``G`` enters the order, so a run resumed on another number of ranks with the
same ``G`` continues with exactly the samples it had not yet seen (elastic resume).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

__all__ = ["EpochPlan", "PlanConfig", "LoaderPosition", "shuffled_stream"]


@dataclass(frozen=True)
class PlanConfig:
    """Sampling of an epoch.

    Attributes:
        seed: base seed; every epoch draws from ``rng([seed, epoch])``.
        shuffle_shards: permute shard order each epoch (off only for debugging).
        shuffle_buffer: samples in the shuffle buffer. Larger mixes better; the working set of open shards
            grows with it (buffer / samples-per-shard + 1). 0 or 1 disables sample shuffling.
        drop_last: drop the last incomplete global batch instead of padding it.
    """

    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 2048
    drop_last: bool = False


@dataclass(frozen=True)
class LoaderPosition:
    """Where a loader stands: the next step to deliver in an epoch. Saved in training checkpoints."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def shuffled_stream(rows: np.ndarray, shards: np.ndarray, cfg: PlanConfig, epoch: int) -> np.ndarray:
    """Steps 1-3: the epoch's global order of ``rows`` (dataset row ids), shard-local then buffer-shuffled."""
    rng = np.random.default_rng([cfg.seed, epoch])
    unique = np.unique(shards)
    order = rng.permutation(unique) if cfg.shuffle_shards else unique
    rank_of_shard = np.empty(int(unique.max()) + 1 if len(unique) else 0, dtype=np.int64)
    rank_of_shard[order] = np.arange(len(order))
    stream = rows[np.lexsort((rows, rank_of_shard[shards]))] if len(rows) else rows
    size = min(cfg.shuffle_buffer, len(stream))
    if size <= 1:
        return stream
    out = np.empty_like(stream)
    buffer = stream[:size].copy()
    picks = rng.integers(0, size, size=len(stream) - size)
    for i, (pick, incoming) in enumerate(zip(picks, stream[size:], strict=True)):
        out[i] = buffer[pick]
        buffer[pick] = incoming
    out[len(stream) - size :] = rng.permutation(buffer)
    return out


@dataclass(frozen=True)
class EpochPlan:
    """The order of one epoch and its split into global batches and ranks.

    Args:
        rows: dataset row ids the epoch covers (e.g. training split with both sensors).
        shards: shard index of each of ``rows``.
        cfg: sampling configuration.
        epoch: epoch number.
        global_batch: samples per optimiser step over all ranks.
    """

    rows: np.ndarray
    shards: np.ndarray
    cfg: PlanConfig
    epoch: int
    global_batch: int

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise ValueError("global batch size must be >= 1")
        if len(self.rows) == 0:
            raise ValueError("the epoch has no samples (check the split and sensor filters)")
        if self.cfg.drop_last and len(self.rows) < self.global_batch:
            raise ValueError(
                f"drop_last with {len(self.rows)} samples < global batch {self.global_batch}: no step"
            )

    @cached_property
    def order(self) -> np.ndarray:
        """The padded global sequence of row ids, length ``steps * global_batch``."""
        base = shuffled_stream(self.rows, self.shards, self.cfg, self.epoch)
        return np.resize(base, self.steps * self.global_batch)  # np.resize repeats from the start

    @property
    def steps(self) -> int:
        n, g = len(self.rows), self.global_batch
        return n // g if self.cfg.drop_last else -(-n // g)

    @property
    def padding(self) -> int:
        """Samples repeated at the end to fill the last global batch (0 with drop_last)."""
        return max(self.steps * self.global_batch - len(self.rows), 0)

    def local_batch(self, world_size: int) -> int:
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} is not divisible by world size {world_size}")
        return self.global_batch // world_size

    def positions(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Global positions (indices into ``order``) of rank ``rank``'s samples at ``step``."""
        b = self.local_batch(world_size)
        start = step * self.global_batch + rank * b
        return np.arange(start, start + b)

    def batch(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Row ids of rank ``rank``'s batch at ``step``."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside epoch of {self.steps} steps")
        return self.order[self.positions(step, rank, world_size)]


def rows_digest(rows: np.ndarray) -> str:
    """Fingerprint of the sample set, stored with loader positions: resuming on another set is refused."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]
