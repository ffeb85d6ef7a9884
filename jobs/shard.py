"""shard: featurize train and validation once, in Spark, into model-ready Parquet shards.

Each shard row holds the query's int32 n-gram ``ids`` (from the same :class:`Featurizer` that
serves the model), its ``label`` id (-1 for a validation label the training data never saw)
and its ``weight`` by the sampling policy. ``train.world_size × shard.shards_per_worker``
train shards, shuffled and balanced, and a ``manifest.json`` listing every file with its rows
and sha256, the label vocabulary and the featurizer's settings (docs/architecture.md, "Data
contract").
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

import pandas as pd
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from core.hashing import sha256_of
from core.layout import AUGMENTED_TRAIN_DIR, RunContext, StageResult
from trainers.featurizer import Featurizer

STAGE = "shard"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def label_vocabulary(train: DataFrame) -> list[str]:
    """Every label seen in training, sorted: label id = position in this list."""
    keys = train.select(F.explode(F.map_keys("label_counts")).alias("label")).distinct().collect()
    return sorted(r["label"] for r in keys)


def sampling_weight(policy: str) -> Column:
    """A distinct query's training weight: 1, its labeled count, or that count's square root."""
    n = F.col("num_labeled").cast("double")
    return {"unique": F.lit(1.0), "count": n, "sqrt_count": F.sqrt(n)}[policy]


def featurize_rows(
    df: DataFrame, featurizer: Featurizer, labels: list[str], policy: str
) -> DataFrame:
    """``query``, ``ids`` (int32 n-gram buckets), ``label`` (id, -1 if unseen), ``weight``."""

    @F.pandas_udf("array<int>")
    def ids(queries: pd.Series) -> pd.Series:
        return queries.map(featurizer.ids)

    scale = F.col("aug_weight") if "aug_weight" in df.columns else F.lit(1.0)
    label_id = F.array_position(F.array(*[F.lit(x) for x in labels]), F.col("majority_label")) - 1
    return df.select(
        "query",
        ids(F.col("query")).alias("ids"),
        label_id.cast("int").alias("label"),
        (sampling_weight(policy) * scale).cast("float").alias("weight"),
    )


def write_shards(df: DataFrame, out: Path, prefix: str, num_shards: int, seed: int) -> list[dict]:
    """Round-robin ``df`` into ``num_shards`` shuffled files ``<prefix>-NNNNN.parquet``."""
    tmp = out / f"_{prefix}"
    shuffled = df.repartition(num_shards).sortWithinPartitions(F.xxhash64("query", F.lit(seed)))
    shuffled.write.mode("overwrite").parquet(str(tmp))
    entries = []
    for i, part in enumerate(sorted(tmp.glob("part-*.parquet"))):
        target = out / f"{prefix}-{i:05d}.parquet"
        part.rename(target)
        entries.append(
            {"path": target.name, "rows": pq.ParquetFile(target).metadata.num_rows,
             "sha256": sha256_of(target)}
        )  # fmt: skip
    shutil.rmtree(tmp)
    return entries


def run(ctx: RunContext, out: Path) -> StageResult:
    cfg = ctx.cfg
    split_dir = ctx.require("split")
    featurizer = Featurizer.from_config(cfg.featurizer)
    train_dir = split_dir / "train"
    if cfg.augment.enabled:
        train_dir = ctx.require("augment") / AUGMENTED_TRAIN_DIR
    train = ctx.spark.read.parquet(str(train_dir))
    validation = ctx.spark.read.parquet(str(split_dir / "validation"))
    labels = label_vocabulary(train)
    num_train_shards = cfg.train.world_size * cfg.shard.shards_per_worker
    splits = {
        "train": write_shards(
            featurize_rows(train, featurizer, labels, cfg.shard.sampling),
            out, "train", num_train_shards, cfg.shard.seed,
        ),
        "validation": write_shards(
            featurize_rows(validation, featurizer, labels, cfg.shard.sampling),
            out, "validation", cfg.train.world_size, cfg.shard.seed,
        ),
    }  # fmt: skip
    manifest = {
        "version": MANIFEST_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_date": ctx.run_date,
        "featurizer": featurizer.settings(),
        "labels": labels,
        "sampling": cfg.shard.sampling,
        "splits": {
            name: {"rows": sum(e["rows"] for e in entries), "files": entries}
            for name, entries in splits.items()
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    split_result = ctx.read_result("split").metrics
    rows_in = int(split_result["rows_validation"])
    if cfg.augment.enabled:
        rows_in += ctx.read_result("augment").rows_out
    else:
        rows_in += int(split_result["rows_train"])
    rows_out = sum(s["rows"] for s in manifest["splits"].values())
    shard_rows = [e["rows"] for e in splits["train"]]
    return StageResult(
        rows_in=rows_in,
        rows_out=rows_out,
        metrics={
            "num_shards": len(shard_rows),
            "num_labels": len(labels),
            "shard_rows_min": min(shard_rows, default=0),
            "shard_rows_max": max(shard_rows, default=0),
        },
        params={"sampling": cfg.shard.sampling, "featurizer": json.dumps(featurizer.settings())},
        artifacts=[MANIFEST],
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
