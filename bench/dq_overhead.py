"""What the data quality gates cost: the data stages with and without them, on the same log.

Generates a log once (1M events by default), then runs ingest → dedupe → split → shard twice on
``local[2]``, once with ``dq.enabled=false`` and once with the Great Expectations gates (after
ingest, dedupe, split and shard), and prints each stage's seconds, the gate's share and the
total overhead. Great Expectations' import is started in the background when the run starts,
as ``zipfline run`` does; the target is at most 25% on top of the data stages.

    .venv/bin/python bench/dq_overhead.py [--events 1000000] [--root /tmp/zipfline-dq-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from core.config import load_config
from core.layout import RunContext
from core.spark import get_spark
from data_quality.gates import preload
from pipelines.stages import run_stage

STAGES = ("ingest", "dedupe", "split", "shard")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--root", type=Path, default=Path("/tmp/zipfline-dq-bench"))
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    shutil.rmtree(args.root, ignore_errors=True)
    base = [
        f"data.root={args.root / 'data'}",
        f"tracking.uri=sqlite:///{args.root / 'mlflow.db'}",
        "spark.master=local[2]",
        "spark.driver_memory=6g",
        "spark.shuffle_partitions=16",
        f"generate.num_events={args.events}",
        f"generate.num_queries={args.events // 10}",
        "generate.format=parquet",
    ]
    loading = preload()
    spark = get_spark(load_config("local", base).spark)
    first = RunContext(load_config("local", base), "2026-03-01", spark=spark)
    run_stage(first, "generate")
    seconds: dict[str, dict[str, float]] = {}
    # a warm-up pass first (the JVM compiles the stages' code on first use), then with the
    # gates, then without: what is left of the warm-up favours the last pass, against the gates
    for label, date, extra in (("warm-up", "2026-03-04", ["dq.enabled=false"]),
                               ("with gates", "2026-03-02", []),
                               ("without gates", "2026-03-03", ["dq.enabled=false"])):  # fmt: skip
        ctx = RunContext(load_config("local", [*base, *extra]), date, spark=spark)
        ctx.run_dir.mkdir(parents=True)
        (ctx.run_dir / "generate").symlink_to(first.stage_dir("generate"))
        if label == "with gates":
            t0 = time.perf_counter()
            loading.join()  # in a pipeline run this overlaps with generate
            print(f"Great Expectations import still to wait for: {time.perf_counter() - t0:.1f} s")
        seconds[label] = {}
        for name in STAGES:
            t0 = time.perf_counter()
            result = run_stage(ctx, name)
            seconds[label][name] = time.perf_counter() - t0
            ok = result.metrics.get(f"dq_{name}_success", "-")
            print(
                f"  {label:<14}{name:<8}{seconds[label][name]:>7.1f} s  dq success {ok}", flush=True
            )
    off, on = seconds["without gates"], seconds["with gates"]
    print(f"\n{args.events:,} events, local[2]")
    print(f"{'stage':<8}{'without':>10}{'with':>10}{'gate':>10}")
    for name in STAGES:
        print(f"{name:<8}{off[name]:>9.1f}s{on[name]:>9.1f}s{on[name] - off[name]:>+9.1f}s")
    total_off, total_on = sum(off.values()), sum(on.values())
    print(f"{'all':<8}{total_off:>9.1f}s{total_on:>9.1f}s{total_on - total_off:>+9.1f}s"
          f"   overhead {100 * (total_on - total_off) / total_off:.0f}% (target ≤ 25%)")  # fmt: skip


if __name__ == "__main__":
    main()
