import subprocess
import sys

import numpy as np
import pytest

from trainers.featurizer import Featurizer, normalize_query


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Cheap   FLIGHTS\tto Paris ", "cheap flights to paris"),
        ("ＦＵＬＬ　ＷＩＤＴＨ", "full width"),  # NFKC folds full-width forms
        ("Straße", "strasse"),  # case folding, not just lower()
        ("zero\u200bwidth\x00and\x1fcontrols", "zero width and controls"),
        ("line\nbreak\r\nand\u2028sep", "line break and sep"),
        ("   ", ""),
        (None, None),
    ],
)
def test_normalize_query(raw, expected):
    assert normalize_query(raw) == expected


def test_normalization_is_idempotent():
    for text in ["ＡＢＣ  Déjà\tvu", "İstanbul", "ﬁne ﬂour"]:
        once = normalize_query(text)
        assert normalize_query(once) == once


def test_ids_are_word_ngrams_in_range():
    f = Featurizer(num_buckets=1000, word_ngrams=2)
    ids = f.ids("cheap flights paris")
    assert ids.dtype == np.int32
    assert len(ids) == 3 + 2  # unigrams + bigrams
    assert ((ids >= 0) & (ids < 1000)).all()
    assert len(Featurizer(num_buckets=1000, word_ngrams=1).ids("cheap flights paris")) == 3


def test_char_ngrams_add_subword_ids():
    words_only = Featurizer(num_buckets=1 << 16, word_ngrams=1)
    with_chars = Featurizer(num_buckets=1 << 16, word_ngrams=1, char_ngram_min=3, char_ngram_max=4)
    assert len(with_chars.ids("cat")) == 1 + 3 + 2  # "<cat>": 3 trigrams, 2 four-grams
    assert len(words_only.ids("cat")) == 1
    # a typo shares character n-grams with the word, so it is not a stranger to the model
    shared = set(with_chars.ids("flights")) & set(with_chars.ids("fligths"))
    assert len(shared) >= 3


def test_ids_are_stable_across_processes():
    """Python's own hash() is salted per process; the featurizer must not be."""
    code = (
        "from trainers.featurizer import Featurizer; print(list(Featurizer(4096, 2).ids('a b c')))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout  # fmt: skip
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(list(Featurizer(4096, 2).ids("a b c")))


def test_raw_text_and_normalized_text_give_the_same_ids():
    f = Featurizer(num_buckets=1 << 18, word_ngrams=2)
    assert np.array_equal(f.ids_raw("  Cheap FLIGHTS "), f.ids("cheap flights"))


def test_settings_round_trip_and_version_check():
    f = Featurizer(num_buckets=512, word_ngrams=3, char_ngram_min=2, char_ngram_max=5)
    assert Featurizer.from_settings(f.settings()) == f
    other = {**f.settings(), "version": 999}
    with pytest.raises(ValueError, match="another featurizer version"):
        Featurizer.from_settings(other)


def test_bags_offsets():
    f = Featurizer(num_buckets=64, word_ngrams=1)
    flat, offsets = f.bags(
        [np.array([1, 2], np.int32), np.array([], np.int32), np.array([3], np.int32)]
    )
    assert flat.tolist() == [1, 2, 3]
    assert offsets.tolist() == [0, 2, 2]
