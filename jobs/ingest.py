"""ingest: raw logs → normalized rows in ``ingest/rows/``, bad rows in ``ingest/quarantine/``.

Reasons: ``malformed_row`` (a line the parser could not split into the columns),
``bad_encoding`` (undecodable bytes), ``empty_query`` (null or blank after normalization),
``too_long`` (above ``ingest.max_query_chars``), ``unknown_label`` (not in ``data.labels``,
when that is set), ``bad_timestamp`` (a ``ts`` that is not ISO-8601).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from data_quality.quarantine import count_by_reason, write_quarantine
from jobs.readers import CORRUPT, SOURCE, read_raw
from pipelines.errors import DataError
from pipelines.stage import RunContext, StageResult
from trainers.featurizer import normalize_query

STAGE = "ingest"
ROWS_DIR = "rows"
NORM = "_query_norm"


@F.pandas_udf(T.StringType())  # a type object: no session needed at import
def _normalize(queries: pd.Series) -> pd.Series:
    return queries.map(normalize_query, na_action="ignore")


def normalize_queries(df: DataFrame) -> DataFrame:
    """Add the normalized query (NFKC, controls, case folding, whitespace) as ``_query_norm``."""
    return df.withColumn(NORM, _normalize(F.col("query")))


def _blank_to_null(col: Column) -> Column:
    trimmed = F.trim(col)
    return F.when(trimmed == "", None).otherwise(trimmed)


def tag_reasons(df: DataFrame, max_query_chars: int, labels: tuple[str, ...]) -> DataFrame:
    """Add ``reason``: the first quarantine reason that applies to a row, or null."""
    label = _blank_to_null(F.col("label")) if "label" in df.columns else F.lit(None)
    ts = _blank_to_null(F.col("ts")) if "ts" in df.columns else F.lit(None)
    reason = (
        F.when(F.col(CORRUPT).isNotNull(), "malformed_row")
        .when(F.col("query").contains("\ufffd"), "bad_encoding")
        .when(F.col(NORM).isNull() | (F.col(NORM) == ""), "empty_query")
        .when(F.length(F.col(NORM)) > max_query_chars, "too_long")
    )
    if labels:
        reason = reason.when(label.isNotNull() & ~label.isin(list(labels)), "unknown_label")
    reason = reason.when(ts.isNotNull() & F.try_to_timestamp(ts).isNull(), "bad_timestamp")
    return df.withColumn("reason", reason)


def clean_rows(tagged: DataFrame) -> DataFrame:
    """The rows that passed: normalized ``query``, ``label`` (null when unlabeled), ``ts`` as a
    timestamp, extra columns as they came, ``source_file``."""
    extras = [
        c for c in tagged.columns if c not in ("query", "label", "ts", NORM, CORRUPT, "reason")
    ]
    label = _blank_to_null(F.col("label")) if "label" in tagged.columns else F.lit(None)
    ts = F.try_to_timestamp(_blank_to_null(F.col("ts"))) if "ts" in tagged.columns else F.lit(None)
    return tagged.where(F.col("reason").isNull()).select(
        F.col(NORM).alias("query"),
        label.cast("string").alias("label"),
        ts.cast("timestamp").alias("ts"),
        *[c for c in extras if c != SOURCE],
        SOURCE,
    )


def quarantined_rows(tagged: DataFrame) -> DataFrame:
    """The rows that failed, with every input column as it came, and their ``reason``."""
    keep = [c for c in tagged.columns if c != NORM]
    return tagged.where(F.col("reason").isNotNull()).select(*keep)


def ingest_path(ctx: RunContext, out: Path, path: str, fmt: str, key: str) -> StageResult:
    """Read, normalize, tag and write one input location; return its reconciled counts."""
    cfg = ctx.cfg
    raw = read_raw(ctx.spark, path, fmt, key)
    tagged = tag_reasons(normalize_queries(raw), cfg.ingest.max_query_chars, cfg.data.labels)
    tagged = tagged.persist()
    try:
        counts = count_by_reason(tagged)
        passed = counts.pop(None, 0)
        rows_in = passed + sum(counts.values())
        if rows_in == 0:
            raise DataError(f"no rows: {key} = {path} holds files but no data rows")
        clean_rows(tagged).write.mode("overwrite").parquet(str(out / ROWS_DIR))
        if counts:
            write_quarantine(quarantined_rows(tagged), out, STAGE)
    finally:
        tagged.unpersist()
    return StageResult(
        rows_in=rows_in,
        rows_out=passed,
        rows_quarantined=sum(counts.values()),
        quarantined_by_reason=dict(sorted(counts.items())),
        params={"raw_path": path, "raw_format": fmt},
    )


def raw_location(ctx: RunContext) -> str:
    """The configured raw path, or the generate stage's output when none is configured."""
    return ctx.cfg.data.raw_path or str(ctx.require("generate"))


def run(ctx: RunContext, out: Path) -> StageResult:
    fmt = ctx.cfg.data.raw_format if ctx.cfg.data.raw_path else ctx.cfg.generate.format
    return ingest_path(ctx, out, raw_location(ctx), fmt, "data.raw_path")


def main(argv: list[str] | None = None) -> int:
    """``spark-submit jobs/ingest.py --env E --set k=v``."""
    from pipelines.cli import stage_main

    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
