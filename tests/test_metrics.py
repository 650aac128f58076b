import math

import numpy as np
import pytest

from covidscan.metrics import (
    bootstrap_ci,
    compute_metrics,
    confusion_matrix,
    expected_calibration_error,
    metrics_from_confusion,
)


def test_confusion_and_hand_computed_metrics():
    # true: 0 0 0 0 1 1 1 2 2 2 ; pred: 0 0 0 1 1 1 0 2 2 1
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
    cm = confusion_matrix(y, pred, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
    m = metrics_from_confusion(cm)
    # class 0: tp 3, fn 1, fp 1, tn 5
    assert m["sensitivity"][0] == pytest.approx(3 / 4)
    assert m["specificity"][0] == pytest.approx(5 / 6)
    assert m["ppv"][0] == pytest.approx(3 / 4)
    assert m["npv"][0] == pytest.approx(5 / 6)
    assert m["f1"][0] == pytest.approx(0.75)
    # class 1: tp 2, fn 1, fp 2, tn 5
    assert m["ppv"][1] == pytest.approx(0.5) and m["specificity"][1] == pytest.approx(5 / 7)
    # class 2: tp 2, fn 1, fp 0
    assert m["ppv"][2] == 1.0 and m["sensitivity"][2] == pytest.approx(2 / 3)


def test_class_without_positives_is_nan_not_zero():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    m = compute_metrics(y, probs)
    assert math.isnan(m["per_class"]["sensitivity"][2]) and math.isnan(m["per_class"]["auroc"][2])
    assert m["per_class"]["ppv"][2] == 0.0  # one image wrongly called class 2
    assert m["per_class"]["auroc"][0] == 1.0
    assert m["macro"]["sensitivity"] == pytest.approx((1.0 + 0.5) / 2)  # nan skipped
    assert m["accuracy"] == 0.75 and m["support"] == [2, 2, 0]


def _sample(n, rng):
    y = rng.integers(0, 2, n)
    score = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.25, n), 0.01, 0.99)
    return y, np.stack([1 - score, score], 1)


def test_bootstrap_contains_estimate_and_narrows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 600):
        y, p = _sample(n, rng)
        point = compute_metrics(y, p)
        ci = bootstrap_ci(y, p, n_boot=300, seed=1)
        lo, hi = ci["accuracy"]
        assert lo <= point["accuracy"] <= hi
        lo2, hi2 = ci["auroc/1"]
        assert lo2 <= point["per_class"]["auroc"][1] <= hi2
        widths.append(hi - lo)
    assert widths[1] < widths[0] * 0.6


def test_group_bootstrap_is_wider_for_clustered_data():
    rng = np.random.default_rng(2)
    y_g, p_g = _sample(40, rng)
    y = np.repeat(y_g, 10)  # each "patient" has 10 identical images
    p = np.repeat(p_g, 10, axis=0)
    groups = np.repeat(np.arange(40), 10)
    img = bootstrap_ci(y, p, n_boot=300)["accuracy"]
    grp = bootstrap_ci(y, p, groups, n_boot=300)["accuracy"]
    assert (grp[1] - grp[0]) > 1.8 * (img[1] - img[0])


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) < conf  # right exactly as often as it claims
    y = np.where(correct, 1, 0)
    probs = np.stack([1 - conf, conf], 1)
    ece, table = expected_calibration_error(y, probs)
    assert ece < 0.02 and sum(table["count"]) == n
    over = np.stack([np.full(n, 0.01), np.full(n, 0.99)], 1)  # 99% sure, right about 75%
    ece_over, _ = expected_calibration_error(y, over)
    assert ece_over > 0.2
