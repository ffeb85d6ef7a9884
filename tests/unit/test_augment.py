"""Augmentation ops, the WordNet reader and the variant draw: deterministic, one op each."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import AugmentConfig
from core.errors import ConfigError, EnvironmentProblem
from jobs.augment import (
    KEYBOARD,
    keyboard_typo,
    random_delete,
    random_insert,
    random_swap,
    synonym_replace,
    variants_of,
)
from querylog.neardup import edit_distance
from querylog.wordnet import load_synonyms, parse_wordnet_data
from tests.conftest import WORDNET, config_for

SYN = {"cheap": ("inexpensive",), "car": ("auto", "automobile"), "flight": ("flying",)}


def test_wordnet_format_is_parsed_with_markers_and_multiword_lemmas():
    lines = [
        "  1 licence header line  ",
        "02958343 06 n 05 car 0 auto 0 automobile 0 machine 1 motorcar 0 076 @ 03791235 n 0000",
        "00020103 00 s 02 outback(a) 0 remote 0 003 & 00019874 a 0000",
        "00000001 00 n 0c a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j 0 k 0 Cable_Car 0 000",
        "00000002 00 n 01 alone 0 000",
    ]
    synsets = parse_wordnet_data(iter(lines))
    assert synsets[0] == ["car", "auto", "automobile", "machine", "motorcar"]
    assert synsets[1] == ["outback", "remote"]
    assert synsets[2][-1] == "cable car"  # count 0c is hex: twelve lemmas
    assert len(synsets) == 3  # a one-lemma synset gives no synonyms


def test_synonym_table_from_the_wordnet_files():
    table = load_synonyms(str(WORDNET))
    assert table["car"] == ("auto", "automobile", "machine", "motorcar")
    assert "car" in table["auto"]
    assert table["cheap"] == ("inexpensive",)
    assert "cable car" not in table  # multi-word lemmas are synonyms, never keys


def test_missing_wordnet_names_the_package(tmp_path):
    with pytest.raises(EnvironmentProblem, match="wordnet-base.*augment.enabled=false"):
        load_synonyms(str(tmp_path / "nowhere"))


def test_each_op_changes_what_it_says():
    rng = np.random.default_rng(0)
    words = ["cheap", "car", "rental", "paris"]
    replaced = synonym_replace(words, rng, SYN, 0.1)
    assert len(replaced) == 4 and sum(a != b for a, b in zip(words, replaced, strict=True)) == 1
    changed = next(b for a, b in zip(words, replaced, strict=True) if a != b)
    assert changed in SYN["cheap"] + SYN["car"]
    inserted = random_insert(words, rng, SYN, 0.1)
    assert len(inserted) == 5 and set(inserted) - set(words) <= set(sum(SYN.values(), ()))
    swapped = random_swap(words, rng, SYN, 0.1)
    assert sorted(swapped) == sorted(words) and swapped != words
    deleted = random_delete(words, rng, SYN, 0.1)
    assert 1 <= len(deleted) < 4 and set(deleted) <= set(words)
    typo = " ".join(keyboard_typo(words, rng, SYN, 0.1))
    assert edit_distance(typo, " ".join(words), 2) == 1
    i = next(i for i, (a, b) in enumerate(zip(typo, " ".join(words), strict=True)) if a != b)
    assert typo[i] in KEYBOARD[" ".join(words)[i]]


def test_ops_that_cannot_apply_say_so():
    rng = np.random.default_rng(0)
    assert synonym_replace(["zzqx"], rng, SYN, 0.1) is None
    assert random_insert(["zzqx"], rng, SYN, 0.1) is None
    assert random_swap(["one"], rng, SYN, 0.1) is None
    assert random_swap(["same", "same"], rng, SYN, 0.1) is None
    assert random_delete(["one"], rng, SYN, 0.1) is None
    assert keyboard_typo(["12", "$$$"], rng, SYN, 0.1) is None


def test_variants_are_deterministic_per_seed_and_use_only_the_given_ops():
    cfg = AugmentConfig(variants=4, seed=3)
    first = variants_of("cheap car rental", cfg, SYN)
    assert first == variants_of("cheap car rental", cfg, SYN)
    assert len(first) == 4 and all(v != "cheap car rental" for v, _ in first)
    other = variants_of("cheap car rental", AugmentConfig(variants=4, seed=4), SYN)
    assert other != first
    only_swap = variants_of("cheap car", AugmentConfig(variants=2, ops=("swap",)), SYN)
    assert only_swap == [("car cheap", "swap")] * 2
    assert variants_of("x", AugmentConfig(ops=("swap", "delete")), SYN) == []


def test_augment_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="augment.ops"):
        config_for(tmp_path, "augment.enabled=true", "augment.ops=[]")
    with pytest.raises(ConfigError, match="not allowed"):
        config_for(tmp_path, "augment.ops=[shout]")
    assert config_for(tmp_path, "augment.enabled=false", "augment.ops=[]").augment.ops == ()
