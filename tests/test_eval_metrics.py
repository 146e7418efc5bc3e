"""Classification scores against values worked out by hand and a brute-force AP in float64."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eossl.eval.metrics import (
    average_precision,
    confusion_matrix,
    mean_and_spread,
    multi_label_metrics,
    single_label_metrics,
)

# ------------------------------------------------------------------------------------------ single-label

# 10 samples, 3 classes. Confusion (rows = true, cols = predicted):
#            p0 p1 p2 | support
#   true 0 [  3, 1, 0 ]   4
#   true 1 [  0, 2, 1 ]   3
#   true 2 [  2, 0, 1 ]   3
#   predicted 5  3  2
Y_TRUE_3 = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED_3 = np.array([0, 0, 0, 1, 1, 1, 2, 0, 0, 2])
CM_3 = [[3, 1, 0], [0, 2, 1], [2, 0, 1]]


def test_confusion_matrix_rows_true_cols_predicted():
    cm = confusion_matrix(Y_TRUE_3, Y_PRED_3, 3)
    assert cm.dtype == np.int64 and cm.tolist() == CM_3
    # a class never seen still gets its row and column
    assert confusion_matrix(np.array([0, 1]), np.array([1, 1]), 3).tolist() == [
        [0, 1, 0],
        [0, 1, 0],
        [0, 0, 0],
    ]


def test_single_label_three_classes_by_hand():
    m = single_label_metrics(Y_TRUE_3, Y_PRED_3, 3, class_names=["forest", "urban", "water"])
    # OA = trace / n = (3 + 2 + 1) / 10
    assert m["overall_accuracy"] == pytest.approx(0.6)
    # recall = diag / row sums = 3/4, 2/3, 1/3 ; AA = (3/4 + 2/3 + 1/3) / 3 = 7/12
    assert m["per_class"]["recall"] == pytest.approx([3 / 4, 2 / 3, 1 / 3])
    assert m["average_accuracy"] == pytest.approx(7 / 12)
    # precision = diag / col sums = 3/5, 2/3, 1/2
    assert m["per_class"]["precision"] == pytest.approx([3 / 5, 2 / 3, 1 / 2])
    # F1 = 2TP / (2TP + FP + FN): 6/(6+2+1) = 2/3, 4/(4+1+1) = 2/3, 2/(2+1+2) = 2/5
    assert m["per_class"]["f1"] == pytest.approx([2 / 3, 2 / 3, 2 / 5])
    # macro F1 = (2/3 + 2/3 + 2/5) / 3 = 26/45 ; micro F1 = 2*6 / (2*6 + 4 + 4) = 0.6 = OA
    assert m["f1_macro"] == pytest.approx(26 / 45)
    assert m["f1_micro"] == pytest.approx(0.6)
    # kappa: p_o = 0.6, p_e = (4*5 + 3*3 + 3*2) / 100 = 0.35, (0.6 - 0.35) / (1 - 0.35) = 5/13
    assert m["kappa"] == pytest.approx(5 / 13)
    assert m["per_class"]["support"] == [4, 3, 3]
    assert m["confusion"] == CM_3
    assert m["n"] == 10 and m["classes_present"] == [0, 1, 2]
    assert m["class_names"] == ["forest", "urban", "water"]
    json.dumps(m, allow_nan=False)
    # the order of samples does not matter
    perm = np.random.default_rng(0).permutation(10)
    assert single_label_metrics(Y_TRUE_3[perm], Y_PRED_3[perm], 3) == {**m, "class_names": None}


def test_single_label_absent_classes():
    # K = 4. class 2 is never true but predicted once; class 3 is neither true nor predicted.
    #            p0 p1 p2 p3
    #   true 0 [  1, 0, 1, 0 ]
    #   true 1 [  0, 2, 0, 0 ]
    m = single_label_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), 4)
    # AA over present classes {0, 1}: (1/2 + 1) / 2, not (1/2 + 1 + 0 + 0) / 4
    assert m["average_accuracy"] == pytest.approx(0.75)
    assert m["classes_present"] == [0, 1]
    # F1: class 0 = 2/(2+0+1) = 2/3, class 1 = 1, class 2 (FP only) = 0, class 3 excluded
    # macro = (2/3 + 1 + 0) / 3 = 5/9 (with class 3 as 0 it would be 5/12, as 1 it would be 2/3)
    assert m["f1_macro"] == pytest.approx(5 / 9)
    assert m["per_class"]["f1"][:3] == pytest.approx([2 / 3, 1.0, 0.0]) and m["per_class"]["f1"][3] is None
    assert m["per_class"]["precision"] == [1.0, 1.0, 0.0, None]
    assert m["per_class"]["recall"] == [0.5, 1.0, None, None]
    assert m["per_class"]["support"] == [2, 2, 0, 0]
    assert m["overall_accuracy"] == pytest.approx(0.75) and m["f1_micro"] == pytest.approx(0.75)
    json.dumps(m, allow_nan=False)


def test_single_label_kappa_edge_cases():
    # all one class, all right: chance agreement is 1 so kappa is undefined
    assert single_label_metrics(np.array([1, 1, 1]), np.array([1, 1, 1]), 3)["kappa"] is None
    # perfect agreement over two classes: kappa = 1 ; always predicting the majority: kappa = 0
    assert single_label_metrics(np.array([0, 1, 1]), np.array([0, 1, 1]), 2)["kappa"] == pytest.approx(1.0)
    assert single_label_metrics(np.array([0, 1, 1]), np.array([1, 1, 1]), 2)["kappa"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------- multi-label

# 7 samples, 3 classes; class 2 is never true and never predicted (scores < 0.5).
#       y_true      scores               pred (>= 0.5)
# s0    1 0 0       .9  .2  .1           1 0 0
# s1    1 1 0       .6  .7  .3           1 1 0
# s2    0 0 0       .4  .6  .2           0 1 0   no positive, one false positive -> sample F1 0
# s3    0 1 0       .3  .4  .1           0 0 0   missed -> sample F1 0
# s4    1 0 0       .8  .1  .0           1 0 0
# s5    0 0 0       .1  .2  .3           0 0 0   no positive, none predicted -> sample F1 1
# s6    1 1 0       .7  .1  .05          1 0 0   TP 1, FN 1 -> sample F1 2/3
Y_ML = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
S_ML = np.array(
    [
        [0.9, 0.2, 0.1],
        [0.6, 0.7, 0.3],
        [0.4, 0.6, 0.2],
        [0.3, 0.4, 0.1],
        [0.8, 0.1, 0.0],
        [0.1, 0.2, 0.3],
        [0.7, 0.1, 0.05],
    ]
)


def test_multi_label_by_hand():
    m = multi_label_metrics(Y_ML, S_ML)
    # 3 wrong decisions (s2c1, s3c1, s6c1) out of 21
    assert m["overall_accuracy"] == pytest.approx(18 / 21)
    # exact rows: s0, s1, s4, s5
    assert m["subset_accuracy"] == pytest.approx(4 / 7)
    # class 0: TP 4 -> P = R = F1 = 1 ; class 1: TP 1, FP 1, FN 2 -> P 1/2, R 1/3, F1 2/(2+1+2) = 2/5
    assert m["per_class"]["precision"][:2] == pytest.approx([1.0, 0.5])
    assert m["per_class"]["recall"][:2] == pytest.approx([1.0, 1 / 3])
    assert m["per_class"]["f1"][:2] == pytest.approx([1.0, 0.4])
    assert m["per_class"]["precision"][2] is None and m["per_class"]["recall"][2] is None
    assert m["per_class"]["f1"][2] is None
    # macro over classes {0, 1} only: (1 + 2/5) / 2
    assert m["f1_macro"] == pytest.approx(0.7)
    # micro: TP 5, FP 1, FN 2 -> 10 / 13
    assert m["f1_micro"] == pytest.approx(10 / 13)
    # samples: (1 + 1 + 0 + 0 + 1 + 1 + 2/3) / 7 = 2/3
    assert m["f1_samples"] == pytest.approx(2 / 3)
    # AP class 0: all 4 positives ranked above all negatives -> 1.
    # AP class 1 (labels 0 1 0 1 0 0 1, scores .2 .7 .6 .4 .1 .2 .1), thresholds high to low:
    #   .7: TP1 FP0 P=1   R=1/3  -> 1/3 * 1
    #   .6: TP1 FP1              (R unchanged)
    #   .4: TP2 FP1 P=2/3 R=2/3  -> 1/3 * 2/3
    #   .2: TP2 FP3              (tie s0, s5, both negative)
    #   .1: TP3 FP4 P=3/7 R=1    -> 1/3 * 3/7  (tie s4 neg, s6 pos, scored as one block)
    #   AP = 1/3 + 2/9 + 1/7 = 44/63 ; class 2 has no positive -> excluded
    assert m["per_class"]["ap"][:2] == pytest.approx([1.0, 44 / 63]) and m["per_class"]["ap"][2] is None
    assert m["map"] == pytest.approx((1 + 44 / 63) / 2)
    assert m["per_class"]["support"] == [4, 3, 0]
    assert m["classes_with_positives"] == [0, 1] and m["n"] == 7
    json.dumps(m, allow_nan=False)


def test_multi_label_class_predicted_but_never_true():
    # class 2 now predicted for s5: in macro F1 with F1 0, still out of mAP
    s = S_ML.copy()
    s[5, 2] = 0.9
    m = multi_label_metrics(Y_ML, s)
    assert m["per_class"]["f1"][2] == 0.0 and m["per_class"]["precision"][2] == 0.0
    assert m["per_class"]["recall"][2] is None and m["per_class"]["ap"][2] is None
    assert m["f1_macro"] == pytest.approx((1 + 0.4 + 0) / 3)
    assert m["map"] == pytest.approx((1 + 44 / 63) / 2)
    # s5 now has a prediction but no true label -> sample F1 0 instead of 1
    assert m["f1_samples"] == pytest.approx((1 + 1 + 0 + 0 + 1 + 0 + 2 / 3) / 7)


def test_multi_label_threshold_is_applied_with_ge():
    y = np.array([[1, 0], [0, 1]])
    s = np.array([[0.5, 0.2], [0.49, 0.7]])  # 0.5 is a positive decision, 0.49 is not
    m = multi_label_metrics(y, s)
    assert m["overall_accuracy"] == 1.0
    assert multi_label_metrics(y, s, threshold=0.6)["per_class"]["recall"] == [0.0, 1.0]


def test_ap_ties_scored_as_a_block():
    # neg .9, then a tie at .5 holding pos, pos, neg. As one block: at .9 P=0, R=0; at .5 TP2 FP2 -> AP = 1/2.
    # Breaking the tie would give (1/2 + 2/3)/2 = 7/12 (positives first) or (1/3 + 2/4)/2 = 5/12 (negative
    # first).
    assert average_precision(np.array([0, 1, 1, 0]), np.array([0.9, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert average_precision(np.array([0, 1, 0, 1]), np.array([0.9, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    # y = [1, 0, 1, 0] with scores .9 .5 .5 .1: 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(5 / 6)
    # all scores tied: AP = prevalence
    assert average_precision(np.array([1, 0, 0, 0]), np.zeros(4)) == pytest.approx(0.25)
    assert np.isnan(average_precision(np.zeros(4), np.arange(4.0)))


def _brute_force_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Step-wise PR curve: each distinct score as a threshold, high to low, AP = sum dR * P."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = int(np.sum(pred & (y == 1)))
        precision = tp / int(np.sum(pred))
        recall = tp / int(np.sum(y == 1))
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(6))
def test_ap_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, k = 60, 5
    y = (rng.random((n, k)) < rng.uniform(0.1, 0.6, size=k)).astype(int)
    y[0] = 1  # every class has a positive
    s = rng.integers(0, 8, size=(n, k)) / 8.0  # 8 levels over 60 samples: many ties
    m = multi_label_metrics(y, s)
    ref = [_brute_force_ap(y[:, c], s[:, c]) for c in range(k)]
    assert m["per_class"]["ap"] == pytest.approx(ref, abs=1e-12)
    assert m["map"] == pytest.approx(np.mean(ref), abs=1e-12)
    # without ties, AP is the mean over positives of precision at their rank
    s2 = rng.permutation(n).astype(float)
    for c in range(k):
        rank = np.argsort(-s2)
        hits = np.cumsum(y[rank, c])
        mean_prec = np.mean((hits / np.arange(1, n + 1))[y[rank, c] == 1])
        assert average_precision(y[:, c], s2) == pytest.approx(mean_prec, abs=1e-12)


def test_multi_label_perfect_and_all_wrong():
    rng = np.random.default_rng(3)
    y = rng.random((20, 4)) < 0.4
    y[0], y[1] = True, False  # each class has a positive and a negative
    perfect = multi_label_metrics(y, np.where(y, 0.9, 0.1))
    for key in ("overall_accuracy", "subset_accuracy", "f1_macro", "f1_micro", "f1_samples", "map"):
        assert perfect[key] == 1.0, key
    assert perfect["per_class"]["f1"] == [1.0] * 4 and perfect["per_class"]["ap"] == [1.0] * 4
    wrong = multi_label_metrics(y, np.where(y, 0.1, 0.9))
    for key in ("overall_accuracy", "subset_accuracy", "f1_macro", "f1_micro", "f1_samples"):
        assert wrong[key] == 0.0, key
    assert wrong["per_class"]["f1"] == [0.0] * 4
    # every positive ranked last: AP = mean over positives of i / (n_neg + i) < 1
    assert all(ap < 1.0 for ap in wrong["per_class"]["ap"])


def test_multi_label_no_positive_anywhere():
    m = multi_label_metrics(np.zeros((3, 2), dtype=bool), np.full((3, 2), 0.1))
    assert m["overall_accuracy"] == 1.0 and m["f1_samples"] == 1.0
    assert m["f1_macro"] is None and m["f1_micro"] is None and m["map"] is None
    assert m["classes_with_positives"] == []
    json.dumps(m, allow_nan=False)


# ------------------------------------------------------------------------------------------ across runs


def test_mean_and_spread():
    m = mean_and_spread([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    # mean 5, sum of squared deviations 32, sample variance 32 / 7
    assert m == {"mean": 5.0, "std": pytest.approx((32 / 7) ** 0.5), "n": 8, "min": 2.0, "max": 9.0}
    assert mean_and_spread([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1, "min": 0.7, "max": 0.7}
    assert mean_and_spread((1, 2))["std"] == pytest.approx(2**-0.5)
    assert all(type(v) in (float, int) for v in m.values())


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: single_label_metrics(np.array([0, 1]), np.array([0, 1, 1]), 2), "samples"),
        (lambda: single_label_metrics(np.array([0, 3]), np.array([0, 1]), 3), "class index 3 outside 0..2"),
        (lambda: single_label_metrics(np.array([0, -1]), np.array([0, 1]), 3), "class index -1"),
        (lambda: single_label_metrics(np.array([0.0, 1.0]), np.array([0, 1]), 2), "integer class indices"),
        (lambda: single_label_metrics(np.array([[0, 1]]), np.array([[0, 1]]), 2), "1-D"),
        (lambda: single_label_metrics(np.array([], dtype=int), np.array([], dtype=int), 2), "no samples"),
        (lambda: single_label_metrics(np.array([0]), np.array([0]), 0), "n_classes"),
        (lambda: single_label_metrics(np.array([0]), np.array([0]), 2, ["a"]), "class_names has 1"),
        (lambda: confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2), "outside"),
        (lambda: multi_label_metrics(np.zeros((2, 3)), np.zeros((2, 2))), "shape"),
        (lambda: multi_label_metrics(np.zeros(3), np.zeros(3)), r"\(N, K\)"),
        (lambda: multi_label_metrics(np.array([[0, 2]]), np.zeros((1, 2))), "0/1"),
        (
            lambda: multi_label_metrics(np.array([[0, 1]]), np.array([[0.1, np.nan]])),
            "NaN.*sample 0, class 1",
        ),
        (
            lambda: multi_label_metrics(np.array([[0, 1]]), np.zeros((1, 2)), threshold=float("nan")),
            "threshold",
        ),
        (lambda: multi_label_metrics(np.zeros((0, 2)), np.zeros((0, 2))), "no samples"),
        (lambda: mean_and_spread([]), "non-empty"),
        (lambda: mean_and_spread([1.0, float("nan")]), "finite"),
    ],
)
def test_invalid_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
