"""The four gates as code: the frames each one checks and its expectations, thresholds from conf.

A gate sees Spark DataFrames ("frames") built from its stage's output: the rows themselves
(with a derived flag column where a check needs a join, as split's cluster leak does) and a
one-row ``facts`` frame of aggregates computed in Spark (quarantined share, the fitted Zipf
exponent, split shares, shard balance, checksum mismatches). Nothing is collected to the driver
but aggregates. ``frames_for`` builds them, ``checks_for`` lists the expectations with their
policies: the built-in default, overridden by ``dq.policies``, plus ``dq.extra`` from conf.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from core.config import Config
from core.errors import ConfigError
from core.hashing import sha256_of
from data_quality.expectations import Check

GATES = ("ingest", "dedupe", "split", "shard")
QUARANTINABLE = {"ingest": ("rows",), "dedupe": ("rows",), "split": ("train", "test"), "shard": ()}
"""The frames whose failing rows can be moved to quarantine (the rest are aggregates or shards,
which the manifest pins)."""
MAIN_FRAME = {"ingest": "rows", "dedupe": "rows", "split": "train", "shard": "train"}


@dataclass
class Frame:
    """A frame a gate validates; ``path`` (relative to the stage folder) when its rows can be
    quarantined, with ``columns`` the dataset's own columns (derived flags dropped on rewrite)."""

    df: DataFrame
    path: str | None = None
    columns: tuple[str, ...] = ()


def zipf_facts(histogram: list[tuple[int, int]], min_count: int = 3) -> tuple[float, float]:
    """The exponent ``s`` of ``count ∝ rank^-s`` fitted by least squares on log-log over the
    queries seen at least ``min_count`` times (below that the finite sample flattens the curve),
    and the traffic share of the top 1% of distinct queries. From ``(count, num_queries)``."""
    pairs = sorted(histogram, reverse=True)
    total_queries = sum(k for _, k in pairs)
    total_traffic = sum(c * k for c, k in pairs)
    top_n = max(1, math.ceil(total_queries / 100))
    taken = top_traffic = 0
    for count, k in pairs:
        take = min(k, top_n - taken)
        top_traffic += take * count
        taken += take
        if taken >= top_n:
            break
    share = top_traffic / total_traffic if total_traffic else 0.0
    # each count group covers ranks (first, last]: its mid-rank stands for it, weighted by size
    ranks, logs, weights = [], [], []
    rank = 0
    for count, k in pairs:
        if count < min_count:
            break
        ranks.append(math.log(rank + (k + 1) / 2))
        logs.append(math.log(count))
        weights.append(k)
        rank += k
    if len(ranks) < 3:
        return float("nan"), share
    slope = np.polyfit(np.array(ranks), np.array(logs), 1, w=np.sqrt(weights))[0]
    return float(-slope), share


def _facts(spark: SparkSession, values: dict[str, float]) -> Frame:
    return Frame(spark.createDataFrame([{k: float(v) for k, v in values.items()}]))


def frames_for(gate: str, cfg: Config, out: Path, spark: SparkSession, result) -> dict[str, Frame]:  # noqa: ANN001
    """The frames of ``gate`` over the stage output in ``out`` (``result``: its StageResult)."""
    read = lambda rel: spark.read.parquet(str(out / rel))  # noqa: E731
    if gate == "ingest":
        rows = read("rows")
        share = result.rows_quarantined / result.rows_in if result.rows_in else 0.0
        return {
            "rows": Frame(rows, "rows", tuple(rows.columns)),
            "facts": _facts(spark, {"quarantined_share": share, "rows_in": result.rows_in}),
        }
    if gate == "dedupe":
        rows = read("rows")
        hist = [(int(r[0]), int(r[1])) for r in rows.groupBy("count").count().collect()]
        frames = {"rows": Frame(rows, "rows", tuple(rows.columns))}
        if sum(k for _, k in hist) >= cfg.dq.zipf_min_queries:  # else: too little to judge
            exponent, share = zipf_facts(hist)
            facts = {"top1pct_traffic_share": share}
            if math.isfinite(exponent):
                facts["zipf_exponent"] = exponent
            frames["facts"] = _facts(spark, facts)
        return frames
    if gate == "split":
        train, test = read("train"), read("test")
        test_clusters = test.select("cluster_id").distinct().withColumn("_t", F.lit(True))
        flagged = train.join(test_clusters, "cluster_id", "left").withColumn(
            "leaks_test_cluster", F.coalesce(F.col("_t"), F.lit(False))
        )
        flagged = flagged.drop("_t")
        labels = sorted(r[0] for r in train.select("majority_label").distinct().collect())
        test = test.withColumn("label_seen_in_train", F.col("majority_label").isin(labels))
        frames = {
            "train": Frame(flagged, "train", tuple(train.columns)),
            "test": Frame(
                test, "test", tuple(c for c in test.columns if c != "label_seen_in_train")
            ),
        }
        sizes = {k[len("rows_") :]: v for k, v in result.metrics.items() if k.startswith("rows_")}
        labeled = sum(sizes.get(s, 0) for s in ("train", "validation", "test"))
        if labeled and not cfg.data.test_path:
            facts = {}
            for name, want in (("validation", cfg.split.validation_fraction),
                               ("test", cfg.split.test_fraction)):  # fmt: skip
                got = sizes.get(name, 0) / labeled
                slack = max(cfg.dq.split_tolerance, 3 * math.sqrt(want * (1 - want) / labeled))
                facts[f"{name}_share_error"] = abs(got - want) - slack  # ≤ 0 within tolerance
            frames["facts"] = _facts(spark, facts)
        return frames
    if gate == "shard":
        manifest = json.loads((out / "manifest.json").read_text())
        files = manifest["splits"]["train"]["files"]
        mismatched = sum(sha256_of(out / f["path"]) != f["sha256"] for f in files) + sum(
            sha256_of(out / f["path"]) != f["sha256"]
            for f in manifest["splits"]["validation"]["files"]
        )
        rows = [f["rows"] for f in files]
        mean = sum(rows) / len(rows) if rows else 0.0
        # beyond the one row that an even split of an odd count must differ by
        imbalance = max(0.0, max(abs(r - mean) for r in rows) - 1) / mean if mean else 0.0
        with_ids = lambda df: df.withColumn("ids_min", F.array_min("ids")).withColumn(  # noqa: E731
            "ids_max", F.array_max("ids")
        )
        return {
            "train": Frame(with_ids(read("train-*.parquet"))),
            "validation": Frame(with_ids(read("validation-*.parquet"))),
            "facts": _facts(
                spark,
                {
                    "shard_imbalance": imbalance,
                    "checksum_mismatches": mismatched,
                    "num_labels": len(manifest["labels"]),
                },
            ),  # fmt: skip
        }
    raise ConfigError(f"no data quality gate for stage {gate!r}")


def builtin_checks(gate: str, cfg: Config) -> list[Check]:
    """The gate's own expectations, with their default policies."""
    if gate == "ingest":
        checks = [
            Check("schema", "expect_table_columns_to_match_set",
                  {"column_set": ["query", "label", "ts"], "exact_match": False}),
            Check("query_not_null", "expect_column_values_to_not_be_null", {"column": "query"},
                  policy="quarantine"),
            Check("query_not_blank", "expect_column_values_to_not_match_regex",
                  {"column": "query", "regex": r"^\s*$"}, policy="quarantine"),
            Check("query_length", "expect_column_value_lengths_to_be_between",
                  {"column": "query", "min_value": 1, "max_value": cfg.ingest.max_query_chars},
                  policy="quarantine"),
            Check("ts_is_timestamp", "expect_column_values_to_be_in_type_list",
                  {"column": "ts", "type_list": ["TimestampType", "TimestampNTZType"]}),
            Check("quarantined_share", "expect_column_values_to_be_between",
                  {"column": "quarantined_share", "max_value": cfg.dq.max_quarantined_share},
                  frame="facts"),
        ]  # fmt: skip
        if cfg.data.labels:
            checks.append(
                Check("label_known", "expect_column_values_to_be_in_set",
                      {"column": "label", "value_set": list(cfg.data.labels)}, policy="quarantine")
            )  # fmt: skip
        return checks
    if gate == "dedupe":
        return [
            Check("query_unique", "expect_column_values_to_be_unique", {"column": "query"}),
            Check("count_positive", "expect_column_values_to_be_between",
                  {"column": "count", "min_value": 1}, policy="quarantine"),
            Check("zipf_exponent", "expect_column_values_to_be_between",
                  {"column": "zipf_exponent", "min_value": cfg.dq.zipf_exponent_min,
                   "max_value": cfg.dq.zipf_exponent_max}, frame="facts"),
            Check("top1pct_traffic_share", "expect_column_values_to_be_between",
                  {"column": "top1pct_traffic_share", "min_value": cfg.dq.top_share_min,
                   "max_value": cfg.dq.top_share_max}, frame="facts"),
        ]  # fmt: skip
    if gate == "split":
        checks = [
            Check("no_test_cluster_in_train", "expect_column_values_to_be_in_set",
                  {"column": "leaks_test_cluster", "value_set": [False]}, frame="train"),
            Check("test_labels_in_train", "expect_column_values_to_be_in_set",
                  {"column": "label_seen_in_train", "value_set": [True]}, frame="test",
                  policy="warn"),
        ]  # fmt: skip
        if not cfg.data.test_path:
            checks += [
                Check(f"{name}_fraction", "expect_column_values_to_be_between",
                      {"column": f"{name}_share_error", "max_value": 0.0}, frame="facts")
                for name in ("validation", "test")
            ]  # fmt: skip
        return checks
    if gate == "shard":
        buckets = cfg.featurizer.num_buckets
        return [
            Check("shard_balance", "expect_column_values_to_be_between",
                  {"column": "shard_imbalance", "max_value": cfg.dq.shard_balance}, frame="facts"),
            Check("checksums_match", "expect_column_values_to_be_between",
                  {"column": "checksum_mismatches", "max_value": 0}, frame="facts"),
            Check("ids_in_range", "expect_column_values_to_be_between",
                  {"column": "ids_min", "min_value": 0}, frame="train"),
            Check("ids_below_buckets", "expect_column_values_to_be_between",
                  {"column": "ids_max", "max_value": buckets - 1}, frame="train"),
            Check("label_ids_valid", "expect_column_values_to_be_between",
                  {"column": "label", "min_value": 0}, frame="train"),
            Check("validation_ids_below_buckets", "expect_column_values_to_be_between",
                  {"column": "ids_max", "max_value": buckets - 1}, frame="validation"),
        ]  # fmt: skip
    raise ConfigError(f"no data quality gate for stage {gate!r}")


def checks_for(gate: str, cfg: Config) -> list[Check]:
    """Built-in and conf-added expectations of ``gate``, each with its policy from conf."""
    checks = builtin_checks(gate, cfg)
    for extra in cfg.dq.extra:
        if extra.gate == gate:
            checks.append(
                Check(extra.name, extra.type, dict(extra.kwargs),
                      extra.frame or MAIN_FRAME[gate], extra.policy)
            )  # fmt: skip
    names = {c.name for c in checks}
    policies = cfg.dq.policies.get(gate, {})
    for name in policies:
        if name not in names:
            raise ConfigError(
                f"dq.policies.{gate}.{name}: gate {gate} has no expectation {name!r} "
                f"(it has: {', '.join(sorted(names))})"
            )
    out = []
    for check in checks:
        policy = policies.get(check.name, check.policy)
        if policy == "quarantine" and not (check.row_level and check.frame in QUARANTINABLE[gate]):
            raise ConfigError(
                f"dq: {gate}.{check.name} ({check.type} on the {check.frame} frame) cannot "
                "quarantine rows: only row-level expectations on "
                f"{' or '.join(QUARANTINABLE[gate]) or 'no frame of this gate'} can (use fail or warn)"
            )
        out.append(Check(check.name, check.type, check.kwargs, check.frame, policy))
    return out
