"""What each node downloads from object storage over several epochs, with and without node affinity.

A model of the node shard cache, driven by the real epoch plans: each node reads its ranks' samples in
step order; a sample whose shard is not cached downloads the whole shard (as ``ShardCache`` does), and
the least recently used shards are evicted to stay within the cache size. Without node affinity every
node reads a slice of every global batch, so it touches nearly every shard each epoch; with a cache
smaller than the dataset those shards have been evicted by the time the next epoch comes back to them.
With affinity a node reads only its fixed share, which fits in a cache of ``1/N`` of the dataset.

The model leaves out what does not change the comparison: concurrency between a node's ranks (their
reads interleave within a step), the order of samples inside a step, and partial downloads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from .plan import EpochPlan, PlanConfig

__all__ = ["TrafficModel", "node_fetches"]


@dataclass(frozen=True)
class TrafficModel:
    """A dataset, a cluster and a cache.

    Attributes:
        shard_samples: samples in each shard (shard ``i`` holds rows ``sum(shard_samples[:i])`` onwards).
        shard_bytes: bytes of one shard (all the same size, as the writer makes them).
        nodes: nodes of the job; each runs ``ranks_per_node`` ranks.
        ranks_per_node: ranks on each node.
        batch_size: samples per rank per step.
        cache_bytes: each node's shard cache.
    """

    shard_samples: tuple[int, ...]
    shard_bytes: int
    nodes: int
    ranks_per_node: int
    batch_size: int
    cache_bytes: int


def node_fetches(model: TrafficModel, plan: PlanConfig, epochs: int) -> np.ndarray:
    """(epochs, nodes) bytes each node downloads in each epoch, the cache persisting across epochs.

    ``plan.node_affinity`` decides which plan the nodes follow; ``plan.nodes`` is set from ``model``.
    """
    plan = replace(plan, nodes=model.nodes)
    shards = np.repeat(np.arange(len(model.shard_samples)), model.shard_samples)
    rows = np.arange(len(shards))
    world = model.nodes * model.ranks_per_node
    global_batch = model.batch_size * world
    capacity = max(1, model.cache_bytes // model.shard_bytes)  # whole shards
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(model.nodes)]
    fetched = np.zeros((epochs, model.nodes), dtype=np.int64)
    per_node = global_batch // model.nodes  # a node's ranks take consecutive slices of each step
    for epoch in range(epochs):
        order = EpochPlan(rows, shards, plan, epoch, global_batch).order
        by_step = shards[order].reshape(-1, model.nodes, per_node)  # (steps, nodes, per_node)
        for node, cache in enumerate(caches):
            for shard in by_step[:, node, :].ravel().tolist():
                if shard in cache:
                    cache.move_to_end(shard)
                    continue
                fetched[epoch, node] += model.shard_bytes
                cache[shard] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return fetched
