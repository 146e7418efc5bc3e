"""k-NN in bounded memory: blocks of any size give the float64 reference's neighbours and votes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eossl.eval.knn import block_shape, knn_scores, knn_topk
from eossl.eval.probes import ProbeConfig


def _reference(train_x, train_y, test_x, n_classes, k, temperature):
    """Float64 cosine k-NN from its definition: rank by (similarity desc, train index asc), vote."""
    tr = train_x.astype(np.float64)
    te = test_x.astype(np.float64)
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    sim = te @ tr.T
    k = min(k, len(tr))
    idx = np.stack([np.lexsort((np.arange(len(tr)), -row))[:k] for row in sim])
    top = np.take_along_axis(sim, idx, 1)
    w = np.exp(top / temperature)
    onehot = np.eye(n_classes)[train_y]
    return idx, (w[..., None] * onehot[idx]).sum(1) / w.sum(1, keepdims=True)


def _clustered(n_train=300, n_test=70, dim=24, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    ytr = rng.integers(0, classes, n_train)
    xtr = (centres[ytr] + rng.normal(size=(n_train, dim))).astype(np.float32)
    xte = (centres[rng.integers(0, classes, n_test)] + rng.normal(size=(n_test, dim))).astype(np.float32)
    return xtr, ytr, xte


# 1e-4 MB = 26 similarities per block: blocks cut both the test rows and the train columns
@pytest.mark.parametrize("memory_mb", [1e-4, 0.002, 0.05, 1024.0])
def test_blocked_knn_matches_float64_reference(memory_mb):
    xtr, ytr, xte = _clustered()
    cfg = ProbeConfig(knn_k=7, knn_memory_mb=memory_mb)
    ref_idx, ref_votes = _reference(xtr, ytr, xte, 5, cfg.knn_k, cfg.knn_temperature)
    tr = torch.nn.functional.normalize(torch.from_numpy(xtr), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(xte), dim=1)
    _, idx = knn_topk(tr, te, cfg.knn_k, memory_mb)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    votes = knn_scores(xtr, ytr, xte, 5, False, cfg)
    np.testing.assert_allclose(votes, ref_votes, rtol=0, atol=2e-5)
    np.testing.assert_allclose(votes.sum(1), 1.0, atol=1e-5)


def test_ties_go_to_the_lower_train_index_whatever_the_block_size():
    # one-hot train rows: similarities are exactly 0 or 1, so many neighbours tie exactly
    dim = 4
    rng = np.random.default_rng(3)
    hot = rng.integers(0, dim, 200)
    xtr = (np.eye(dim)[hot] * rng.integers(1, 5, (200, 1))).astype(np.float32)  # scale is normalised away
    xte = np.eye(dim, dtype=np.float32)[[0, 1, 2, 3, 2]]
    ytr = rng.integers(0, 3, 200)
    k = 9
    ref_idx, ref_votes = _reference(xtr, ytr, xte, 3, k, 0.07)
    assert all(len(np.flatnonzero(hot == c)) > k for c in range(dim))  # the cut falls inside a tie
    for memory_mb in (1e-5, 1e-4, 3e-4, 100.0):
        cfg = ProbeConfig(knn_k=k, knn_memory_mb=memory_mb)
        _, idx = knn_topk(
            torch.from_numpy(xtr / np.linalg.norm(xtr, axis=1, keepdims=True)),
            torch.from_numpy(xte),
            k,
            memory_mb,
        )
        np.testing.assert_array_equal(idx.numpy(), ref_idx)
        np.testing.assert_allclose(knn_scores(xtr, ytr, xte, 3, False, cfg), ref_votes, atol=1e-6)
    # the lowest-index rows of the query's direction, in index order
    np.testing.assert_array_equal(ref_idx[0], np.flatnonzero(hot == 0)[:k])


def test_multilabel_votes_and_k_larger_than_train():
    xtr, _, xte = _clustered(n_train=6, n_test=4)
    y = np.random.default_rng(0).random((6, 3)) < 0.5
    cfg = ProbeConfig(knn_k=20, knn_memory_mb=1e-5)
    scores = knn_scores(xtr, y, xte, 3, True, cfg)
    tr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    te = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    w = np.exp(te.astype(np.float64) @ tr.T.astype(np.float64) / cfg.knn_temperature)  # every train row votes
    np.testing.assert_allclose(scores, w @ y / w.sum(1, keepdims=True), atol=2e-5)


def test_block_shape_respects_the_budget():
    assert block_shape(1000, 500, 1.0) == (524, 500)  # 262,144 float32s: whole train rows
    assert block_shape(10, 10**7, 1.0) == (1, 262144)  # one row exceeds it: columns are cut
    assert block_shape(3, 4, 1024.0) == (3, 4)
    with pytest.raises(ValueError, match="knn_memory_mb"):
        block_shape(3, 4, 0)
