import numpy as np
import pandas as pd
import pytest

from core.config import GenerateConfig
from querylog.generator import build_universe, near_duplicate
from querylog.neardup import band_keys, edit_distance, is_near_duplicate, pair_scores, shingles


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("flights", "flihgts", 1),  # neighbours swapped: one typo, not two
        ("cheap flights", "cheap-flights", 1),
        ("paris", "paris?", 1),
        ("paris", "parts", 1),
        ("cipel fooben", "copet fooben", 2),
        ("kitten", "sitting", 2),  # capped at cap + 1
    ],
)
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b, cap=1) == distance


def test_numbers_are_not_typos():
    assert is_near_duplicate("cheap flihgts", "cheap flights", 1)
    assert is_near_duplicate("flights cheap", "cheap flights", 1)
    assert not is_near_duplicate("cheap flights", "cheap fights now", 1)
    assert not is_near_duplicate("iphone 12", "iphone 13", 1)
    assert not is_near_duplicate("query number 1", "query number 10", 1)


def test_band_keys_see_word_order_and_typos_as_close():
    base = band_keys("zorbak plin trasp", 12, 3)
    assert len(base) == 12 and base.dtype == np.int64
    assert (band_keys("plin trasp zorbak", 12, 3) == base).all()  # word order: same shingles
    assert (band_keys("zorbka plin trasp", 12, 3) == base).sum() >= 3  # a typo: bands still meet
    assert (band_keys("gamma delta", 12, 3) == base).sum() == 0
    assert len(shingles("ab")) == 2 and len(band_keys("", 12, 3)) == 0


def test_planted_near_duplicates_and_their_truth():
    cfg = GenerateConfig(num_queries=3000, near_dup_rate=0.1, seed=5)
    u = build_universe(cfg)
    variants = np.flatnonzero(u.group != np.arange(len(u.group)))
    assert len(variants) == round(3000 * 0.1 / 1.1)
    for i in variants:
        base = u.texts[u.group[i]]
        assert u.texts[i] != base
        same_words = sorted(u.texts[i].split()) == sorted(base.split())
        assert same_words or edit_distance(u.texts[i], base, 1) <= 1
        assert np.array_equal(u.probs[i], u.probs[u.group[i]])  # a variant means the same
    # without planting, no two queries are the same words in another order
    keys = [" ".join(sorted(t.split())) for t in u.texts[u.group == np.arange(len(u.group))]]
    assert len(keys) == len(set(keys))


def test_near_duplicate_ops():
    rng = np.random.default_rng(0)
    seen = {near_duplicate("alpha beta gamma", rng) for _ in range(50)}
    assert "beta gamma alpha" in seen
    assert any(v and ("-" in v or v.endswith(("?", "!"))) for v in seen)
    assert any(v and sorted(v.split()) != sorted("alpha beta gamma".split()) and "-" not in v
               and not v.endswith(("?", "!")) for v in seen)  # fmt: skip


def test_pair_scores():
    truth = pd.Series({"a": 1, "a2": 1, "b": 2, "c": 3, "c2": 3})
    predicted = pd.Series({"a": 10, "a2": 10, "b": 20, "c": 30, "c2": 31})
    assert pair_scores(predicted, truth) == (1.0, 0.5)
    predicted = pd.Series({"a": 10, "a2": 10, "b": 10, "c": 30, "c2": 30})
    precision, recall = pair_scores(predicted, truth)
    assert precision == pytest.approx(2 / 4) and recall == 1.0
