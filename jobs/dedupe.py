"""dedupe: one row per distinct normalized query, with its traffic and label counts.

Each output row carries ``count`` (events), ``num_labeled``, ``label_counts`` (label → events),
``majority_label`` (ties broken by label name), ``first_seen``/``last_seen`` and ``cluster_id``,
the id its split and lineage key on. Exact duplicates are merged (``rows_merged``); the
near-duplicate clustering that will widen ``cluster_id`` beyond exact matches is still to come,
so for now each cluster is one distinct query.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.ingest import ROWS_DIR
from pipelines.errors import DataError
from pipelines.stage import RunContext, StageResult

STAGE = "dedupe"


def majority_label(label: str, weight: str) -> Column:
    """Aggregate: the label with the largest weight; ties go by a hash of the label, so every
    rerun picks the same one. Rows with a null label never win."""
    return F.max_by(
        F.col(label),
        F.when(F.col(label).isNotNull(), F.struct(F.col(weight), F.negative(F.hash(label)))),
    )


def collapse_duplicates(rows: DataFrame) -> DataFrame:
    """Group rows by normalized query into one row each, with traffic and label counts."""
    per_label = rows.groupBy("query", "label").agg(
        F.count(F.lit(1)).alias("n"),
        F.min("ts").alias("first_seen"),
        F.max("ts").alias("last_seen"),
    )
    labeled = F.col("label").isNotNull()
    return per_label.groupBy("query").agg(
        F.sum("n").alias("count"),
        F.sum(F.when(labeled, F.col("n")).otherwise(0)).alias("num_labeled"),
        F.map_from_entries(
            F.collect_list(F.when(labeled, F.struct(F.col("label"), F.col("n"))))
        ).alias("label_counts"),
        majority_label("label", "n").alias("majority_label"),
        F.min("first_seen").alias("first_seen"),
        F.max("last_seen").alias("last_seen"),
    )


def assign_clusters(distinct: DataFrame) -> DataFrame:
    """A stable ``cluster_id`` per row: the hash of its query (exact clusters)."""
    return distinct.withColumn("cluster_id", F.xxhash64("query"))


def run(ctx: RunContext, out: Path) -> StageResult:
    ingested = ctx.require("ingest")
    rows = ctx.spark.read.parquet(str(ingested / ROWS_DIR))
    rows_in = ctx.read_result("ingest").rows_out
    deduped = assign_clusters(collapse_duplicates(rows))
    deduped.write.mode("overwrite").parquet(str(out / ROWS_DIR))
    written = ctx.spark.read.parquet(str(out / ROWS_DIR))
    stats = written.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct("cluster_id").alias("clusters"),
        F.sum("count").alias("events"),
    ).first()
    rows_out = int(stats["rows"])
    if int(stats["events"] or 0) != rows_in:
        raise DataError(
            f"stage {STAGE}: the distinct queries account for {stats['events']} events, "
            f"not the {rows_in} ingested rows"
        )
    return StageResult(
        rows_in=rows_in,
        rows_out=rows_out,
        rows_merged=rows_in - rows_out,
        metrics={"clusters": int(stats["clusters"]), "events": int(stats["events"] or 0)},
    )


def main(argv: list[str] | None = None) -> int:
    """``spark-submit jobs/dedupe.py --env E --set k=v``."""
    from pipelines.cli import stage_main

    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
