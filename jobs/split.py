"""split: deduplicated queries → ``train/``, ``validation/``, ``test/`` and the unlabeled ``pool/``.

Rows are assigned by a seeded hash of their ``cluster_id``, so every member of a cluster lands
in the same split and nothing of a test query leaks into training. Each row keeps its Zipf
``bucket`` (head / torso / tail by traffic share, docs/architecture.md, "Definitions") and a
``weight``: the labeled
events it stands for, which the weighted test error uses. With ``data.test_path`` the external
test set replaces the hashed test split; log rows that are also in it are quarantined as
``in_test_set``, and log clusters holding a near-duplicate of a test query as ``near_test_set``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.config import DedupeConfig
from core.layout import ROWS_DIR, RunContext, StageResult
from data_quality.quarantine import count_by_reason, write_quarantine
from querylog.clean import NORM, normalize_queries, tag_reasons
from querylog.neardup import assign_clusters, heaviest, near_duplicate_edges
from querylog.readers import held_inputs, read_raw
from querylog.splitting import home_split

STAGE = "split"
SPLITS = ("train", "validation", "test", "pool")


def bucket_thresholds(
    histogram: list[tuple[int, int]], head_share: float, torso_share: float
) -> tuple[int, int]:
    """Minimum counts of the head and torso buckets from ``(count, num_queries)`` pairs.

    Walking queries from the most frequent down, a group of equal count joins ``head`` while
    the traffic before it is under ``head_share``, then ``torso`` while it is under
    ``head_share + torso_share``; the rest is ``tail``. Equal counts never straddle buckets.
    """
    total = sum(c * k for c, k in histogram)
    head_min = torso_min = None
    cumulative = 0
    for count, num in sorted(histogram, reverse=True):
        before = cumulative / total if total else 1.0
        if before < head_share:
            head_min = count
        elif before < head_share + torso_share:
            torso_min = count
        cumulative += count * num
    big = max((c for c, _ in histogram), default=0) + 1
    head_min = head_min if head_min is not None else big
    torso_min = torso_min if torso_min is not None else head_min
    return head_min, torso_min


def assign_buckets(
    df: DataFrame, head_min: int, torso_min: int, count_col: str = "count"
) -> DataFrame:
    """``bucket`` = head / torso / tail from the query's traffic count."""
    count = F.coalesce(F.col(count_col), F.lit(0))
    return df.withColumn(
        "bucket",
        F.when(count >= head_min, "head").when(count >= torso_min, "torso").otherwise("tail"),
    )


def assign_splits(df: DataFrame, validation: float, test: float, seed: int) -> DataFrame:
    """``split`` by a seeded hash of ``cluster_id``; rows with no labeled event go to ``pool``."""
    return df.withColumn(
        "split",
        F.when(F.col("num_labeled") == 0, "pool").otherwise(home_split(validation, test, seed)),
    ).withColumn("weight", F.col("num_labeled").cast("double"))


def external_test_rows(raw: DataFrame, max_query_chars: int, labels: tuple[str, ...]) -> DataFrame:
    """External test rows, tagged as ingest tags them plus ``missing_label`` and ``bad_weight``
    (a ``weight`` that is not a positive number; a blank one means 1)."""
    tagged = tag_reasons(normalize_queries(raw), max_query_chars, labels)
    label = F.trim(F.col("label")) if "label" in raw.columns else F.lit(None).cast("string")
    tagged = tagged.withColumn("_label", F.when(label != "", label))
    extra = F.when(F.col("_label").isNull(), "missing_label")
    if "weight" in raw.columns:
        given = F.when(F.trim(F.col("weight")) != "", F.trim(F.col("weight")))
        tagged = tagged.withColumn(
            "_weight", F.when(given.isNull(), F.lit(1.0)).otherwise(given.try_cast("double"))
        )
        extra = extra.when(F.col("_weight").isNull() | (F.col("_weight") <= 0), "bad_weight")
    else:
        tagged = tagged.withColumn("_weight", F.lit(1.0))
    return tagged.withColumn("reason", F.coalesce(F.col("reason"), extra))


def collapse_test_rows(good: DataFrame) -> DataFrame:
    """One row per distinct external test query; label counts are summed weights."""
    per_label = good.groupBy(F.col(NORM).alias("query"), F.col("_label").alias("label")).agg(
        F.sum(F.coalesce(F.col("_weight"), F.lit(1.0))).alias("w")
    )
    collapsed = per_label.groupBy("query").agg(
        F.sum("w").alias("weight"),
        F.map_from_entries(F.collect_list(F.struct("label", "w"))).alias("label_counts"),
        heaviest("label", "w").alias("majority_label"),
    )
    return assign_clusters(collapsed).withColumn("num_labeled", F.col("weight"))


def near_test_clusters(rows: DataFrame, test_queries: DataFrame, cfg: DedupeConfig) -> DataFrame:
    """``cluster_id`` of every log cluster with a near-duplicate in the external test set, found
    the way dedupe finds them: the whole cluster would leak the test query into training."""
    log_ids = rows.select(F.xxhash64("query").alias("id"), "query", F.lit(False).alias("test"))
    test_ids = test_queries.select(
        F.xxhash64("query").alias("id"), "query", F.lit(True).alias("test")
    )
    ids = log_ids.union(test_ids).dropDuplicates(["id"]).persist()
    edges, _ = near_duplicate_edges(ids.select("id", "query"), cfg)
    side = ids.select("id", "test")
    marked = edges.join(side.toDF("a", "a_test"), "a").join(side.toDF("b", "b_test"), "b")
    crossing = marked.where(F.col("a_test") != F.col("b_test"))
    log_side = crossing.select(F.when(F.col("a_test"), F.col("b")).otherwise(F.col("a")).alias("h"))
    hits = rows.select("cluster_id", F.xxhash64("query").alias("h")).join(
        log_side, "h", "left_semi"
    )
    near = hits.select("cluster_id").distinct().localCheckpoint()
    ids.unpersist()
    return near


def _write_splits(df: DataFrame, out: Path, names: tuple[str, ...]) -> None:
    tmp = out / "_by_split"
    df.write.mode("overwrite").partitionBy("split").parquet(str(tmp))
    for name in names:
        part = tmp / f"split={name}"
        if part.exists():
            part.rename(out / name)
        else:  # an empty split is still a readable, empty dataset
            empty = df.sparkSession.createDataFrame([], df.drop("split").schema)
            empty.write.parquet(str(out / name))
    shutil.rmtree(tmp)


def run(ctx: RunContext, out: Path) -> StageResult:
    cfg = ctx.cfg
    deduped = ctx.spark.read.parquet(str(ctx.require("dedupe") / ROWS_DIR))
    histogram = [
        (int(r["count"]), int(r["k"]))
        for r in deduped.groupBy("count").agg(F.count(F.lit(1)).alias("k")).collect()
    ]
    head_min, torso_min = bucket_thresholds(histogram, cfg.split.head_share, cfg.split.torso_share)
    rows_in = ctx.read_result("dedupe").rows_out
    external = cfg.data.test_path
    rows = assign_splits(
        assign_buckets(deduped, head_min, torso_min),
        cfg.split.validation_fraction,
        0.0 if external else cfg.split.test_fraction,
        cfg.split.seed,
    )
    reasons: dict[str, int] = {}
    merged = 0
    sizes: dict[str, int] = {}
    if external:
        raw = read_raw(ctx.spark, external, cfg.data.test_format, "data.test_path")
        tagged = external_test_rows(raw, cfg.ingest.max_query_chars, cfg.data.labels).persist()
        with held_inputs(ctx.spark, raw, "data.test_path"):  # read here, once: then cached
            reasons = count_by_reason(tagged)
        test_good = reasons.pop(None, 0)
        rows_in += test_good + sum(reasons.values())
        if reasons:
            bad = tagged.where(F.col("reason").isNotNull()).drop(NORM, "_label", "_weight")
            write_quarantine(bad, out, STAGE, part="test_path")
        test = collapse_test_rows(tagged.where(F.col("reason").isNull()))
        traffic = deduped.select("query", "count")
        test = assign_buckets(test.join(traffic, "query", "left"), head_min, torso_min)
        test = test.withColumn("count", F.coalesce(F.col("count"), F.lit(0)).cast("long"))
        test.write.parquet(str(out / "test"))
        sizes["test"] = ctx.spark.read.parquet(str(out / "test")).count()
        merged = test_good - sizes["test"]
        test_queries = ctx.spark.read.parquet(str(out / "test")).select("query")
        leaked = rows.join(test_queries, "query", "left_semi")
        num_leaked = leaked.count()
        if num_leaked:
            reason = F.lit("in_test_set")
            leaked = leaked.drop("split").withColumn("reason", reason)
            write_quarantine(leaked, out, STAGE, part="in_test_set")
            reasons["in_test_set"] = num_leaked
        rows = rows.join(test_queries, "query", "left_anti")
        if cfg.dedupe.near_enabled:
            near = near_test_clusters(rows, test_queries, cfg.dedupe)
            leaked = rows.join(near, "cluster_id", "left_semi").persist()
            num_leaked = leaked.count()
            if num_leaked:
                leaked = leaked.drop("split").withColumn("reason", F.lit("near_test_set"))
                write_quarantine(leaked, out, STAGE, part="near_test_set")
                reasons["near_test_set"] = num_leaked
            leaked.unpersist()
            rows = rows.join(near, "cluster_id", "left_anti")
        tagged.unpersist()
    names = tuple(n for n in SPLITS if n not in sizes)
    rows = rows.persist()
    sizes |= {r["split"]: int(r["count"]) for r in rows.groupBy("split").count().collect()}
    _write_splits(rows, out, names)
    rows.unpersist()
    return StageResult(
        rows_in=rows_in,
        rows_out=sum(sizes.values()),
        rows_quarantined=sum(reasons.values()),
        rows_merged=merged,
        quarantined_by_reason=dict(sorted(reasons.items())),
        metrics={f"rows_{name}": sizes.get(name, 0) for name in SPLITS}
        | {"bucket_head_min_count": head_min, "bucket_torso_min_count": torso_min},
        params={"test_source": external or "hash"},
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
