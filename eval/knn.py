"""Cosine k-NN in bounded memory: similarity blocks with a running top-k.

The full test x train similarity matrix grows with the product of the two set sizes (11.8 GB in float32
for SEN12MS with every label), so it is never built: a block of at most ``memory_mb`` of similarities is
computed at a time, and each test row keeps only its best ``k`` so far. The answer does not depend on the
block size: neighbours are ranked by similarity, and **equal similarities are broken by the lower train
index** (a stable sort over candidates that are always kept in train-index order among equals), so a
small block and one block holding the whole matrix return the same neighbours.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["block_shape", "knn_scores", "knn_topk"]


def block_shape(n_test: int, n_train: int, memory_mb: float) -> tuple[int, int]:
    """(test rows, train columns) of one float32 similarity block of at most ``memory_mb``.

    Whole train rows are preferred (one pass over the train set per test block); the train set is cut
    into column blocks only when one row of it alone exceeds the budget. At least one element always fits.
    """
    if memory_mb <= 0:
        raise ValueError(f"probe.knn_memory_mb must be > 0, got {memory_mb}")
    elements = max(1, int(memory_mb * 2**20) // 4)
    cols = max(1, min(n_train, elements))
    rows = max(1, min(n_test, elements // cols))
    return rows, cols


def _merge(
    best_sim: torch.Tensor, best_idx: torch.Tensor, sim: torch.Tensor, idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of running candidates and a new block, ties to the lower train index.

    Both are ordered by (similarity descending, index ascending), and every running candidate has a
    lower train index than the block's. A stable descending sort of their concatenation therefore keeps
    equal similarities in index order.
    """
    cand_sim = torch.cat([best_sim, sim], dim=1)
    cand_idx = torch.cat([best_idx, idx], dim=1)
    order = torch.sort(cand_sim, dim=1, descending=True, stable=True).indices[:, :k]
    return cand_sim.gather(1, order), cand_idx.gather(1, order)


def _block_topk(block: torch.Tensor, first: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row of a block, equal similarities to the lower column, in (similarity
    descending, index ascending) order; columns are train indices ``first, first + 1, ...``.

    ``topk`` finds each row's k-th value ``t`` in linear time but picks among equals arbitrarily, so the
    selection is rebuilt exactly: every value above ``t``, then the lowest-index values equal to ``t``
    until there are ``k``; only those ``k`` are sorted.
    """
    k = min(k, block.shape[1])
    threshold = block.topk(k, dim=1).values[:, -1:]
    chosen = block >= threshold  # k per row, more where values tie at the threshold
    crowded = (chosen.sum(1) > k).nonzero()[:, 0]
    if len(crowded):  # rare: keep the lowest-index ties only
        sub, t = block[crowded], threshold[crowded]
        tied = sub == t
        need = k - (sub > t).sum(1, keepdim=True)
        chosen[crowded] = (sub > t) | (tied & (tied.cumsum(1) <= need))
    cols = chosen.nonzero()[:, 1].view(block.shape[0], k)  # in column order
    sim = block.gather(1, cols)
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    return sim.gather(1, order), cols.gather(1, order) + first


@torch.no_grad()
def knn_topk(
    train_x: torch.Tensor, test_x: torch.Tensor, k: int, memory_mb: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities (T, k), train indices (T, k)) of each test row's ``k`` most similar train rows.

    Rows are compared by dot product (normalise them first for cosine). Rows of the result are ordered
    by similarity descending, equal similarities by train index ascending. Memory beyond the inputs and
    the result: one block of ``memory_mb`` plus ``topk``'s work space and the masks that select its best
    (peak about 3.5x ``memory_mb``, measured).
    """
    n_train, n_test = train_x.shape[0], test_x.shape[0]
    k = min(k, n_train)
    rows, cols = block_shape(n_test, n_train, memory_mb)
    out_sim = torch.empty((n_test, k), dtype=train_x.dtype)
    out_idx = torch.empty((n_test, k), dtype=torch.long)
    for r0 in range(0, n_test, rows):
        queries = test_x[r0 : r0 + rows]
        best_sim = torch.empty((queries.shape[0], 0), dtype=train_x.dtype)
        best_idx = torch.empty((queries.shape[0], 0), dtype=torch.long)
        for c0 in range(0, n_train, cols):
            block = queries @ train_x[c0 : c0 + cols].T  # (rows, cols) similarities
            sim, idx = _block_topk(block, c0, k)
            del block
            best_sim, best_idx = _merge(best_sim, best_idx, sim, idx, k)
        out_sim[r0 : r0 + rows], out_idx[r0 : r0 + rows] = best_sim, best_idx
    return out_sim, out_idx


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    n_classes: int,
    multilabel: bool,
    cfg,
) -> np.ndarray:
    """Cosine k-NN with exp(sim / T) weights; scores are weighted label votes (rows sum to 1).

    ``cfg`` is a ``ProbeConfig`` (``knn_k``, ``knn_temperature``, ``knn_memory_mb``).
    """
    xtr = F.normalize(torch.from_numpy(train_x).float(), dim=1)
    xte = F.normalize(torch.from_numpy(test_x).float(), dim=1)
    sim, idx = knn_topk(xtr, xte, cfg.knn_k, cfg.knn_memory_mb)
    weights = (sim / cfg.knn_temperature).exp()
    targets = (
        torch.from_numpy(train_y).float()
        if multilabel
        else F.one_hot(torch.from_numpy(train_y).long(), n_classes).float()
    )
    votes = torch.empty((xte.shape[0], targets.shape[1]))
    step = max(1, 2**20 // max(1, idx.shape[1] * targets.shape[1]))  # ~4 MB of gathered labels at a time
    for r0 in range(0, xte.shape[0], step):
        w = weights[r0 : r0 + step]
        votes[r0 : r0 + step] = (w[..., None] * targets[idx[r0 : r0 + step]]).sum(1) / w.sum(1, keepdim=True)
    return votes.numpy()
