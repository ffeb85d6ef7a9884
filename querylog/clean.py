"""Cleaning raw query rows: normalization and the first quarantine reason of each row.

Shared by ingest (the log), split (the external test file) and label import, so that a query
reads the same wherever it comes from. Reasons: ``malformed_row`` (a line the parser could not
split into the columns), ``bad_encoding`` (undecodable bytes), ``empty_query`` (null or blank
after normalization), ``too_long`` (above ``ingest.max_query_chars``), ``unknown_label`` (not in
``data.labels``, when that is set), ``bad_timestamp`` (a ``ts`` that is not ISO-8601).
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from querylog.readers import CORRUPT, SOURCE
from trainers.featurizer import normalize_query

NORM = "_query_norm"


@F.pandas_udf(T.StringType())  # a type object: no session needed at import
def _normalize(queries: pd.Series) -> pd.Series:
    return queries.map(normalize_query, na_action="ignore")


def normalize_queries(df: DataFrame) -> DataFrame:
    """Add the normalized query (NFKC, controls, case folding, whitespace) as ``_query_norm``.

    A query of ASCII characters only (as many bytes as characters) is normalized by Spark's own
    functions, in the JVM: there NFKC changes nothing, case folding is lowercasing, and the
    control characters and whitespace are the bytes up to 0x20 and 0x7f, each run of which
    becomes one space. Only the other queries go through :func:`normalize_query` in Python; the
    ASCII ones reach it as nulls, which it passes over."""
    query = F.col("query")
    ascii_only = F.length(query) == F.octet_length(query)
    in_jvm = F.trim(F.regexp_replace(F.lower(query), r"[\x00-\x20\x7f]+", " "))
    in_python = _normalize(F.when(~ascii_only, query))
    return df.withColumn(NORM, F.when(ascii_only, in_jvm).otherwise(in_python))


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
