"""dedupe: one row per distinct normalized query, with its traffic and label counts, and its
near-duplicate cluster.

Each output row carries ``count`` (events), ``num_labeled``, ``label_counts`` (label → events),
``majority_label``, ``first_seen``/``last_seen``, ``cluster_id`` (the id its split and lineage
key on) and ``representative`` (the cluster's most frequent query). Exact duplicates are merged
(``rows_merged``). Near-duplicates (a typo, another word order, punctuation) keep their own rows
but share a cluster: MinHash LSH over word-internal character 3-grams proposes candidate pairs
(buckets above ``dedupe.max_bucket`` are skipped, so head queries cannot blow up quadratically),
an edit-distance or same-words check verifies them, and connected components over the verified
pairs make the clusters.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.errors import DataError
from core.layout import ROWS_DIR, RunContext, StageResult
from querylog.labels import read_labels
from querylog.neardup import assign_clusters, cluster_near_duplicates, heaviest

STAGE = "dedupe"


def collapse_duplicates(rows: DataFrame, imported: DataFrame | None = None) -> DataFrame:
    """Group rows by normalized query into one row each, with traffic and label counts.

    ``imported`` labels (``query``, ``label``; from ``zipfline label import``) count as labeled
    events of queries the log holds (``num_labeled``, ``label_counts``, ``num_imported``) but
    not as traffic (``count``): they are judgments, not searches.
    """
    rows = rows.select("query", "label", "ts", F.lit(0).alias("_imported"))
    if imported is not None:
        known = imported.join(rows.select("query"), "query", "left_semi")
        rows = rows.unionByName(
            known.select("query", "label", F.lit(None).cast("timestamp").alias("ts"),
                         F.lit(1).alias("_imported"))
        )  # fmt: skip
    per_label = rows.groupBy("query", "label").agg(
        F.count(F.lit(1)).alias("n"),
        F.sum("_imported").alias("n_imported"),
        F.min("ts").alias("first_seen"),
        F.max("ts").alias("last_seen"),
    )
    labeled = F.col("label").isNotNull()
    return per_label.groupBy("query").agg(
        F.sum(F.col("n") - F.col("n_imported")).alias("count"),
        F.sum(F.when(labeled, F.col("n")).otherwise(0)).alias("num_labeled"),
        F.sum("n_imported").alias("num_imported"),
        F.map_from_entries(
            F.collect_list(F.when(labeled, F.struct(F.col("label"), F.col("n"))))
        ).alias("label_counts"),
        heaviest("label", "n").alias("majority_label"),
        F.min("first_seen").alias("first_seen"),
        F.max("last_seen").alias("last_seen"),
    )


def run(ctx: RunContext, out: Path) -> StageResult:

    ingested = ctx.require("ingest")
    rows = ctx.spark.read.parquet(str(ingested / ROWS_DIR))
    rows_in = ctx.read_result("ingest").rows_out
    imported = read_labels(ctx.spark, ctx.root)
    deduped = assign_clusters(collapse_duplicates(rows, imported))
    near: dict[str, float] = {}
    if ctx.cfg.dedupe.near_enabled:
        deduped, near = cluster_near_duplicates(deduped, ctx.cfg.dedupe)
    else:
        deduped = deduped.withColumn("representative", F.col("query"))
    deduped.write.mode("overwrite").parquet(str(out / ROWS_DIR))
    written = ctx.spark.read.parquet(str(out / ROWS_DIR))
    if imported is not None:  # labels of queries no longer in the log stay in the store
        merged_labels = int(written.agg(F.sum("num_imported")).first()[0] or 0)
        near |= {"labels_imported": merged_labels,
                 "labels_not_in_log": imported.count() - merged_labels}  # fmt: skip
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
        metrics={"clusters": int(stats["clusters"]), "events": int(stats["events"] or 0)} | near,
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
