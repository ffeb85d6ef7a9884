"""augment: EDA-style variants of tail training queries, each with ``aug_of`` lineage.

Only ``split/train`` rows seen at most ``augment.max_count`` times get variants, never
validation, test or pool rows. Each of the ``augment.variants`` variants of a query applies one
operation drawn from ``augment.ops`` (those that can change that query): WordNet synonym
replacement, random insertion of a synonym, random swap, random deletion, a keyboard typo. The
random draws hash (seed, query, variant number), so a seed gives the same variants whatever the
partitioning. A variant equal to its query, to another variant, or to any query of the log
(train, validation, test or pool) is dropped and counted as merged, so no augmentation can
recreate a held-out query.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import AugmentConfig
from core.layout import AUGMENTED_TRAIN_DIR as TRAIN_DIR
from core.layout import RunContext, StageResult
from querylog.wordnet import load_synonyms

STAGE = "augment"
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")  # letters only: "iphone 12" → "13"
# is another product, not a typo


def _keyboard_neighbours() -> dict[str, str]:
    pos = {c: (r, i) for r, row in enumerate(_KEYBOARD_ROWS) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in pos.items():
        near = [
            k for k, (r2, i2) in pos.items()
            if k != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1
        ]  # fmt: skip
        out[c] = "".join(sorted(near))
    return out


KEYBOARD = _keyboard_neighbours()


def _rng(seed: int, query: str, variant: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(query.encode("utf-8")), variant])


def _pick(rng: np.random.Generator, items: list | tuple) -> object:
    return items[int(rng.integers(len(items)))]


def _changes(words: list[str], alpha: float) -> int:
    return max(1, int(round(alpha * len(words))))


def synonym_replace(words, rng, synonyms, alpha):  # noqa: ANN001, ANN201
    """Replace up to ``alpha``·n words (at least one) that have synonyms by one of them."""
    slots = [i for i, w in enumerate(words) if w in synonyms]
    if not slots:
        return None
    out = list(words)
    for i in rng.permutation(slots)[: _changes(words, alpha)]:
        out[i] = _pick(rng, synonyms[words[i]])
    return out


def random_insert(words, rng, synonyms, alpha):  # noqa: ANN001, ANN201
    """Insert a synonym of a random word at a random position, ``alpha``·n times (at least once)."""
    sources = [w for w in words if w in synonyms]
    if not sources:
        return None
    out = list(words)
    for _ in range(_changes(words, alpha)):
        out.insert(int(rng.integers(len(out) + 1)), _pick(rng, synonyms[_pick(rng, sources)]))
    return out


def random_swap(words, rng, synonyms, alpha):  # noqa: ANN001, ANN201
    """Swap two words, ``alpha``·n times (at least once)."""
    if len(words) < 2 or len(set(words)) < 2:
        return None
    out = list(words)
    for _ in range(_changes(words, alpha)):
        i, j = rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
    return out


def random_delete(words, rng, synonyms, alpha):  # noqa: ANN001, ANN201
    """Delete each word with probability ``alpha``; at least one goes and one stays."""
    if len(words) < 2:
        return None
    keep = rng.random(len(words)) >= alpha
    if keep.all():
        keep[int(rng.integers(len(words)))] = False
    if not keep.any():
        keep[int(rng.integers(len(words)))] = True
    return [w for w, k in zip(words, keep, strict=True) if k]


def keyboard_typo(words, rng, synonyms, alpha):  # noqa: ANN001, ANN201
    """Replace one letter by a neighbour on a QWERTY keyboard (numbers are left alone)."""
    text = " ".join(words)
    slots = [i for i, c in enumerate(text) if KEYBOARD.get(c)]
    if not slots:
        return None
    i = int(_pick(rng, slots))
    return (text[:i] + _pick(rng, KEYBOARD[text[i]]) + text[i + 1 :]).split(" ")


OPS = {
    "synonym": synonym_replace,
    "insert": random_insert,
    "swap": random_swap,
    "delete": random_delete,
    "typo": keyboard_typo,
}


def variants_of(
    query: str, cfg: AugmentConfig, synonyms: dict[str, tuple[str, ...]]
) -> list[tuple[str, str]]:
    """``(variant, op)`` for variant numbers ``0 … k-1``; an op that cannot change the query is
    not drawn, and a query no op can change has no variants. Duplicates are kept (counted later)."""
    words = query.split(" ")
    out = []
    for j in range(cfg.variants):
        rng = _rng(cfg.seed, query, j)
        for op in rng.permutation(list(cfg.ops)):
            changed = OPS[op](words, rng, synonyms, cfg.alpha)
            if changed is not None:
                out.append((" ".join(changed), str(op)))
                break
    return out


VARIANT_SCHEMA = T.StructType(
    [
        T.StructField("aug_of", T.StringType()),
        T.StructField("query", T.StringType()),
        T.StructField("aug_op", T.StringType()),
    ]
)


def generate_variants(
    tail: DataFrame, cfg: AugmentConfig, synonyms: dict[str, tuple[str, ...]]
) -> DataFrame:
    """``aug_of``, ``query``, ``aug_op`` for every variant of ``tail``'s queries, in Spark."""
    table = tail.sparkSession.sparkContext.broadcast(synonyms)

    def make(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        syn = table.value
        for batch in batches:
            rows = [(q, v, op) for q in batch["query"] for v, op in variants_of(q, cfg, syn)]
            yield pd.DataFrame(rows, columns=["aug_of", "query", "aug_op"])

    return tail.select("query").mapInPandas(make, VARIANT_SCHEMA)


def run(ctx: RunContext, out: Path) -> StageResult:
    cfg = ctx.cfg.augment
    split_dir = ctx.require("split")
    synonyms = load_synonyms(cfg.wordnet_dir) if {"synonym", "insert"} & set(cfg.ops) else {}
    train = ctx.spark.read.parquet(str(split_dir / "train"))
    num_train = ctx.read_result("split").metrics["rows_train"]
    tail = train.where(F.col("count") <= cfg.max_count)
    variants = generate_variants(tail, cfg, synonyms).persist()
    generated = variants.count()
    known = None
    for name in ("train", "validation", "test", "pool"):
        part = ctx.spark.read.parquet(str(split_dir / name)).select("query")
        known = part if known is None else known.union(part)
    kept = (
        variants.join(known, "query", "left_anti")
        .dropDuplicates(["query"])
        .join(train.withColumnRenamed("query", "aug_of"), "aug_of")
    )
    kept = kept.withColumn("aug_weight", F.lit(cfg.weight))
    originals = (
        train.withColumn("aug_of", F.lit(None).cast("string"))
        .withColumn("aug_op", F.lit(None).cast("string"))
        .withColumn("aug_weight", F.lit(1.0))
    )
    originals.unionByName(kept).write.parquet(str(out / TRAIN_DIR))
    written = ctx.spark.read.parquet(str(out / TRAIN_DIR))
    per_op = {
        r["aug_op"]: int(r["count"])
        for r in written.where(F.col("aug_of").isNotNull()).groupBy("aug_op").count().collect()
    }
    variants.unpersist()
    rows_out = written.count()
    augmented = sum(per_op.values())
    return StageResult(
        rows_in=int(num_train) + generated,
        rows_out=rows_out,
        rows_merged=int(num_train) + generated - rows_out,
        metrics={
            "tail_queries": tail.count(),
            "variants_generated": generated,
            "rows_augmented": augmented,
            "synonym_entries": len(synonyms),
        }
        | {f"rows_augmented.{op}": n for op, n in sorted(per_op.items())},
        params={"ops": ",".join(cfg.ops), "max_count": cfg.max_count, "variants": cfg.variants},
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
