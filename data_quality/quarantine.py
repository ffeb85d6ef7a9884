"""The quarantine writer: bad rows are written out with their reason, never dropped
(docs/architecture.md, "Data contract").

A quarantine row carries every input column as it came, plus ``reason`` (a short code) and
``stage``; the stage's counts by reason come from the same frame, so they reconcile.
"""

from __future__ import annotations

from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

QUARANTINE_DIR = "quarantine"


def count_by_reason(tagged: DataFrame, reason_col: str = "reason") -> dict[str, int]:
    """Rows per reason; the key ``None`` holds the rows that passed."""
    return {
        row[reason_col]: int(row["count"]) for row in tagged.groupBy(reason_col).count().collect()
    }


def write_quarantine(bad: DataFrame, stage_out: Path, stage: str, part: str = "rows") -> Path:
    """Write ``bad`` (which has a ``reason`` column) under ``<stage_out>/quarantine/<part>/``.

    A stage that quarantines rows of different shapes (its input, an external file) writes
    each shape as its own part.
    """
    path = stage_out / QUARANTINE_DIR / part
    bad.withColumn("stage", F.lit(stage)).write.mode("overwrite").parquet(str(path))
    return path
