"""``zipfline sweep``: Bottou's trade-off figure for the user's own data.

A grid over time budget × training rows × capacity × precision (``sweep.*``), each point a short
single-process training on the run date's shards, run in parallel on Dask workers and scored on
the test split, each a child run of one MLflow sweep parent. The parent gets ``tradeoff.png``
(test error against compute time, the lower envelope drawn) and ``sweep.json``; the command
prints the best configuration per budget.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

from core.layout import RunContext
from trainers.spec import TrainSpec

SWEEP_TAG = "sweep"


def grid(ctx: RunContext) -> list[dict[str, Any]]:
    """The sweep's points: every combination of the configured values."""
    s = ctx.cfg.sweep
    return [
        {"time_budget_s": b, "fraction": f, "dim": d, "precision": p}
        for b, f, d, p in itertools.product(s.budgets_s, s.fractions, s.dims, s.precisions)
    ]


def point_spec(base: TrainSpec, point: dict[str, Any]) -> TrainSpec:
    """The training spec of one point: one process, the point's budget, size and precision,
    in the torch loop (the numba kernel has no bf16: the precision axis compares one learner
    with itself)."""
    spec = base.with_train(
        time_budget_s=point["time_budget_s"], precision=point["precision"], world_size=1,
        mode="sync", kernel="torch",
        epochs=None if base.train.epochs is None else max(base.train.epochs, 50),
    )  # fmt: skip
    return spec.with_model(dim=point["dim"])


def run_sweep(ctx: RunContext) -> dict[str, Any]:
    """Train and score every point; log the sweep; return the points and the best per budget."""
    # pandas, MLflow, Dask and the plots: only when a sweep runs (the CLI starts faster)
    import pandas as pd

    from pipelines.tracking import Tracker
    from trainers.decompose import run_references
    from trainers.evaluate import read_test_split
    from trainers.plots import lower_envelope, tradeoff

    shard_dir = ctx.require("shard")
    test_frame = read_test_split(ctx.require("split"))
    points = grid(ctx)
    out = ctx.run_dir / "sweep"
    # every point trains into a temporary folder of its own (trainers.decompose.reference_run)
    base = TrainSpec.from_config(ctx.cfg, shard_dir, out)
    jobs = [(point_spec(base, p), p["fraction"]) for p in points]
    print(f"zipfline sweep {ctx.run_date}: {len(points)} points on Dask "
          f"({ctx.cfg.eval.dask_scheduler or f'LocalCluster, {ctx.cfg.sweep.workers} workers'}) "
          f"over the shards in {shard_dir}", file=sys.stderr, flush=True)  # fmt: skip
    results = run_references(
        None, test_frame, scheduler=ctx.cfg.eval.dask_scheduler or None,
        workers=ctx.cfg.sweep.workers, jobs=jobs,
    )  # fmt: skip
    rows = [p | r for p, r in zip(points, results, strict=True)]
    for row in rows:
        row["compute_s"] = row["time_used_s"]
    best: dict[str, dict[str, Any]] = {}
    for budget in ctx.cfg.sweep.budgets_s:
        mine = [r for r in rows if r["time_budget_s"] == budget]
        best[str(budget)] = min(mine, key=lambda r: r["test_error"])
    tracker = Tracker(ctx.cfg.tracking)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"points": rows, "best": best}, indent=2))
    tradeoff(rows, out / "tradeoff.png")
    with tracker.parent(ctx.run_date, "sweep", {"sweep.points": len(rows)}, kind=SWEEP_TAG) as rid:
        for row in rows:
            name = (f"budget={row['time_budget_s']:g}s n={row['fraction']:g} "
                    f"dim={row['dim']} {row['precision']}")  # fmt: skip
            with tracker.mlflow.start_run(run_name=name, nested=True, tags={"stage": "sweep"}):
                tracker.mlflow.log_params({k: row[k] for k in ("time_budget_s", "fraction", "dim",
                                                                "precision")})  # fmt: skip
                tracker.mlflow.log_metrics({k: float(row[k]) for k in
                                            ("test_error", "test_logloss", "compute_s",
                                             "train_rows")})  # fmt: skip
                tracker.mlflow.set_tag("stopped_by", row["stopped_by"])
        tracker.mlflow.log_artifact(str(out / "tradeoff.png"))
        tracker.mlflow.log_artifact(str(out / "sweep.json"))
        envelope = lower_envelope([(r["compute_s"], r["test_error"]) for r in rows])
        tracker.mlflow.log_metric("envelope_points", len(envelope))
    table = pd.DataFrame(rows)[["time_budget_s", "fraction", "dim", "precision", "compute_s",
                                "test_error", "stopped_by"]]  # fmt: skip
    return {"run_id": rid, "points": rows, "best": best, "table": table, "dir": out}


def format_sweep(result: dict[str, Any]) -> str:
    lines = [
        result["table"].sort_values(["time_budget_s", "test_error"]).to_string(index=False),
        "",
    ]
    lines.append("best configuration per budget:")
    for budget, r in result["best"].items():
        lines.append(f"  {float(budget):>6g} s: n={r['fraction']:g} dim={r['dim']} {r['precision']}"
                     f"  test_error {r['test_error']:.4f} in {r['compute_s']:.1f} s")  # fmt: skip
    lines += ["", f"MLflow sweep run {result['run_id']}; chart {result['dir'] / 'tradeoff.png'}"]
    return "\n".join(lines)
