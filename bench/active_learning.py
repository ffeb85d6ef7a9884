"""Active learning against random labeling: test accuracy and breadth per label bought.

Generates a log once with most events unlabeled (a small labeled seed, a large pool) and an
external test set of distinct queries drawn from the generator's universe (label: the
majority label, so accuracy means "the right category"). Then, for each strategy, rounds of
select → oracle (``label.oracle=generator``) → retrain: round 0 trains on the log's own
labels and selects ``--budget`` queries; every next round reruns the pipeline from dedupe,
which merges the answers, and selects again. ``registry.margin`` is -1 so every round's model
becomes the champion: the bench measures the strategies, not the promotion gate. Prints a
table and the labels each strategy needed to reach random's final accuracy (target: at most
50% of random's), and saves ``active_learning.png`` and ``active_learning.json``.

    .venv/bin/python bench/active_learning.py [--rounds 6] [--budget 150] [--events 60000]
        [--strategies margin,entropy,least_confidence,random] [--root /tmp/zipfline-al-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import load_config
from core.layout import TRUTH_DIR, RunContext
from core.spark import get_spark
from pipelines.flow import run_pipeline
from querylog.generator import generate_log

RUN_DATE = "2026-06-01"


def external_test_set(truth_file: Path, out: Path, size: int, seed: int) -> int:
    """``size`` distinct queries of the universe, uniformly, with their majority label."""
    truth = pd.read_parquet(truth_file, columns=["query", "majority_label"])
    rng = np.random.default_rng(seed)
    picked = truth.iloc[rng.choice(len(truth), size=min(size, len(truth)), replace=False)]
    picked.rename(columns={"majority_label": "label"}).to_csv(out, index=False)
    return len(picked)


def labels_to_reach(curve: list[dict], accuracy: float) -> float | None:
    """Labels at which a curve first reaches ``accuracy`` (linear between rounds)."""
    for before, after in zip(curve, curve[1:], strict=False):
        if before["accuracy"] >= accuracy:
            return float(before["labels"])
        if after["accuracy"] >= accuracy:
            share = (accuracy - before["accuracy"]) / (after["accuracy"] - before["accuracy"])
            return before["labels"] + share * (after["labels"] - before["labels"])
    return float(curve[0]["labels"]) if curve and curve[0]["accuracy"] >= accuracy else None


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    from trainers.plots import pyplot, save

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        x = [p["labels"] for p in curve]
        style = "k--" if name == "random" else "-"
        axes[0].plot(x, [p["accuracy"] for p in curve], style, marker="o", label=name)
        axes[1].plot(x, [p["breadth"] for p in curve], style, marker="o", label=name)
    axes[0].set_ylabel("test accuracy (distinct queries)")
    axes[1].set_ylabel("breadth (labels with recall ≥ 0.8)")
    for ax in axes:
        ax.set_xlabel("labels bought")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("active learning vs random labeling")
    save(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="selection rounds after round 0")
    parser.add_argument("--budget", type=int, default=150, help="labels bought per round")
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=8_000)
    parser.add_argument("--test-size", type=int, default=2_000)
    parser.add_argument("--strategies", default="margin,entropy,least_confidence,random")
    parser.add_argument("--root", type=Path, default=Path("/tmp/zipfline-al-bench"))
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    shutil.rmtree(args.root, ignore_errors=True)
    raw, test = args.root / "log", args.root / "test.csv"
    common = [
        f"data.raw_path={raw}", f"data.test_path={test}",
        f"generate.num_events={args.events}", f"generate.num_queries={args.queries}",
        "generate.unlabeled_fraction=0.8", "generate.format=parquet",
        "spark.master=local[2]", "spark.shuffle_partitions=4", "spark.driver_memory=4g",
        "dq.enabled=false", "eval.decompose=false", "eval.bootstrap_rounds=0",
        "featurizer.num_buckets=262144", "model.dim=32", "train.world_size=1",
        "train.epochs=10", "train.time_budget_s=60", "shard.sampling=unique",
        f"select.budget={args.budget}", "label.oracle=generator", "label.oracle_answer=sample",
        "registry.margin=-1",
    ]  # fmt: skip
    base = load_config("local", common)
    spark = get_spark(base.spark)
    generate_log(spark, base.generate, raw)
    n_test = external_test_set(raw / TRUTH_DIR / "queries.parquet", test, args.test_size, 1)
    print(f"log: {args.events:,} events over {args.queries:,} queries, 80% of events unlabeled; "
          f"test: {n_test:,} distinct queries of the universe", flush=True)  # fmt: skip
    curves: dict[str, list[dict]] = {}
    for strategy in args.strategies.split(","):
        home = args.root / strategy
        cfg = load_config("local", [*common, f"data.root={home / 'data'}",
                                    f"tracking.uri=sqlite:///{home / 'mlflow.db'}",
                                    f"select.strategy={strategy}"])  # fmt: skip
        curve = curves[strategy] = []
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            ctx = RunContext(cfg, RUN_DATE, force=True, spark=spark)
            last = r == args.rounds
            summary = run_pipeline(
                ctx, start="ingest" if r == 0 else "dedupe", stop="evaluate" if last else None
            )
            m = summary.results["evaluate"].metrics
            imported = summary.results["dedupe"].metrics.get("labels_imported", 0)
            point = {
                "round": r, "labels": int(imported), "accuracy": 1 - m["test_error"],
                "breadth": m["breadth"], "acc_tail": m["acc_tail"],
                "n_train": int(summary.results["shard"].rows_in), "seconds": time.perf_counter() - t0,
            }  # fmt: skip
            curve.append(point)
            print(f"{strategy:<17} round {r}: labels {point['labels']:>5}  accuracy "
                  f"{point['accuracy']:.4f}  breadth {point['breadth']:.3f}  "
                  f"({point['seconds']:.0f} s)", flush=True)  # fmt: skip
    print(
        f"\n{'strategy':<17}{'round':>6}{'labels':>8}{'accuracy':>10}{'breadth':>9}{'acc_tail':>10}"
    )
    for strategy, curve in curves.items():
        for p in curve:
            print(f"{strategy:<17}{p['round']:>6}{p['labels']:>8}{p['accuracy']:>10.4f}"
                  f"{p['breadth']:>9.3f}{p['acc_tail']:>10.4f}")  # fmt: skip
    verdict = {}
    if "random" in curves:
        goal = curves["random"][-1]["accuracy"]
        spent = curves["random"][-1]["labels"]
        print(f"\nrandom's final accuracy {goal:.4f} after {spent} labels; labels to reach it:")
        for strategy, curve in curves.items():
            need = labels_to_reach(curve, goal)
            share = None if need is None else need / spent
            verdict[strategy] = {"labels": need, "share_of_random": share}
            text = "not reached" if need is None else f"{need:,.0f} ({share:.0%} of random's)"
            print(f"  {strategy:<17}{text}")
    (args.root / "active_learning.json").write_text(
        json.dumps({"curves": curves, "to_reach_random": verdict}, indent=2)
    )
    plot(curves, args.root / "active_learning.png")
    print(
        f"\nplot: {args.root / 'active_learning.png'}  data: {args.root / 'active_learning.json'}"
    )
    spark.stop()


if __name__ == "__main__":
    main()
