"""The label store: labels for selected queries come back and join the labeled data, with lineage.

``zipfline label import PATH`` reads ``query,label``
rows from CSV, JSONL or Parquet, checks them against the log (the latest run's distinct
queries and its labels), and writes the good ones to ``<data.root>/labels/import-<id>/`` with
who labeled them, when, and in which selection round. Nothing is overwritten: a label that
disagrees with an earlier one for the same query (imported or from the log) is kept beside it,
flagged ``conflict`` and counted; the next dedupe merges every imported label into the query's
label counts. Bad rows go to ``labels/_quarantine/import-<id>/`` with their reason
(``empty_query``, ``missing_label``, ``unknown_label``, ``unknown_query``, …); the counts
reconcile: ``rows_in = imported + quarantined + merged`` (merged: repeats within the file). The
same content imported twice is recognised by its id and not imported again.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from core import atomic
from core.config import Config
from core.errors import DataError, StageError
from core.layout import LABELS_DIR, MARKER, ROWS_DIR, SELECTED_DIR, data_files, data_root
from data_quality.quarantine import count_by_reason, write_quarantine
from querylog.clean import NORM, normalize_queries, tag_reasons
from querylog.readers import SOURCE, read_raw

IMPORT_PREFIX = "import-"
QUARANTINE = "_quarantine"
IMPORTS_LOG = "_imports.jsonl"
STORE_COLUMNS = (
    "query", "label", "labeled_by", "labeled_at", "round", "import_id", SOURCE, "conflict",
)  # fmt: skip


@dataclass
class ImportResult:
    """What one import did; ``rows_in = imported + quarantined + merged``."""

    import_id: str
    rows_in: int = 0
    imported: int = 0
    quarantined: int = 0
    merged: int = 0
    conflicts: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    already: bool = False

    def describe(self) -> str:
        if self.already:
            return f"labels {self.import_id} were imported before: nothing to do"
        text = (
            f"imported {self.imported:,} of {self.rows_in:,} label rows (import {self.import_id})"
        )
        if self.conflicts:
            text += f"; {self.conflicts:,} disagree with an earlier label (kept, flagged conflict)"
        if self.merged:
            text += f"; {self.merged:,} repeated rows merged"
        if self.quarantined:
            reasons = ", ".join(f"{k} {v:,}" for k, v in self.quarantined_by_reason.items())
            text += f"; quarantined {self.quarantined:,} ({reasons})"
        return text


def labels_root(cfg: Config) -> Path:
    return data_root(cfg) / LABELS_DIR


def read_labels(spark: SparkSession, root: Path) -> DataFrame | None:
    """Every imported label (``STORE_COLUMNS``), or None when nothing was imported yet."""
    parts = sorted(str(p) for p in (root / LABELS_DIR).glob(f"{IMPORT_PREFIX}*") if p.is_dir())
    return spark.read.parquet(*parts) if parts else None


def latest_run_with(root: Path, stage: str) -> Path | None:
    """The newest run-date folder under ``root`` whose ``stage`` finished."""
    runs = sorted(p for p in root.glob("????-??-??") if (p / stage / MARKER).exists())
    return runs[-1] if runs else None


def selection_rounds(spark: SparkSession, root: Path) -> DataFrame | None:
    """``query → round`` of every selection made so far (the latest round a query was in)."""
    parts = [str(p / "select" / SELECTED_DIR) for p in sorted(root.glob("????-??-??"))
             if (p / "select" / MARKER).exists()]  # fmt: skip
    if not parts:
        return None
    return spark.read.parquet(*parts).groupBy("query").agg(F.max("round").alias("_sel_round"))


def tag_label_rows(
    raw: DataFrame, cfg: Config, known_queries: DataFrame, known_labels: list[str]
) -> DataFrame:
    """``reason`` per import row: ingest's checks on the query, then ``missing_label``,
    ``unknown_label`` (not among ``data.labels``, or when that is empty, never seen in the log
    or in earlier imports) and ``unknown_query`` (not a query of the log)."""
    tagged = tag_reasons(normalize_queries(raw), cfg.ingest.max_query_chars, cfg.data.labels)
    label = F.trim(F.col("label"))
    tagged = tagged.withColumn("_label", F.when(label != "", label))
    known = known_queries.select(F.col("query").alias(NORM), F.lit(True).alias("_known"))
    tagged = tagged.join(known, NORM, "left")
    extra = F.when(F.col("_label").isNull(), "missing_label")
    if not cfg.data.labels:
        extra = extra.when(~F.col("_label").isin(known_labels), "unknown_label")
    extra = extra.when(F.col("_known").isNull(), "unknown_query")
    return tagged.withColumn("reason", F.coalesce(F.col("reason"), extra)).drop("_known")


def import_labels(
    spark: SparkSession,
    cfg: Config,
    raw: DataFrame,
    *,
    import_id: str,
    by: str,
    source: str,
    round_: str | None = None,
) -> ImportResult:
    """Check ``raw`` (``query``, ``label``, optional ``round``; read from ``source``) and add its
    good rows to the label store with lineage; see the module docstring."""
    root = data_root(cfg)
    store = root / LABELS_DIR
    target = store / f"{IMPORT_PREFIX}{import_id}"
    if target.exists():
        return ImportResult(import_id, already=True)
    if "label" not in raw.columns:
        found = ", ".join(c for c in raw.columns if not c.startswith("_") and c != SOURCE)
        raise DataError(f"label import {source}: no 'label' column (found: {found})")
    run = latest_run_with(root, "dedupe")
    if run is None:
        raise StageError(
            f"label import: no finished dedupe under {root} to check the queries against "
            "(run the pipeline first: zipfline run)"
        )
    log_rows = spark.read.parquet(str(run / "dedupe" / ROWS_DIR))
    earlier = read_labels(spark, root)
    log_labels = log_rows.select("query", F.explode(F.map_keys("label_counts")).alias("label"))
    seen = log_labels if earlier is None else log_labels.union(earlier.select("query", "label"))
    known_labels = sorted(r["label"] for r in seen.select("label").distinct().collect())
    tagged = tag_label_rows(raw, cfg, log_rows.select("query"), known_labels).persist()
    try:
        counts = count_by_reason(tagged)
        passed = counts.pop(None, 0)
        result = ImportResult(
            import_id,
            rows_in=passed + sum(counts.values()),
            quarantined=sum(counts.values()),
            quarantined_by_reason=dict(sorted(counts.items())),
        )
        if result.rows_in == 0:
            raise DataError(f"label import {source}: no rows")
        if counts:
            bad = tagged.where(F.col("reason").isNotNull()).drop(NORM, "_label")
            write_quarantine(bad, store / QUARANTINE / target.name, "label_import")
        good = tagged.where(F.col("reason").isNull())
        rows = with_lineage(spark, root, good, import_id=import_id, by=by, round_=round_)
        rows = flag_conflicts(rows, seen).persist()
        stats = rows.agg(
            F.count(F.lit(1)).alias("n"), F.sum(F.col("conflict").cast("int")).alias("c")
        ).first()
        result.imported, result.conflicts = int(stats["n"]), int(stats["c"] or 0)
        result.merged = passed - result.imported
        if result.imported:
            with atomic.atomic_dir(target) as tmp:
                rows.select(*STORE_COLUMNS).write.mode("overwrite").parquet(str(tmp))
        rows.unpersist()
    finally:
        tagged.unpersist()
    entry = asdict(result) | {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "by": by}
    with (store / IMPORTS_LOG).open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return result


def with_lineage(
    spark: SparkSession, root: Path, good: DataFrame, *, import_id: str, by: str, round_: str | None
) -> DataFrame:
    """One row per distinct (query, label) of the good rows, with who, when, which round: the
    ``round_`` given, else the file's ``round`` column, else the selection that picked it."""
    round_col = F.lit(round_)
    if round_ is None and "round" in good.columns:
        round_col = F.when(F.trim(F.col("round")) != "", F.trim(F.col("round")))
    rows = good.select(
        F.col(NORM).alias("query"),
        F.col("_label").alias("label"),
        round_col.cast("string").alias("round"),
        F.col(SOURCE) if SOURCE in good.columns else F.lit(None).cast("string").alias(SOURCE),
    )
    rows = rows.groupBy("query", "label").agg(
        F.max("round").alias("round"), F.min(SOURCE).alias(SOURCE)
    )
    if round_ is None:
        rounds = selection_rounds(spark, root)
        if rounds is not None:
            rows = rows.join(rounds, "query", "left").withColumn(
                "round", F.coalesce("round", "_sel_round")
            )
    return rows.select(
        "query", "label",
        F.lit(by).alias("labeled_by"),
        F.current_timestamp().alias("labeled_at"),
        "round",
        F.lit(import_id).alias("import_id"),
        SOURCE,
    )  # fmt: skip


def flag_conflicts(rows: DataFrame, seen: DataFrame) -> DataFrame:
    """``conflict``: the query has another label, in the log, an earlier import or this one."""
    everything = rows.select("query", "label").union(seen.select("query", "label")).distinct()
    disputed = everything.groupBy("query").agg(F.count(F.lit(1)).alias("_labels"))
    return rows.join(disputed, "query", "left").withColumn(
        "conflict", F.coalesce(F.col("_labels") > 1, F.lit(False))
    )


def content_id(path: str, by: str, round_: str | None) -> str:
    """The import's id: a hash of the files' bytes (so the same file is not imported twice), who
    imports it and the round; for a remote path, of the path and the time."""
    h = hashlib.sha256(f"{by}\0{round_}\0".encode())
    local = Path(path).expanduser()
    if "://" in path or not local.exists():
        h.update(f"{path}\0{dt.datetime.now(dt.UTC).isoformat()}".encode())
    else:
        for p in data_files(local):
            h.update(p.name.encode())
            with p.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:12]


def import_path(
    spark: SparkSession, cfg: Config, path: str, *, fmt: str = "auto", by: str | None = None,
    round_: str | None = None,
) -> ImportResult:  # fmt: skip
    """``zipfline label import PATH``: read the file(s) and import them."""
    who = by or _user()
    import_id = content_id(path, who, round_)
    if (labels_root(cfg) / f"{IMPORT_PREFIX}{import_id}").exists():
        return ImportResult(import_id, already=True)
    raw = read_raw(spark, path, fmt, "label import PATH")
    return import_labels(spark, cfg, raw, import_id=import_id, by=who, source=path, round_=round_)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # cron, containers: no user name to be had
        return "unknown"
