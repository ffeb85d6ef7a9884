import numpy as np
import pytest

from core.config import GenerateConfig
from querylog.generator import build_universe, draw_events

CFG = GenerateConfig(num_events=20_000, num_queries=500, num_labels=6, zipf_exponent=1.1,
                     unlabeled_fraction=0.2, ambiguous_fraction=0.25, label_noise=0.05,
                     dirty_fraction=0.01, seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def universe():
    return build_universe(CFG)


def test_truth_is_a_distribution_per_distinct_query(universe):
    assert len(universe.texts) == CFG.num_queries == len(set(universe.texts))
    assert np.allclose(universe.probs.sum(axis=1), 1.0)
    assert np.isclose(universe.popularity.sum(), 1.0)
    truth = universe.truth_frame()
    assert np.allclose(truth["bayes_error"], 1 - universe.probs.max(axis=1))
    assert set(truth["majority_label"]) <= set(universe.labels)
    # ambiguous queries exist and have a Bayes error far above the noise floor
    assert (truth["bayes_error"] > 0.15).mean() == pytest.approx(CFG.ambiguous_fraction, abs=0.07)
    assert truth["bayes_error"].min() == pytest.approx(CFG.label_noise)


def test_popularity_is_zipf(universe):
    p = np.sort(universe.popularity)[::-1]
    ranks = np.arange(1, len(p) + 1)
    slope = np.polyfit(np.log(ranks), np.log(p), 1)[0]
    assert slope == pytest.approx(-CFG.zipf_exponent, abs=1e-6)


def test_universe_is_deterministic_per_seed():
    again = build_universe(CFG)
    assert list(again.texts) == list(build_universe(CFG).texts)
    other = build_universe(GenerateConfig(**{**CFG.__dict__, "seed": 4}))
    assert list(other.texts) != list(again.texts)


def test_events_do_not_depend_on_partitioning(universe):
    ids = np.arange(CFG.num_events)
    whole = draw_events(ids, universe, CFG)
    parts = [draw_events(chunk, universe, CFG) for chunk in np.array_split(ids, 7)]
    import pandas as pd

    assert whole.equals(pd.concat(parts, ignore_index=True))


def test_events_follow_the_truth(universe):
    events = draw_events(np.arange(CFG.num_events), universe, CFG)
    assert (events["label"] == "").mean() == pytest.approx(CFG.unlabeled_fraction, abs=0.02)
    index = {q: i for i, q in enumerate(universe.texts)}
    clean = events[events["query"].isin(index) & (events["label"] != "")]
    # the most popular query's labels follow its distribution
    top = int(np.argmax(universe.popularity))
    mine = clean[clean["query"] == universe.texts[top]]["label"]
    expected = universe.probs[top][universe.labels.index(mine.mode()[0])]
    assert (mine == mine.mode()[0]).mean() == pytest.approx(expected, abs=0.05)
    # dirty rows: blank ones and over-long ones are planted
    assert (events["query"].str.strip() == "").sum() > 0
    assert (events["query"].str.len() > 1024).sum() > 0


def test_vocabulary_size_is_a_knob():
    small = build_universe(GenerateConfig(num_queries=2000, words_per_label=40, seed=3))
    large = build_universe(GenerateConfig(num_queries=2000, words_per_label=400, seed=3))
    vocab = lambda u: len({w for t in u.texts for w in t.split()})  # noqa: E731
    assert vocab(large) > 2 * vocab(small)


def test_wordnet_case_is_real_glosses_labeled_by_lexicographer_file_with_a_held_out_test():
    from querylog.generator import wordnet_universe
    from querylog.wordnet import read_synsets
    from tests.conftest import WORDNET

    cfg = GenerateConfig(source="wordnet", wordnet_dir=str(WORDNET), num_queries=300,
                         test_fraction=0.2, near_dup_rate=0.1, seed=5)  # fmt: skip
    universe, test = wordnet_universe(cfg)
    synsets = list(read_synsets(str(WORDNET)))
    label_of = {" ".join(s.definition.split()): s.lexname for s in synsets}
    base = universe.group == np.arange(len(universe.group))
    # the log's base queries are glosses, each labeled by its own synset's file
    for text, probs in zip(universe.texts[base], universe.probs[base], strict=True):
        assert universe.labels[int(probs.argmax())] == label_of[text]
    assert {"noun.artifact", "verb.motion"} <= set(universe.labels) <= set(label_of.values())
    # planted variants copy a base gloss's labels; none is a held-out gloss
    variants = np.flatnonzero(~base)
    assert len(variants) > 0
    assert all((universe.probs[i] == universe.probs[universe.group[i]]).all() for i in variants)
    assert len(test) == 60 and not set(test["query"]) & set(universe.texts)
    assert all(label_of[q] == label for q, label in zip(test["query"], test["label"], strict=True))
    assert np.isclose(universe.popularity.sum(), 1.0)
    # deterministic per seed; another seed holds out other glosses
    assert wordnet_universe(cfg)[1].equals(test)
    other = wordnet_universe(GenerateConfig(**{**cfg.__dict__, "seed": 6}))[1]
    assert set(other["query"]) != set(test["query"])
    # events are drawn from it as from the synthetic universe, mess included
    events = draw_events(np.arange(5000), universe, cfg)
    assert set(events["label"]) - {""} <= set(universe.labels)


def test_the_wordnet_case_without_wordnet_names_the_package(tmp_path):
    from core.errors import EnvironmentProblem

    cfg = GenerateConfig(source="wordnet", wordnet_dir=str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="wordnet-base.*generate.wordnet_dir"):
        build_universe(cfg)
