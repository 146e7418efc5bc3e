"""Scores of SEN12MS scene classification, single-label (IGBP class) and multi-label, in pure NumPy.

Every function computes in float64 and returns plain Python values (``float``, ``int``, ``list``, ``None``
where a quantity is undefined), so a result goes straight into ``json.dumps(..., allow_nan=False)`` and an
MLflow run. Undefined per-class quantities (precision of a class never predicted, recall or AP of a class
with no positive) are ``None``, never 0, and the averages say which classes they run over:

* ``average_accuracy`` averages recall over classes present in ``y_true``;
* ``f1_macro`` averages F1 over classes present in ``y_true`` or in the predictions;
* ``map`` averages AP over classes with at least one positive in ``y_true``.

A class that is absent from an evaluation split (common on SEN12MS hold-out scenes, where several IGBP
classes never occur) therefore neither drags an average down as a 0 nor lifts it as a 1.

Per-class F1 is ``2 TP / (2 TP + FP + FN)``: it equals the harmonic mean of precision and recall where both
exist, is 0 for a class that is true but never predicted (or predicted but never true), and is undefined
only when the class is neither true nor predicted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "average_precision",
    "confusion_matrix",
    "mean_and_spread",
    "multi_label_metrics",
    "single_label_metrics",
]


# ---------------------------------------------------------------------------------------------- helpers


def _json_list(values: np.ndarray) -> list[float | None]:
    """Float array -> list of Python floats, NaN -> None (JSON has no NaN)."""
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64).tolist()]


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den in float64, NaN where den == 0 (the quantity is undefined there)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _f1_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from counts, NaN where the class (or sample) is neither true nor predicted."""
    return _safe_ratio(2 * tp, 2 * tp + fp + fn)


def _check_names(class_names: Sequence[str] | None, n_classes: int) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(c) for c in class_names]
    if len(names) != n_classes:
        raise ValueError(f"class_names has {len(names)} names but there are {n_classes} classes")
    return names


def _check_labels(name: str, y: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {y.shape}")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise ValueError(f"{name} holds class index {int(bad)} outside 0..{n_classes - 1}")
    return y.astype(np.int64)


def _check_single(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    y_true = _check_labels("y_true", y_true, int(n_classes))
    y_pred = _check_labels("y_pred", y_pred, int(n_classes))
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.shape[0]} samples but y_pred has {y_pred.shape[0]}")
    if y_true.size == 0:
        raise ValueError("no samples to score (y_true is empty)")
    return y_true, y_pred


# ------------------------------------------------------------------------------------------ single-label


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true, predicted) class pairs.

    Args:
        y_true: (N,) integer class indices in ``0..n_classes-1``.
        y_pred: (N,) integer class indices in ``0..n_classes-1``.
        n_classes: K, the number of classes (absent classes still get a row and a column).

    Returns:
        (K, K) int64 array, rows = true class, columns = predicted class.

    Raises:
        ValueError: on shape mismatch, non-integer labels, labels out of range or no samples.
    """
    y_true, y_pred = _check_single(y_true, y_pred, n_classes)
    k = int(n_classes)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(np.int64)


def single_label_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, class_names: Sequence[str] | None = None
) -> dict:
    """Scores of a single-label classifier (one IGBP class per patch).

    Args:
        y_true: (N,) integer true class indices in ``0..n_classes-1``.
        y_pred: (N,) integer predicted class indices (the argmax of the logits).
        n_classes: K; fixes the length of the per-class lists and the confusion matrix.
        class_names: optional K names, echoed under ``class_names``.

    Returns:
        A JSON-serialisable dict:
        ``overall_accuracy`` (fraction correct); ``average_accuracy`` (mean recall over the classes
        present in ``y_true``: a class absent from the evaluation set is left out, not counted as 0);
        ``f1_macro`` (mean F1 over classes present in ``y_true`` or ``y_pred``: a class predicted but
        never true counts with F1 = 0, a class neither true nor predicted is left out); ``f1_micro``
        (from pooled TP/FP/FN; equals overall accuracy for single-label data); ``kappa`` (Cohen's;
        ``None`` when chance agreement is 1, i.e. truth and predictions are all one same class);
        ``per_class`` with lists ``precision``, ``recall``, ``f1`` (``None`` where undefined) and
        ``support``; ``confusion`` (rows = true); ``n``; ``classes_present`` (indices in ``y_true``);
        ``class_names``.

    Raises:
        ValueError: on shape mismatch, non-integer labels, labels out of range or no samples.
    """
    y_true, y_pred = _check_single(y_true, y_pred, n_classes)
    k = int(n_classes)
    names = _check_names(class_names, k)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(np.int64)
    n = int(y_true.size)

    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # (K,) true count per class
    predicted = cm.sum(axis=0)  # (K,) predicted count per class
    fp = predicted - tp
    fn = support - tp
    precision = _safe_ratio(tp, predicted)  # NaN: never predicted
    recall = _safe_ratio(tp, support)  # NaN: never true
    f1 = _f1_counts(tp, fp, fn)  # NaN: neither true nor predicted

    present = support > 0
    tp_all, fp_all, fn_all = tp.sum(), fp.sum(), fn.sum()
    # Cohen's kappa = (p_o - p_e) / (1 - p_e), here multiplied through by n^2 to stay in counts.
    expected = float(np.dot(support.astype(np.float64), predicted.astype(np.float64)))
    kappa_den = float(n) * n - expected
    kappa = (n * tp_all - expected) / kappa_den if kappa_den != 0 else math.nan

    return {
        "n": n,
        "overall_accuracy": float(tp_all / n),
        "average_accuracy": float(recall[present].mean()),
        "f1_macro": float(np.nanmean(f1)),  # at least one class is present since n > 0
        "f1_micro": float(2 * tp_all / (2 * tp_all + fp_all + fn_all)),
        "kappa": _json_float(kappa),
        "per_class": {
            "precision": _json_list(precision),
            "recall": _json_list(recall),
            "f1": _json_list(f1),
            "support": [int(s) for s in support],
        },
        "confusion": cm.tolist(),
        "classes_present": [int(c) for c in np.flatnonzero(present)],
        "class_names": names,
    }


# ------------------------------------------------------------------------------------------- multi-label


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one binary ranking, as ``sklearn.metrics.average_precision_score``.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score values taken as thresholds in decreasing
    order (R_0 = 0). Samples with equal scores form one threshold, so a tie is scored as a block, not
    in whatever order a sort leaves it; no interpolation is applied.

    Args:
        y_true: (N,) binary (bool or 0/1) labels.
        scores: (N,) scores, higher = more likely positive (NaN not allowed, +-inf rank as usual).

    Returns:
        AP in [0, 1], or NaN when ``y_true`` has no positive (AP is undefined then).
    """
    y = np.asarray(y_true).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each block of equal scores; != (not np.diff) keeps inf == inf as one block
    last = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    last = np.append(last, s_sorted.size - 1)
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    if tps.size == 0 or tps[-1] == 0:
        return math.nan
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _check_multi(y_true, scores, threshold) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if y_true.ndim != 2:
        raise ValueError(f"y_true must be a (N, K) label matrix, got shape {y_true.shape}")
    if scores.shape != y_true.shape:
        raise ValueError(f"scores has shape {scores.shape} but y_true has shape {y_true.shape}")
    if y_true.shape[0] == 0 or y_true.shape[1] == 0:
        raise ValueError(f"no samples or no classes to score (shape {y_true.shape})")
    if not (np.issubdtype(y_true.dtype, np.number) or y_true.dtype == bool):
        raise ValueError(f"y_true must be bool or 0/1, got dtype {y_true.dtype}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold only 0/1 (or bool) labels")
    if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == bool):
        raise ValueError(f"scores must be numeric, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        row, col = np.argwhere(np.isnan(scores))[0]
        raise ValueError(f"scores hold NaN (first at sample {row}, class {col})")
    if not isinstance(threshold, (int, float, np.number)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return y_true.astype(bool), scores


def multi_label_metrics(
    y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5, class_names: Sequence[str] | None = None
) -> dict:
    """Scores of a multi-label classifier (every IGBP class present in a patch is a label).

    Args:
        y_true: (N, K) bool or 0/1 labels.
        scores: (N, K) per-class scores. The ranking metrics (AP, mAP) accept probabilities or logits
            alike, but the thresholded metrics predict ``scores >= threshold``, so with the default 0.5
            the caller passes probabilities (sigmoid outputs), not logits.
        threshold: decision threshold on ``scores``.
        class_names: optional K names, echoed under ``class_names``.

    Returns:
        A JSON-serialisable dict:
        ``overall_accuracy``: mean over all N*K binary decisions (label-wise accuracy, the "accuracy"
        the SEN12MS classification code reports; dominated by easy negatives); ``subset_accuracy``:
        fraction of samples whose whole label set is exact; ``f1_macro``: mean F1 over classes with a
        positive in ``y_true`` or in the predictions; ``f1_micro``: F1 of TP/FP/FN pooled over classes;
        ``f1_samples``: mean per-sample F1, where a sample with no true and no predicted label counts as
        1 and one with predictions but no true label as 0; ``map``: mean AP over classes with a
        positive in ``y_true``; ``per_class`` lists ``precision``, ``recall``, ``f1``, ``ap`` (``None``
        where undefined) and ``support``; ``n``; ``classes_with_positives``; ``class_names``.
        ``f1_macro``/``f1_micro``/``map`` are ``None`` when no class qualifies (no positive anywhere).

    Raises:
        ValueError: on shape mismatch, labels other than 0/1, NaN scores or a non-finite threshold.
    """
    y, s = _check_multi(y_true, scores, threshold)
    n, k = y.shape
    names = _check_names(class_names, k)
    pred = s >= threshold  # (N, K) bool

    tp = (y & pred).sum(axis=0).astype(np.float64)  # (K,) per class
    fp = (~y & pred).sum(axis=0).astype(np.float64)
    fn = (y & ~pred).sum(axis=0).astype(np.float64)
    support = y.sum(axis=0)
    precision = _safe_ratio(tp, tp + fp)
    recall = _safe_ratio(tp, tp + fn)
    f1 = _f1_counts(tp, fp, fn)
    ap = np.array([average_precision(y[:, c], s[:, c]) for c in range(k)])

    tp_s = (y & pred).sum(axis=1)  # (N,) per sample
    fp_s = (~y & pred).sum(axis=1)
    fn_s = (y & ~pred).sum(axis=1)
    f1_s = np.nan_to_num(_f1_counts(tp_s, fp_s, fn_s), nan=1.0)  # empty truth, empty prediction: 1

    with_pos = support > 0
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "n": int(n),
        "overall_accuracy": float((pred == y).mean()),
        "subset_accuracy": float((pred == y).all(axis=1).mean()),
        "f1_macro": _json_float(float(np.nanmean(f1)) if (~np.isnan(f1)).any() else math.nan),
        "f1_micro": _json_float(2 * tp.sum() / micro_den if micro_den else math.nan),
        "f1_samples": float(f1_s.mean()),
        "map": _json_float(float(ap[with_pos].mean()) if with_pos.any() else math.nan),
        "per_class": {
            "precision": _json_list(precision),
            "recall": _json_list(recall),
            "f1": _json_list(f1),
            "ap": _json_list(ap),
            "support": [int(v) for v in support],
        },
        "classes_with_positives": [int(c) for c in np.flatnonzero(with_pos)],
        "class_names": names,
    }


# ------------------------------------------------------------------------------------------ across runs


def mean_and_spread(values: Sequence[float]) -> dict:
    """Summary of one score over repeated runs (seeds, folds).

    Args:
        values: the scores, one per run.

    Returns:
        ``{"mean", "std", "n", "min", "max"}``; ``std`` is the sample standard deviation (ddof = 1), the
        spread to report for a handful of seeds, and 0.0 for a single value.

    Raises:
        ValueError: when ``values`` is empty, not 1-D or holds NaN/inf.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {v.tolist()}")
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "n": int(v.size),
        "min": float(v.min()),
        "max": float(v.max()),
    }
