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

**Node affinity** (``node_affinity``, for a node cache smaller than the dataset): without it every node
reads a slice of every global batch, so over an epoch it touches nearly every shard and, with a cache
that holds only part of the dataset, downloads nearly all of them again each epoch. With it the shards
are shared out once over the ``nodes`` nodes (seeded by ``seed`` alone, balanced by sample count), and
each node's ranks read only its own shards, every epoch, in an order of its own (steps 1-3 per node,
drawn from ``rng(seed, epoch, node)``). Step ``k`` is then the concatenation over nodes of each node's
``k``-th ``G/N`` samples, so ranks ``n*W/N .. (n+1)*W/N - 1`` (node ``n`` in launcher order) read node
``n``'s shards only. Each node's stream is padded (or cut, ``drop_last``) to the same number of steps,
so every rank still gets the same number of full batches. The order now depends on ``nodes``: a run
resumes exactly on the same number of nodes (the loader refuses another).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

__all__ = ["EpochPlan", "LoaderPosition", "PlanConfig", "node_of_shard", "shuffled_stream"]


@dataclass(frozen=True)
class PlanConfig:
    """Sampling of an epoch.

    Attributes:
        seed: base seed; every epoch draws from ``rng([seed, epoch])``.
        shuffle_shards: permute shard order each epoch (off only for debugging).
        shuffle_buffer: samples in the shuffle buffer. Larger mixes better; the working set of open shards
            grows with it (buffer / samples-per-shard + 1). 0 or 1 disables sample shuffling.
        drop_last: drop the last incomplete global batch instead of padding it.
        node_affinity: give each node a fixed share of the shards (see the module docstring): turn it on
            when the node cache (``storage.cache_bytes``) holds less than the dataset, so that each node
            downloads its share once instead of nearly every shard every epoch. Samples mix within a
            node's share only, and a resume needs the same number of nodes.
        nodes: nodes sharing out the shards under ``node_affinity``; the loader sets it from the launcher
            (``WORLD_SIZE / LOCAL_WORLD_SIZE``). Ignored without ``node_affinity``.
    """

    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 2048
    drop_last: bool = False
    node_affinity: bool = False
    nodes: int = 1


@dataclass(frozen=True)
class LoaderPosition:
    """Where a loader stands: the next step to deliver in an epoch. Saved in training checkpoints."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def shuffled_stream(
    rows: np.ndarray, shards: np.ndarray, cfg: PlanConfig, epoch: int, node: int | None = None
) -> np.ndarray:
    """Steps 1-3: the epoch's global order of ``rows`` (dataset row ids), shard-local then buffer-shuffled.

    ``node``: the stream of one node's share under node affinity (its own random stream).
    """
    rng = np.random.default_rng([cfg.seed, epoch] if node is None else [cfg.seed, epoch, node])
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


def node_of_shard(shards: np.ndarray, nodes: int, seed: int) -> dict[int, int]:
    """The fixed share of the shards each node reads under node affinity: shard -> node.

    The same for every epoch (it depends on ``seed`` only), so a node's cache keeps serving it. Shards
    go, largest first (in a seeded order among equals), to the node with the fewest samples so far
    (lowest node among equals): node sample counts differ by at most one shard's.
    """
    unique, counts = np.unique(shards, return_counts=True)
    tiebreak = np.random.default_rng([seed, 0x5EED]).permutation(len(unique))
    load = np.zeros(nodes, dtype=np.int64)
    owner: dict[int, int] = {}
    for i in np.lexsort((tiebreak, -counts)):
        node = int(np.argmin(load))
        owner[int(unique[i])] = node
        load[node] += counts[i]
    return owner


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
        if self.affinity:
            nodes = self.cfg.nodes
            if self.global_batch % nodes:
                raise ValueError(
                    f"node_affinity: global batch {self.global_batch} is not divisible by {nodes} nodes"
                )
            if len(np.unique(self.shards)) < nodes:
                raise ValueError(
                    f"node_affinity: {len(np.unique(self.shards))} shards cannot be shared out over "
                    f"{nodes} nodes"
                )
            if self.cfg.drop_last and min(map(len, self._node_rows)) < self.global_batch // nodes:
                raise ValueError(
                    f"drop_last: a node's share is smaller than its {self.global_batch // nodes} samples "
                    "per step"
                )

    @property
    def affinity(self) -> bool:
        return self.cfg.node_affinity and self.cfg.nodes > 1

    @cached_property
    def _node_rows(self) -> list[np.ndarray]:
        """Per node, the positions in ``rows`` of the samples of its shards."""
        owner = node_of_shard(self.shards, self.cfg.nodes, self.cfg.seed)
        lookup = np.zeros(int(self.shards.max()) + 1, dtype=np.int64)
        lookup[list(owner)] = list(owner.values())
        node = lookup[self.shards]
        return [np.flatnonzero(node == n) for n in range(self.cfg.nodes)]

    @cached_property
    def order(self) -> np.ndarray:
        """The padded global sequence of row ids, length ``steps * global_batch``."""
        if not self.affinity:
            base = shuffled_stream(self.rows, self.shards, self.cfg, self.epoch)
            return np.resize(base, self.steps * self.global_batch)  # np.resize repeats from the start
        per_node = self.global_batch // self.cfg.nodes
        streams = [
            np.resize(
                shuffled_stream(self.rows[pos], self.shards[pos], self.cfg, self.epoch, node=n),
                self.steps * per_node,
            )
            for n, pos in enumerate(self._node_rows)
        ]
        # (nodes, steps, per_node) -> (steps, nodes, per_node): step k = every node's k-th slice in turn
        return np.stack(streams).reshape(self.cfg.nodes, self.steps, per_node).transpose(1, 0, 2).ravel()

    @property
    def steps(self) -> int:
        if self.affinity:
            per_node = self.global_batch // self.cfg.nodes
            counts = [len(pos) for pos in self._node_rows]
            return min(counts) // per_node if self.cfg.drop_last else -(-max(counts) // per_node)
        n, g = len(self.rows), self.global_batch
        return n // g if self.cfg.drop_last else -(-n // g)

    @property
    def padding(self) -> int:
        """Samples repeated at the end to fill the last global batch (0 with drop_last); with node
        affinity, also those that fill the smaller nodes' shares up to the largest's steps."""
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
