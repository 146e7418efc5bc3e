"""Segmentation scores: supervised per-pixel IoU, and the agreement of an unsupervised segmentation.

Supervised (``pixel_confusion``, ``segmentation_scores``): predictions and references are class indices;
pixels whose reference is the ignore index (no data, unclassified) are left out of every count. The
confusion matrix is accumulated over all scored pixels of the evaluation set (dataset-level IoU, not a mean
of per-image IoUs). IoU_c = TP / (TP + FP + FN). A class absent from both prediction and reference has no
IoU (NaN, reported as absent) and is left out of the mean; a class predicted but absent from the reference
(or present but never predicted) has IoU 0 and counts. mIoU is the mean over the classes with an IoU.

Unsupervised (``matched_miou``): clusters have no class names, so they are matched to classes first:
one-to-one, maximising the total IoU (Hungarian algorithm on the cluster x class IoU matrix), the usual
protocol for unsupervised segmentation (e.g. PiCIE, STEGO). The score is then the mean IoU over the target
classes present in the map; a class that no cluster is matched to scores 0, so a segmentation with fewer
clusters than classes cannot reach 1.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["iou_matrix", "matched_miou", "pixel_confusion", "segmentation_scores"]


def iou_matrix(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (cluster, class) pair over the given pixels.

    Args:
        pred, target: 1-D integer arrays of the same length (the pixels to score).

    Returns:
        (iou, clusters, classes): iou is float64 (n_clusters, n_classes); clusters and classes are the
        sorted distinct values of ``pred`` and ``target`` that index its rows and columns.
    """
    clusters, p = np.unique(pred, return_inverse=True)
    classes, t = np.unique(target, return_inverse=True)
    # Joint histogram in one pass: intersection counts (n_clusters, n_classes).
    inter = np.bincount(p.ravel() * len(classes) + t.ravel(), minlength=len(clusters) * len(classes))
    inter = inter.reshape(len(clusters), len(classes)).astype(np.float64)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, clusters, classes


def matched_miou(
    pred: np.ndarray, target: np.ndarray, n_target_classes: int | None = None, ignore: int | None = 0
) -> dict:
    """Mean IoU after the optimal one-to-one matching of clusters to classes.

    Args:
        pred: cluster ids, any integers, same shape as ``target`` (e.g. k-means token clusters upsampled
            to the pixel grid).
        target: class codes (SEN12MS simplified IGBP: 1..10, 0 = no data).
        n_target_classes: largest valid class code (10 for the simplified IGBP scheme). When given, a
            non-ignored target value outside ``0..n_target_classes`` raises ValueError: it guards against
            passing raw IGBP codes (1..17) where simplified ones are expected. It does not add absent
            classes to the mean (the score is over the classes present in ``target``).
        ignore: target value whose pixels are left out of every count (no data); None keeps all pixels.

    Returns:
        ``{"miou": float, "per_class": {class: iou}, "matching": {cluster: class}}``: per_class holds every
        class present (0.0 when no cluster is matched to it); matching holds only pairs with IoU > 0 (a
        zero-IoU assignment is an arbitrary tie of the Hungarian solver and means "unmatched"). With no
        scorable pixel, miou is NaN and both dicts are empty.

    Raises:
        ValueError: shapes differ, non-integer inputs, or a class code above ``n_target_classes``.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    if pred.dtype.kind not in "iub" or target.dtype.kind not in "iub":
        raise ValueError(f"pred and target must be integer arrays, got {pred.dtype} and {target.dtype}")
    valid = np.ones(target.shape, dtype=bool) if ignore is None else target != ignore
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    if n_target_classes is not None and target.size:
        bad = np.unique(target[(target < 0) | (target > n_target_classes)])
        if bad.size:
            raise ValueError(f"target class codes {bad[:10].tolist()} outside 0..{n_target_classes}")
    if target.size == 0:
        return {"miou": float("nan"), "per_class": {}, "matching": {}}
    iou, clusters, classes = iou_matrix(pred, target)
    rows, cols = linear_sum_assignment(iou, maximize=True)  # rectangular: min(n_clusters, n_classes) pairs
    per_class = {int(c): 0.0 for c in classes}
    matching = {}
    for r, c in zip(rows, cols, strict=True):
        if iou[r, c] > 0:
            per_class[int(classes[c])] = float(iou[r, c])
            matching[int(clusters[r])] = int(classes[c])
    return {"miou": float(np.mean(list(per_class.values()))), "per_class": per_class, "matching": matching}


def pixel_confusion(
    pred: np.ndarray, target: np.ndarray, n_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(K, K) int64 pixel counts, rows = reference class, columns = predicted class.

    Args:
        pred, target: integer arrays of the same shape; ``pred`` in ``0..K-1`` wherever ``target`` is scored.
        n_classes: K.
        ignore_index: reference value whose pixels are not counted.

    Raises:
        ValueError: shapes differ, non-integer arrays, or a scored value outside ``0..K-1``.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    if pred.dtype.kind not in "iu" or target.dtype.kind not in "iu":
        raise ValueError(f"pred and target must be integer arrays, got {pred.dtype} and {target.dtype}")
    valid = target != ignore_index
    t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
    for name, v in (("target", t), ("pred", p)):
        if v.size and (v.min() < 0 or v.max() >= n_classes):
            raise ValueError(f"{name} holds values outside 0..{n_classes - 1} (and not {ignore_index})")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_scores(confusion: np.ndarray, class_names=None) -> dict:
    """mIoU, per-class IoU and pixel accuracy from a pixel confusion matrix (see the module docstring).

    Returns:
        JSON-ready dict: ``miou`` (None when no class has an IoU), ``pixel_accuracy`` (None without scored
        pixels), ``per_class_iou`` (list, None = absent from both prediction and reference),
        ``classes_scored`` (how many entered the mean), ``support`` (reference pixels per class),
        ``pixels`` (scored pixels), ``class_names``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.full(len(cm), np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    total = cm.sum()
    scored = ~np.isnan(iou)
    return {
        "miou": float(iou[scored].mean()) if scored.any() else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
        "classes_scored": int(scored.sum()),
        "support": [int(v) for v in cm.sum(1)],
        "pixels": int(total),
        "class_names": list(class_names) if class_names is not None else None,
    }
