import numpy as np
import pandas as pd
import pytest

from jobs.split import bucket_thresholds
from trainers.evaluate import TestSet, evaluate, expected_errors


def test_bucket_thresholds_split_traffic_50_40_10():
    # one query of 50 events, two of 20, ten of 1: total 100
    head_min, torso_min = bucket_thresholds([(50, 1), (20, 2), (1, 10)], 0.5, 0.4)
    assert (head_min, torso_min) == (50, 20)


def test_bucket_thresholds_keep_equal_counts_together():
    head_min, torso_min = bucket_thresholds([(1, 100)], 0.5, 0.4)
    assert head_min == 1  # all queries tie: all head, no straddling
    assert torso_min == 1


def _test_set():
    frame = pd.DataFrame(
        {
            "query": ["a", "b", "c", "d"],
            "label_counts": [{"x": 9, "y": 1}, {"y": 4}, {"x": 1, "y": 1}, {"z": 2}],
            "weight": [10.0, 4.0, 2.0, 2.0],
            "bucket": ["head", "torso", "tail", "tail"],
        }
    )
    return TestSet.from_frame(frame, ["x", "y"])


def test_label_only_in_test_is_kept_and_never_predictable():
    test = _test_set()
    assert test.labels == ["x", "y", "z"]
    assert test.counts[3].tolist() == [0, 0, 2]


def test_errors_distinct_weighted_buckets_and_breadth():
    test = _test_set()
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])  # predicts x, y, x, x
    m = evaluate(test, probs, breadth_recall=0.8, prior_label=1,
                 truth_labels=["x", "y", "y", "z"])  # fmt: skip
    per_query = [0.1, 0.0, 0.5, 1.0]
    assert m["test_error"] == pytest.approx(np.mean(per_query))
    assert m["test_error_weighted"] == pytest.approx((10 * 0.1 + 0 + 2 * 0.5 + 2 * 1.0) / 18)
    assert m["acc_head"] == pytest.approx(0.9)
    assert m["acc_torso"] == pytest.approx(1.0)
    assert m["acc_tail"] == pytest.approx(1 - (0.5 + 1.0) / 2)
    # recall: x 10/10, y 4/6, z 0/2 → only x reaches 0.8
    assert m["breadth"] == pytest.approx(1 / 3)
    assert m["baseline_error"] == pytest.approx(np.mean([0.9, 0.0, 0.5, 1.0]))
    assert m["bayes_error"] == pytest.approx(np.mean([0.1, 0.0, 0.5, 0.0]))
    assert m["test_logloss"] > 0


def test_perfect_model_has_zero_error_and_full_breadth():
    frame = pd.DataFrame({"query": ["a", "b"], "label_counts": [{"x": 3}, {"y": 1}],
                          "weight": [3.0, 1.0], "bucket": ["head", "tail"]})  # fmt: skip
    m = evaluate(
        TestSet.from_frame(frame, ["x", "y"]),
        np.array([[1.0, 0.0], [0.0, 1.0]]),
        breadth_recall=0.8,
    )
    assert m["test_error"] == 0 and m["test_error_weighted"] == 0 and m["breadth"] == 1
    assert "bayes_error" not in m


def test_expected_errors():
    counts = np.array([[3.0, 1.0], [0.0, 2.0]])
    assert expected_errors(counts, np.array([0, 0])).tolist() == [0.25, 1.0]


def test_confusions_rank_label_pairs_by_mislabeled_events():
    from trainers.evaluate import confusions

    test = _test_set()
    predicted = np.array([0, 0, 1, 0])  # b (4×y) → x, c (1×x) → y, d (2×z) → x, a (1×y) → x
    pairs = confusions(test, predicted, top=3)
    assert [(p["true"], p["predicted"], p["events"]) for p in pairs] == [
        ("y", "x", 5.0), ("z", "x", 2.0), ("x", "y", 1.0)
    ]  # fmt: skip
    assert pairs[0]["share"] == pytest.approx(5 / 18)  # of all 18 labeled test events


def test_bootstrap_intervals_bracket_the_estimate_and_narrow_with_more_queries():
    from trainers.evaluate import bootstrap_intervals

    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1600):
        err = (rng.random(n) < 0.2).astype(float)
        ci = bootstrap_intervals({"test_error": err}, np.ones(n), rounds=400, seed=0)
        assert ci["test_error_ci_low"] <= err.mean() <= ci["test_error_ci_high"]
        widths.append(ci["test_error_ci_high"] - ci["test_error_ci_low"])
    assert widths[1] < widths[0] / 2.5  # about 1/√16 = 1/4 as wide
    assert bootstrap_intervals({"test_error": np.ones(1)}, np.ones(1), 100, 0) == {}
    heavy = bootstrap_intervals({"test_error_weighted": np.array([0.0, 1.0])},
                                np.array([1.0, 0.0]), 50, 0)  # fmt: skip
    assert heavy["test_error_weighted_ci_high"] == 0.0  # the weightless query never counts
