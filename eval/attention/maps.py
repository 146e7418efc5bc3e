"""Per-patch maps of a ViT and the pure functions that turn them into masks and clusters.

``PatchMaps`` is what the model gives for one patch; ``PatchAnalysis`` what the analysis derives from it.
The figure and the scores both read these two records, so neither needs to know how the other was made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PatchAnalysis", "PatchMaps", "keep_mass_masks", "kmeans", "token_pca_rgb", "upsample_tokens"]


@dataclass(frozen=True)
class PatchMaps:
    """What a ViT gives for one patch.

    Attributes:
        attention: (heads, gh, gw) last-layer CLS attention over the patch tokens, each head summing to 1.
        tokens: (gh * gw, D) final-norm patch tokens.
        grid: (gh, gw) token grid.
        patch: (ph, pw) pixels per token.
        cls_to_patches: (heads,) share of the CLS attention that went to patch tokens before renormalising.
    """

    attention: np.ndarray
    tokens: np.ndarray
    grid: tuple[int, int]
    patch: tuple[int, int]
    cls_to_patches: np.ndarray


@dataclass(frozen=True)
class PatchAnalysis:
    """What the analysis derives from ``PatchMaps`` (token grids are (gh, gw)).

    Attributes:
        masks: bool (heads + 1, gh, gw) thresholded attention, the mask of the head-mean attention last.
        clusters: token k-means labels, largest cluster 0.
        pca: (gh * gw, 3) first three principal components of the tokens in [0, 1].
        variance: (3,) share of the token variance of those components.
        scores: agreement with land cover (None without a land-cover map).
        entry: the patch's record in ``attention_metrics.json``.
    """

    masks: np.ndarray
    clusters: np.ndarray
    pca: np.ndarray
    variance: np.ndarray
    scores: dict | None
    entry: dict


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Seeded k-means (k-means++ init, ``iters`` Lloyd steps, float64) -> labels (N,) int64.

    Clusters are numbered by size, largest first, so colours are comparable between patches. An empty
    cluster restarts at the point worst fitted by its centre (standard; keeps k clusters).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k={k}")
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for j in range(1, k):  # k-means++: next centre drawn with probability proportional to D^2
        total = d2.sum()
        centres[j] = x[rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)]
        d2 = np.minimum(d2, ((x - centres[j]) ** 2).sum(1))

    def assign(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist = np.maximum((x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None], 0.0)
        return dist.argmin(1), dist.min(1)

    for _ in range(iters):
        labels, best = assign(centres)
        new = centres.copy()
        worst = iter(np.argsort(-best, kind="stable"))
        for j in range(k):
            members = labels == j
            new[j] = x[members].mean(0) if members.any() else x[next(worst)]
        if np.array_equal(new, centres):  # converged: further iterations change nothing
            break
        centres = new
    labels, _ = assign(centres)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    return np.argsort(order)[labels].astype(np.int64)


def token_pca_rgb(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (N, D) -> (N, 3) first three principal components, each min-max scaled to [0, 1], and
    their share of the variance (3,). Signs are fixed (largest loading positive) so reruns agree."""
    x = np.asarray(tokens, dtype=np.float64)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    m = min(3, len(s))
    vt = vt[:m] * np.sign(vt[np.arange(m), np.abs(vt[:m]).argmax(1)])[:, None]
    comps = np.zeros((len(x), 3))
    comps[:, :m] = xc @ vt.T
    lo, hi = comps.min(0), comps.max(0)
    rgb = np.where(hi > lo, (comps - lo) / np.where(hi > lo, hi - lo, 1.0), 0.5)
    var = np.zeros(3)
    var[:m] = s[:m] ** 2 / max((s**2).sum(), 1e-300)
    return rgb, var


def keep_mass_masks(attention: np.ndarray, keep_mass: float) -> np.ndarray:
    """(heads, N) attention -> bool (heads, N): per head the smallest set of tokens holding ``keep_mass``
    of the head's attention mass (DINO's thresholded attention; ties broken by token order)."""
    if not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass must be in (0, 1], got {keep_mass}")
    a = np.asarray(attention, dtype=np.float64)
    masks = np.zeros(a.shape, dtype=bool)
    for h, row in enumerate(a):
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(row[order])
        n_keep = min(int(np.searchsorted(cum, keep_mass * cum[-1] * (1 - 1e-12))) + 1, len(row))
        masks[h, order[:n_keep]] = True
    return masks


def upsample_tokens(grid: np.ndarray, patch: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a token map (..., gh, gw) to pixels (..., H, W): pixel (i, j) takes the
    token whose ``patch``-sized cell holds it (pixels past the last full cell take the last token)."""
    gh, gw = grid.shape[-2:]
    iy = np.minimum(np.arange(size[0]) // patch[0], gh - 1)
    ix = np.minimum(np.arange(size[1]) // patch[1], gw - 1)
    return grid[..., iy[:, None], ix[None, :]]
