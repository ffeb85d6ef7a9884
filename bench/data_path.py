"""Data path throughput: events/s of every data stage at 1M and 10M events, and peak memory.

Runs generate → ingest → dedupe (exact, then near) → split → augment → shard on ``local[2]``
(or ``--master``) for each size, each stage through the same code as ``zipfline run``, and
prints seconds and events/s per stage, the peak resident memory of the JVM and of the whole
process tree (driver, JVM, Python workers), near-duplicate precision and recall on the
generator's planted groups, and, as a reference on the same ingested files, the same exact
dedupe (group by normalized query) in DuckDB. Needs the bench extra (``pip install -e
'.[bench]'``: DuckDB) and, for augment, WordNet (``make wordnet``).

    .venv/bin/python bench/data_path.py [--events 1000000 10000000] [--root /tmp/zipfline-bench]

With ``--csv FILE`` it times ingest plus exact dedupe of that one CSV file against plain Spark
SQL doing the same trim, lowercase and group-by, and prints both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil

from core.config import load_config
from core.layout import ROWS_DIR, TRUTH_DIR, RunContext
from core.spark import get_spark
from pipelines.stages import run_stage
from querylog.neardup import pair_scores

STAGES = ("generate", "ingest", "dedupe_exact", "dedupe_near", "split", "augment", "shard")


@dataclass
class PeakMemory:
    """Samples the RSS of this process and its descendants every ``every`` seconds."""

    every: float = 0.25
    jvm: int = 0
    tree: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every):
            total = jvm = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    total += rss
                    if "java" in proc.name():
                        jvm += rss
                except psutil.Error:
                    continue
            self.tree, self.jvm = max(self.tree, total), max(self.jvm, jvm)


def duckdb_exact_dedupe(ingested: Path) -> tuple[float, int]:
    """Seconds and distinct queries of ``group by query`` over the ingested Parquet in DuckDB."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads TO 2")
    t0 = time.perf_counter()
    sql = f"""
        SELECT query, count(*) AS n, count(label) AS num_labeled, min(ts) AS first_seen,
               max(ts) AS last_seen
        FROM read_parquet('{ingested}/*.parquet') GROUP BY query
    """  # noqa: S608 - a local path of ours
    rows = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]
    return time.perf_counter() - t0, int(rows)


def distinct_queries(events: int) -> int:
    """The generator's universe for ``events``: 100k queries at 1M events, growing by Heaps' law
    (V ∝ N^0.6), as the distinct queries of a real log grow slower than its events."""
    return int(100_000 * (events / 1_000_000) ** 0.6)


def run_size(events: int, root: Path, master: str, memory: str) -> dict[str, object]:
    base = [
        f"data.root={root / 'data'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"spark.master={master}",
        f"spark.driver_memory={memory}",
        "spark.shuffle_partitions=16",
        f"generate.num_events={events}",
        f"generate.num_queries={distinct_queries(events)}",
        "generate.format=parquet",
        "generate.num_files=8",
        "augment.enabled=true",
    ]
    cfg = load_config("local", base)
    exact_cfg = load_config("local", [*base, "dedupe.near_enabled=false"])
    spark = get_spark(cfg.spark)
    date = f"2026-01-{events // 1_000_000 % 28 + 1:02d}"
    ctx = RunContext(cfg, date, force=True, spark=spark)
    exact_ctx = RunContext(exact_cfg, "2026-02-01", force=True, spark=spark)
    shutil.rmtree(ctx.run_dir, ignore_errors=True)
    shutil.rmtree(exact_ctx.run_dir, ignore_errors=True)
    out: dict[str, object] = {"events": events}
    with PeakMemory() as mem:
        for name in STAGES:
            if name == "dedupe_exact":
                exact_ctx.run_dir.mkdir(parents=True, exist_ok=True)
                (exact_ctx.run_dir / "ingest").symlink_to(ctx.stage_dir("ingest"))
                target = exact_ctx
            else:
                target = ctx
            t0 = time.perf_counter()
            result = run_stage(target, "dedupe" if name.startswith("dedupe") else name)
            out[name] = time.perf_counter() - t0
            print(f"  {events:>11,} events  {name:<13}{out[name]:>8.1f} s  "
                  f"{events / out[name]:>11,.0f} events/s  rows out {result.rows_out:,}",
                  flush=True)  # fmt: skip
            if name == "dedupe_near":
                out["clusters"] = result.metrics.get("clusters")
    out["peak_jvm_gb"] = mem.jvm / 2**30
    out["peak_tree_gb"] = mem.tree / 2**30
    rows = pd.read_parquet(ctx.stage_dir("dedupe") / "rows", columns=["query", "cluster_id"])
    truth = pd.read_parquet(
        ctx.stage_dir("generate") / TRUTH_DIR / "queries.parquet",
        columns=["query", "group"],
    )
    precision, recall = pair_scores(
        rows.set_index("query")["cluster_id"], truth.set_index("query")["group"]
    )
    out["near_precision"], out["near_recall"] = precision, recall
    out["duckdb_s"], out["duckdb_rows"] = duckdb_exact_dedupe(ctx.stage_dir("ingest") / ROWS_DIR)
    out["distinct"] = len(rows)
    shutil.rmtree(exact_ctx.run_dir, ignore_errors=True)
    return out


def single_csv(csv_file: Path, root: Path, master: str, memory: str) -> None:
    """Ingest plus exact dedupe of one large CSV file (gates and near-duplicates off), against
    plain Spark SQL doing the same trim, lowercase, drop and group-by on the same file; prints
    both times and their ratio (the target is at most 1.5×)."""
    from pyspark.sql import functions as F

    cfg = load_config("local", [
        f"data.root={root / 'single'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"data.raw_path={csv_file}", f"spark.master={master}", f"spark.driver_memory={memory}",
        "dq.enabled=false", "dedupe.near_enabled=false",
    ])  # fmt: skip
    spark = get_spark(cfg.spark)
    ctx = RunContext(cfg, "2026-03-01", force=True, spark=spark)
    shutil.rmtree(ctx.run_dir, ignore_errors=True)

    def plain_sql() -> float:
        t0 = time.perf_counter()
        query = F.lower(F.trim(F.col("query")))
        (spark.read.option("header", True).csv(str(csv_file))
         .select(query.alias("query"), "label").where(F.col("query") != "")
         .groupBy("query").agg(F.count(F.lit(1)).alias("n"), F.count("label").alias("num_labeled"))
         .write.mode("overwrite").parquet(str(root / "single-sql")))  # fmt: skip
        return time.perf_counter() - t0

    # plain SQL both first (on a cold JVM, as zipfline would be) and last (warm): the JVM's
    # warm-up is a few seconds either way
    cold = plain_sql()
    print(f"  plain Spark SQL   {cold:>8.1f} s  (first job of the JVM)", flush=True)
    times = {}
    for name in ("ingest", "dedupe"):
        t0 = time.perf_counter()
        result = run_stage(ctx, name)
        times[name] = time.perf_counter() - t0
        print(
            f"  zipfline {name:<8}{times[name]:>8.1f} s  rows out {result.rows_out:,}", flush=True
        )
    warm = plain_sql()
    print(f"  plain Spark SQL   {warm:>8.1f} s  (again, warm)")
    ours, plain = times["ingest"] + times["dedupe"], (cold + warm) / 2
    print(f"one CSV file of {csv_file.stat().st_size / 2**20:,.0f} MiB: ingest + exact dedupe "
          f"{ours:.1f} s, plain Spark SQL {plain:.1f} s (mean of cold and warm): "
          f"{ours / plain:.2f}× (target 1.5×)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/zipfline-bench"))
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--csv", type=Path, metavar="FILE",
                        help="instead: one large CSV file, ingest + exact dedupe vs plain Spark SQL")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if args.csv:
        print(f"one CSV file on {args.master}, {os.cpu_count()} cores")
        single_csv(args.csv.resolve(), args.root, args.master, args.driver_memory)
        return
    print(f"data path on {args.master}, driver memory {args.driver_memory}, {os.cpu_count()} cores")
    results = [run_size(n, args.root, args.master, args.driver_memory) for n in args.events]
    names = list(STAGES)
    print(f"\n{'events':>12}" + "".join(f"{n:>14}" for n in names) + f"{'all stages':>12}")
    for r in results:
        total = sum(r[n] for n in names)
        print(
            f"{r['events']:>12,}" + "".join(f"{r[n]:>12.1f} s" for n in names) + f"{total:>10.1f} s"
        )
        print(f"{'events/s':>12}" + "".join(f"{r['events'] / r[n]:>14,.0f}" for n in names))
        print(f"{'':>12}  peak memory: JVM {r['peak_jvm_gb']:.2f} GB, process tree "
              f"{r['peak_tree_gb']:.2f} GB;  near-dup precision {r['near_precision']:.3f} recall "
              f"{r['near_recall']:.3f};  DuckDB exact dedupe {r['duckdb_s']:.1f} s "
              f"({r['duckdb_rows']:,} distinct, Spark {r['distinct']:,})")  # fmt: skip
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        growth = hi["dedupe_near"] / lo["dedupe_near"]
        print(f"near dedupe time {lo['events']:,} → {hi['events']:,} events: ×{growth:.1f} "
              f"(events ×{hi['events'] / lo['events']:.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
