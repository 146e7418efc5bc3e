"""Scene-level splits, the non-overlapping subset and seeded label-budget subsets.

Neighbouring SEN12MS patches overlap by up to 50 %, so a patch-level split leaks test pixels into
training. Every split here is by scene (``ROIs1158_spring_1``), and every random choice is a pure
function of a seed, so any machine recomputes the same subsets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .bands import PATCH_SIZE

__all__ = ["budget_subset", "non_overlapping", "scene_split"]


def scene_split(
    scenes: Sequence[str],
    holdout_fraction: float,
    seed: int,
    holdout_scenes: Sequence[str] | None = None,
) -> dict[str, str]:
    """Assign every scene to 'train' or 'test'.

    With ``holdout_scenes`` the user's list is the test set (unknown names are an error: a typo would
    otherwise silently put the intended test scene into training). Otherwise a seeded permutation of
    the sorted scenes puts ``round(fraction * n)`` of them (at least one when there are two or more) in
    test.
    """
    unique = sorted(set(scenes))
    if holdout_scenes is not None:
        unknown = sorted(set(holdout_scenes) - set(unique))
        if unknown:
            raise ValueError(f"hold-out scenes not found in the source: {', '.join(unknown[:10])}")
        test = set(holdout_scenes)
    else:
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
        n_test = int(round(holdout_fraction * len(unique)))
        if holdout_fraction > 0 and len(unique) >= 2:
            n_test = max(n_test, 1)
        order = np.random.default_rng(seed).permutation(len(unique))
        test = {unique[i] for i in order[:n_test]}
    return {s: ("test" if s in test else "train") for s in unique}


def non_overlapping(scene_ids: Sequence[str], crs: Sequence[str], transforms: np.ndarray) -> np.ndarray:
    """First-come-first-served subset of patches that do not overlap any earlier kept patch of their scene.

    SEN12MS cuts scenes on a 128 px stride, so neighbours share up to half their area. Walking the
    patches in dataset order (patch number within scene), a patch is kept when its footprint does not
    intersect that of a kept patch of the same scene and CRS. Footprints come from the geotransforms,
    so the rule holds for any grid, not only the 128 px one.

    Args:
        scene_ids: scene of each sample, in dataset order.
        crs: CRS string of each sample.
        transforms: (N, 6) affine coefficients (a, b, c, d, e, f) of each sample.
    Returns:
        (N,) bool mask of kept samples.
    """
    keep = np.zeros(len(scene_ids), dtype=bool)
    kept: dict[tuple[str, str], list[tuple[float, float, float, float]]] = defaultdict(list)
    for i, (scene, c, t) in enumerate(zip(scene_ids, crs, transforms, strict=True)):
        a, _, x0, _, e, y0 = (float(v) for v in t)
        x1, y1 = x0 + a * PATCH_SIZE, y0 + e * PATCH_SIZE
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        others = kept[(scene, c)]
        # Strict inequalities: patches that only touch along an edge do not overlap.
        if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in others):
            keep[i] = True
            others.append(box)
    return keep


def budget_subset(labels: np.ndarray, eligible: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Seeded subset of exactly ``budget`` eligible labelled samples, stratified by class.

    Each class gets ``budget * share`` samples (share of the class among eligible labelled samples),
    rounded by largest remainder; classes too small to fill their share give the rest to the others.
    Returns sorted sample indices.

    Args:
        labels: (N,) single-label class codes, 0 = no label (never selected).
        eligible: (N,) bool, e.g. the training split.
        budget: number of samples wanted; must not exceed the labelled eligible samples.
        seed: seed of the draw.
    """
    pool = np.flatnonzero(eligible & (labels > 0))
    if budget > len(pool):
        raise ValueError(f"label budget {budget} exceeds the {len(pool)} labelled training samples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[pool], return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    remaining = budget
    # Water-fill: give every class its proportional share, capped by what it has, until the budget is used.
    open_ = counts > 0
    while remaining > 0 and open_.any():
        share = counts[open_] / counts[open_].sum() * remaining
        floor = np.floor(share).astype(np.int64)
        order = np.argsort(-(share - floor), kind="stable")
        floor[order[: remaining - floor.sum()]] += 1
        idx = np.flatnonzero(open_)
        quota[idx] += np.minimum(floor, counts[idx] - quota[idx])
        remaining = budget - quota.sum()
        open_ = quota < counts
    chosen = []
    for cls, q in zip(classes, quota, strict=True):
        members = pool[labels[pool] == cls]
        chosen.append(rng.choice(members, size=int(q), replace=False))
    out = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    assert len(out) == budget
    return out
