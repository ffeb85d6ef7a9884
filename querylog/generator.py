"""The generator: a Zipf query log with known ground truth, of made-up queries
(``generate.source: synthetic``) or of WordNet's real glosses (``wordnet``).

The universe of distinct queries (text, label distribution, popularity) is small and built on
the driver from the seed; the events are drawn in Spark from ``spark.range`` with a
counter-based hash of (seed, event id), so the log is the same for a seed whatever the
partitioning. The truth lands in ``_truth/`` beside the events (readers skip ``_`` paths): per
distinct query its label distribution, majority label, popularity and Bayes error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import GenerateConfig
from core.layout import TRUTH_DIR, RunContext, StageResult
from querylog.wordnet import LEXNAMES, read_synsets

CATEGORIES = (
    "travel", "sports", "finance", "health", "music", "movies", "food", "weather", "shopping",
    "jobs", "autos", "games", "news", "science", "pets", "garden", "fashion", "education",
    "realestate", "books", "software", "beauty", "legal", "parenting",
)  # fmt: skip
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "gr", "pl", "sh", "st", "tr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "oo", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "t", "m", "ck", "nd")
LONG_QUERY_CHARS = 1500
HELD_OUT_DIR = "_test"
"""``source: wordnet``: the held-out test glosses beside the events (readers skip ``_`` paths)."""
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class Universe:
    """The generator's truth: distinct queries, their label distributions and popularity."""

    labels: list[str]
    texts: np.ndarray  # object array of normalized query strings
    probs: np.ndarray  # [num_queries, num_labels] label distribution per query
    popularity: np.ndarray  # [num_queries] probability of each query per event
    group: np.ndarray  # [num_queries] index of the base query a planted near-duplicate copies

    def truth_frame(self) -> pd.DataFrame:
        majority = self.probs.argmax(axis=1)
        return pd.DataFrame(
            {
                "query": self.texts,
                "label_probs": list(self.probs.astype(np.float64)),
                "majority_label": np.asarray(self.labels, dtype=object)[majority],
                "popularity": self.popularity,
                "bayes_error": 1.0 - self.probs.max(axis=1),
                "group": self.group,
            }
        )


def _words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        syllables = rng.integers(2, 4)
        word = (
            "".join(
                _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                for _ in range(syllables)
            )
            + _CODAS[rng.integers(len(_CODAS))]
        )
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def label_names(num_labels: int) -> list[str]:
    """The generator's labels, in the order of the truth's ``label_probs``."""
    if num_labels <= len(CATEGORIES):
        return list(CATEGORIES[:num_labels])
    return [f"label_{i:03d}" for i in range(num_labels)]


def build_universe(cfg: GenerateConfig) -> Universe:
    """The universe of ``cfg.source``: made-up queries or WordNet's glosses (driver-side)."""
    if cfg.source == "wordnet":
        return wordnet_universe(cfg)[0]
    return synthetic_universe(cfg)


def synthetic_universe(cfg: GenerateConfig) -> Universe:
    """Distinct queries whose words carry their label, with Zipf popularity (driver-side, small)."""
    rng = np.random.default_rng(cfg.seed)
    num_labels = cfg.num_labels
    labels = label_names(num_labels)
    per_label = cfg.words_per_label or max(40, int(np.sqrt(cfg.num_queries / num_labels) * 3))
    taken: set[str] = set()
    topical = [_words(rng, per_label, taken) for _ in range(num_labels)]
    modifiers = _words(rng, 60, taken)
    # Mildly skewed class prior, so the majority-class baseline is a real baseline.
    prior = 1.0 / np.sqrt(np.arange(1, num_labels + 1))
    prior /= prior.sum()
    num_variants = int(round(cfg.num_queries * cfg.near_dup_rate / (1 + cfg.near_dup_rate)))
    num_base = cfg.num_queries - num_variants
    texts: list[str] = []
    seen: set[str] = set()  # word multisets: "a b" and "b a" are one query unless planted
    probs = np.zeros((num_base, num_labels))
    while len(texts) < num_base:
        primary = int(rng.choice(num_labels, p=prior))
        words = [topical[primary][rng.integers(per_label)] for _ in range(rng.integers(1, 3))]
        row = np.full(num_labels, cfg.label_noise / (num_labels - 1))
        row[primary] = 1.0 - cfg.label_noise
        if rng.random() < cfg.ambiguous_fraction:
            other = int((primary + rng.integers(1, num_labels)) % num_labels)
            words.append(topical[other][rng.integers(per_label)])
            share = rng.uniform(0.5, 0.8)
            row = np.zeros(num_labels)
            row[primary], row[other] = share, 1.0 - share
        words += [modifiers[rng.integers(len(modifiers))] for _ in range(rng.integers(0, 3))]
        rng.shuffle(words)
        key = " ".join(sorted(words))
        if key in seen:
            continue
        seen.add(key)
        probs[len(texts)] = row
        texts.append(" ".join(words))
    return _with_variants_and_traffic(labels, texts, probs, num_variants, cfg, rng)


def _with_variants_and_traffic(
    labels: list[str], texts: list[str], probs: np.ndarray, num_variants: int,
    cfg: GenerateConfig, rng: np.random.Generator,
) -> Universe:  # fmt: skip
    """``texts`` plus ``num_variants`` planted near-duplicates of them (each with its base's
    label distribution), and Zipf popularity over a random order of all of them."""
    num_base = len(texts)
    texts = list(texts)
    probs = np.vstack([probs, np.zeros((num_variants, len(labels)))])
    group = list(range(num_base))
    taken_texts = set(texts)
    while len(texts) < num_base + num_variants:
        base = int(rng.integers(num_base))
        variant = near_duplicate(texts[base], rng)
        if variant is None or variant in taken_texts:
            continue
        taken_texts.add(variant)
        probs[len(texts)] = probs[base]
        texts.append(variant)
        group.append(base)
    ranks = rng.permutation(len(texts)) + 1
    popularity = ranks.astype(np.float64) ** -cfg.zipf_exponent
    popularity /= popularity.sum()
    return Universe(labels, np.asarray(texts, dtype=object), probs, popularity, np.asarray(group))


@functools.lru_cache(maxsize=2)
def wordnet_glosses(wordnet_dir: str) -> tuple[list[str], list[str], np.ndarray]:
    """WordNet's distinct definitions (spaces collapsed), in sorted order, with the labels that
    occur and each definition's label distribution (a definition shared by synsets of several
    lexicographer files is ambiguous: its Bayes error is above zero)."""
    counts: dict[str, dict[str, int]] = {}
    for synset in read_synsets(wordnet_dir):
        text = " ".join(synset.definition.split())
        if text:
            by_label = counts.setdefault(text, {})
            by_label[synset.lexname] = by_label.get(synset.lexname, 0) + 1
    present = {name for by_label in counts.values() for name in by_label}
    labels = [name for name in LEXNAMES if name in present] + sorted(present - set(LEXNAMES))
    column = {name: j for j, name in enumerate(labels)}
    texts = sorted(counts)
    probs = np.zeros((len(texts), len(labels)))
    for i, text in enumerate(texts):
        for name, n in counts[text].items():
            probs[i, column[name]] = n
    probs /= probs.sum(axis=1, keepdims=True)
    return labels, texts, probs


def wordnet_universe(cfg: GenerateConfig) -> tuple[Universe, pd.DataFrame]:
    """The real-text case: a seeded sample of WordNet's glosses as the distinct queries, labeled
    by lexicographer file, with planted near-duplicates and Zipf traffic; and the held-out test
    glosses (``query``, ``label``: the majority label), which neither the log nor a planted
    variant contains."""
    labels, texts, probs = wordnet_glosses(cfg.wordnet_dir)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(texts))
    held = min(int(round(cfg.num_queries * cfg.test_fraction)), len(texts) // 2)
    num_variants = int(round(cfg.num_queries * cfg.near_dup_rate / (1 + cfg.near_dup_rate)))
    num_base = min(cfg.num_queries - num_variants, len(texts) - held)
    num_variants = min(num_variants, int(round(num_base * cfg.near_dup_rate)))
    test, base = order[:held], order[held : held + num_base]
    universe = _with_variants_and_traffic(
        labels, [texts[i] for i in base], probs[base], num_variants, cfg, rng
    )
    held_out = {texts[i] for i in test}
    keep = [i for i, t in enumerate(universe.texts) if t not in held_out]  # a variant may equal one
    if len(keep) < len(universe.texts):
        universe = Universe(labels, universe.texts[keep], universe.probs[keep],
                            universe.popularity[keep] / universe.popularity[keep].sum(),
                            universe.group[keep])  # fmt: skip
    names = np.asarray(labels, dtype=object)
    test_frame = pd.DataFrame(
        {"query": [texts[i] for i in test], "label": names[probs[test].argmax(axis=1)]}
    )
    return universe, test_frame


def near_duplicate(text: str, rng: np.random.Generator) -> str | None:
    """A planted near-duplicate of ``text``: a typo, another word order, or punctuation."""
    words = text.split(" ")
    op = int(rng.integers(3))
    if op == 0:  # typo: two neighbouring letters of a long enough word swapped
        long_words = [i for i, w in enumerate(words) if len(w) >= 4]
        if not long_words:
            return None
        i = long_words[int(rng.integers(len(long_words)))]
        w = words[i]
        j = int(rng.integers(1, len(w) - 2))
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif op == 1:  # word order
        if len(words) < 2:
            return None
        words = words[1:] + words[:1]
    else:  # punctuation
        if len(words) >= 2 and rng.random() < 0.5:
            i = int(rng.integers(len(words) - 1))
            return (
                " ".join(words[:i])
                + (" " if i else "")
                + "-".join(words[i : i + 2])
                + (" " + " ".join(words[i + 2 :]) if words[i + 2 :] else "")
            )
        return text + ("?" if rng.random() < 0.5 else "!")
    variant = " ".join(words)
    return variant if variant != text else None


def _uniforms(ids: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (seed, stream, event id)."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64((seed * 0x632BE59BD9B4E019 + stream * 0x85157AF5) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _MASK64
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _MASK64
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def draw_events(ids: np.ndarray, universe: Universe, cfg: GenerateConfig) -> pd.DataFrame:
    """The events with ids ``ids``: a pure function of (seed, id), hence partition-independent."""
    cdf = np.cumsum(universe.popularity)
    q = np.minimum(np.searchsorted(cdf, _uniforms(ids, cfg.seed, 1), side="right"), len(cdf) - 1)
    cum = np.cumsum(universe.probs[q], axis=1)
    label_idx = np.minimum(
        (_uniforms(ids, cfg.seed, 2)[:, None] >= cum).sum(axis=1), len(universe.labels) - 1
    )
    labels = np.asarray(universe.labels, dtype=object)[label_idx]
    labels[_uniforms(ids, cfg.seed, 3) < cfg.unlabeled_fraction] = ""
    queries = universe.texts[q].copy()
    dirty = np.flatnonzero(_uniforms(ids, cfg.seed, 4) < cfg.dirty_fraction)
    kind = _uniforms(ids[dirty], cfg.seed, 5)
    for i, k in zip(dirty, kind, strict=True):
        if k < 0.25:
            queries[i] = "   " if k < 0.125 else ""  # blank / empty: quarantined
        elif k < 0.4:
            queries[i] = (queries[i] + " ") * (LONG_QUERY_CHARS // max(len(queries[i]), 1) + 1)
        else:  # same query, messy surface form: merged by normalization
            queries[i] = "  " + queries[i].upper().replace(" ", " \t ") + " "
    start = np.datetime64("2026-11-01T00:00:00")
    seconds = (ids * 7 * 86400 // max(cfg.num_events, 1)).astype("timedelta64[s]")
    ts = np.datetime_as_string(start + seconds, unit="s")
    return pd.DataFrame({"query": queries, "label": labels, "ts": np.char.add(ts.astype(str), "Z")})


def generate_log(spark, cfg: GenerateConfig, out: Path) -> StageResult:  # noqa: ANN001
    """Write the events (``cfg.format``, ``cfg.num_files`` files) and the truth under ``out``;
    for ``source: wordnet`` also the held-out test glosses, ``_test/test.csv``."""
    held_out = None
    if cfg.source == "wordnet":
        universe, held_out = wordnet_universe(cfg)
        (out / HELD_OUT_DIR).mkdir(parents=True, exist_ok=True)
        held_out.to_csv(out / HELD_OUT_DIR / "test.csv", index=False)
    else:
        universe = synthetic_universe(cfg)
    truth = out / TRUTH_DIR
    truth.mkdir(parents=True, exist_ok=True)
    universe.truth_frame().to_parquet(truth / "queries.parquet", index=False)
    (truth / "generate.json").write_text(
        json.dumps({"labels": universe.labels, "config": cfg.__dict__}, indent=2)
    )
    shared = spark.sparkContext.broadcast(universe)

    def draw(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield draw_events(batch["id"].to_numpy(), shared.value, cfg)

    events = spark.range(0, cfg.num_events, numPartitions=cfg.num_files).mapInPandas(
        draw, "query string, label string, ts string"
    )
    events_dir = out / "events.tmp"
    writer = events.write.mode("overwrite")
    if cfg.format == "csv":
        writer.option("header", True).option("escape", '"').csv(str(events_dir))
    elif cfg.format == "jsonl":
        writer.json(str(events_dir))
    else:
        writer.parquet(str(events_dir))
    ext = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}[cfg.format]
    parts = sorted(p for p in events_dir.iterdir() if p.name.startswith("part-"))
    for i, part in enumerate(parts):
        part.rename(out / f"events-{i:05d}{ext}")
    for leftover in events_dir.iterdir():
        leftover.unlink()
    events_dir.rmdir()
    shared.unpersist()
    return StageResult(
        rows_in=cfg.num_events,
        rows_out=cfg.num_events,
        metrics={"num_queries": len(universe.texts), "num_labels": len(universe.labels)}
        | ({"held_out_queries": len(held_out)} if held_out is not None else {}),
        params={
            "events": cfg.num_events,
            "seed": cfg.seed,
            "zipf_exponent": cfg.zipf_exponent,
            "source": cfg.source,
        },  # fmt: skip
    )


def truth_path(ctx: RunContext) -> Path | None:
    """The generator's truth for this run's data, when the data came from ``generate``."""
    raw = ctx.cfg.data.raw_path
    base = ctx.stage_dir("generate") if not raw else Path(raw)
    path = base / TRUTH_DIR / "queries.parquet"
    return path if path.exists() else None
