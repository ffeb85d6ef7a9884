"""Near-duplicates: MinHash LSH over word-internal character 3-grams proposes candidate pairs
(buckets above ``dedupe.max_bucket`` are skipped, so head queries cannot blow up
quadratically), an edit-distance or same-words check verifies them, and connected components
over the verified pairs make the clusters. Used by dedupe (the log) and split (an external test
file against the log)."""

from __future__ import annotations

import functools
import re
import zlib

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import DedupeConfig


def heaviest(value: str, weight: str) -> Column:
    """Aggregate: the value with the largest weight (a majority label, a cluster's most frequent
    query); ties go by a hash of the value, so every rerun picks the same one. Null values never
    win."""
    return F.max_by(
        F.col(value),
        F.when(F.col(value).isNotNull(), F.struct(F.col(weight), F.negative(F.hash(value)))),
    )


def assign_clusters(distinct: DataFrame) -> DataFrame:
    """A stable ``cluster_id`` per row: the hash of its query (exact clusters)."""
    return distinct.withColumn("cluster_id", F.xxhash64("query"))


_PRIME = np.uint64(4294967311)  # > 2^32, so hash values stay distinct modulo it


def shingles(query: str) -> np.ndarray:
    """CRC-32s of the character 3-grams inside each word (``<word>`` padded): word order does
    not change them, a typo changes a few."""
    grams = {f"<{w}>"[i : i + 3] for w in query.split(" ") if w for i in range(len(w))}
    return np.fromiter(
        (zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams)
    )


@functools.cache
def _minhash_params(k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``a·x + b mod p`` coefficients of ``k`` hash functions: drawn once, not per query."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, size=k, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, size=k, dtype=np.uint64)
    return a, b


def band_keys(query: str, num_bands: int, band_rows: int, seed: int = 1) -> np.ndarray:
    """The query's LSH bucket keys: MinHash with ``num_bands × band_rows`` hash functions, one
    key per band (its index and its values hashed together)."""
    a, b = _minhash_params(num_bands * band_rows, seed)
    hashes = shingles(query)
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    sig = (
        ((a[:, None] * hashes[None, :] + b[:, None]) % _PRIME)
        .min(axis=1)
        .reshape(num_bands, band_rows)
    )
    with np.errstate(over="ignore"):
        mix = np.arange(1, band_rows + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        keys = (sig * mix).sum(axis=1) + np.arange(num_bands, dtype=np.uint64) * np.uint64(
            0xBF58476D1CE4E5B9
        )
    return keys.view(np.int64)


def candidate_pairs(
    ids: DataFrame, num_bands: int, band_rows: int, max_bucket: int, max_len_diff: int
) -> tuple[DataFrame, DataFrame]:
    """Pairs ``(a, b)``, ``a < b``, that share an LSH bucket of at most ``max_bucket`` queries,
    and the hot buckets that were skipped.

    A bucket is a band value *and* a length: each query joins the buckets of lengths ``len …
    len + max_len_diff``, so two queries share one only when their lengths differ by at most
    that (no near-duplicate differs by more). This keeps the many queries that share most of
    their words, but not their length, out of each other's buckets."""

    @F.pandas_udf(T.ArrayType(T.LongType()))
    def keys(queries: pd.Series) -> pd.Series:
        return queries.map(lambda q: band_keys(q, num_bands, band_rows))

    length = F.length("query")
    bands = (
        ids.select("id", F.explode(keys(F.col("query"))).alias("minhash"), length.alias("n"))
        .select("id", "minhash", F.explode(F.sequence("n", F.col("n") + max_len_diff)).alias("n"))
        .select("id", F.xxhash64("minhash", "n").alias("band"))
    )
    buckets = bands.groupBy("band").agg(F.collect_set("id").alias("ids"))
    buckets = buckets.withColumn("size", F.size("ids")).where(F.col("size") >= 2)
    hot = buckets.where(F.col("size") > max_bucket).select("band", "size")
    pairs = (
        buckets.where(F.col("size") <= max_bucket)
        .select(F.explode("ids").alias("a"), "ids")
        .select("a", F.explode("ids").alias("b"))
        .where(F.col("a") < F.col("b"))
        .distinct()
    )
    return pairs, hot


def edit_distance(a: str, b: str, cap: int) -> int:
    """Optimal-string-alignment distance (insert, delete, substitute, swap neighbours), exact up
    to ``cap`` and ``cap + 1`` beyond it: a typo is one edit, where Levenshtein counts a swap as two."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > cap:
            return cap + 1
        prev2, prev = prev, cur
    return min(prev[-1], cap + 1)


_DIGITS = re.compile(r"\d+")


def is_near_duplicate(a: str, b: str, max_edits: int) -> bool:
    """The same words in another order, or at most ``max_edits`` typo edits apart with the same
    numbers: "iphone 12" and "iphone 13" are different products, not a typo (and numbers would
    chain "q 1" – "q 11" – "q 111" into one cluster)."""
    if sorted(a.split(" ")) == sorted(b.split(" ")):
        return True
    return _DIGITS.findall(a) == _DIGITS.findall(b) and edit_distance(a, b, max_edits) <= max_edits


def verified_pairs(pairs: DataFrame, ids: DataFrame, max_edits: int) -> DataFrame:
    """The candidate pairs that are near-duplicates (:func:`is_near_duplicate`)."""
    left = ids.select(F.col("id").alias("a"), F.col("query").alias("qa"))
    right = ids.select(F.col("id").alias("b"), F.col("query").alias("qb"))

    @F.pandas_udf(T.BooleanType())
    def near(qa: pd.Series, qb: pd.Series) -> pd.Series:
        return pd.Series([is_near_duplicate(x, y, max_edits) for x, y in zip(qa, qb, strict=True)])

    # A native filter first drops most candidates in the JVM: a near-duplicate has the same
    # numbers and is within 2·max_edits Levenshtein edits (a swap counts two there), or has the
    # same words. The exact check is then one UDF on its own: Spark 4.3 mis-evaluated a pandas
    # UDF OR-ed with a column condition inside a filter (both false, row kept).
    joined = pairs.join(left, "a").join(right, "b")
    same_words = F.array_sort(F.split("qa", " ")) == F.array_sort(F.split("qb", " "))
    digits = F.lit(r"\d+")
    close = (F.regexp_extract_all("qa", digits, 0) == F.regexp_extract_all("qb", digits, 0)) & (
        F.levenshtein("qa", "qb", 2 * max_edits) >= 0
    )
    joined = joined.where(same_words | close).localCheckpoint()
    return joined.withColumn("_near", near("qa", "qb")).where(F.col("_near")).select("a", "b")


def connected_components(edges: DataFrame, max_iterations: int) -> tuple[DataFrame, int]:
    """``(id, component)`` for every id on an edge, the component being its smallest member id,
    by min-label propagation (each round cuts the lineage); and the rounds it took."""
    both = edges.select("a", "b").union(edges.select(F.col("b").alias("a"), F.col("a").alias("b")))
    labels = both.select(F.col("a").alias("id")).distinct().withColumn("component", F.col("id"))
    labels = labels.localCheckpoint()
    for round_ in range(1, max_iterations + 1):
        offers = both.join(
            labels.select(F.col("id").alias("b"), F.col("component").alias("c")), "b"
        )
        best = offers.groupBy(F.col("a").alias("id")).agg(F.min("c").alias("offer"))
        updated = (
            labels.join(best, "id", "left")
            .select("id", F.least("component", F.coalesce("offer", "component")).alias("component"))
            .localCheckpoint()
        )
        changed = (
            updated.join(labels.withColumnRenamed("component", "old"), "id")
            .where(F.col("component") != F.col("old"))
            .count()
        )
        labels = updated
        if changed == 0:
            return labels, round_
    return labels, max_iterations


def near_duplicate_edges(ids: DataFrame, cfg: DedupeConfig) -> tuple[DataFrame, int]:
    """Verified near-duplicate pairs ``(a, b)`` among ``ids`` (``id``, ``query``), checkpointed,
    and the number of hot LSH buckets that were skipped."""
    pairs, hot = candidate_pairs(ids, cfg.num_bands, cfg.band_rows, cfg.max_bucket, cfg.max_edits)
    return verified_pairs(pairs, ids, cfg.max_edits).localCheckpoint(), hot.count()


def cluster_near_duplicates(
    deduped: DataFrame, cfg: DedupeConfig
) -> tuple[DataFrame, dict[str, float]]:
    """Widen ``cluster_id`` to near-duplicate clusters and add each cluster's ``representative``."""
    ids = deduped.select(F.col("cluster_id").alias("id"), "query").persist()
    edges, num_hot = near_duplicate_edges(ids, cfg)
    num_edges = edges.count()
    stats: dict[str, float] = {"near_dup_pairs": num_edges, "lsh_hot_buckets": num_hot}
    if num_edges:
        components, rounds = connected_components(edges, cfg.max_iterations)
        stats["cc_rounds"] = rounds
        deduped = deduped.join(
            components.withColumnRenamed("id", "cluster_id"), "cluster_id", "left"
        )
        deduped = deduped.withColumn("cluster_id", F.coalesce("component", "cluster_id")).drop(
            "component"
        )
    ids.unpersist()
    reps = deduped.groupBy("cluster_id").agg(heaviest("query", "count").alias("representative"))
    return deduped.join(reps, "cluster_id"), stats


def pair_scores(predicted: pd.Series, truth: pd.Series) -> tuple[float, float]:
    """Precision and recall of near-duplicate pairs: pairs of queries in one predicted cluster
    against pairs in one true group (both indexed by query, over the queries both know)."""
    both = pd.DataFrame({"p": predicted, "t": truth}).dropna()

    def pairs(col: str) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for members in both.groupby(col).groups.values():
            names = sorted(members)
            out.update((x, y) for i, x in enumerate(names) for y in names[i + 1 :])
        return out

    p, t = pairs("p"), pairs("t")
    precision = len(p & t) / len(p) if p else 1.0
    recall = len(p & t) / len(t) if t else 1.0
    return precision, recall
