"""``zipfline plan``: what more workers would buy, per mode, on a run date's shards and model.

It measures one worker's step and the bytes each mode sends on this data and model
(``trainers.commodel.measure_costs``), and the network between two processes of this machine
unless given (``--bandwidth``, ``--latency``), then predicts step time, samples/s and
efficiency of sync, local SGD and async at each worker count from the α-β model. It prints a
table, writes ``plan.json`` and ``plan.png`` under ``<run date>/plan/``, and logs both to the run
date's latest pipeline run in MLflow (the run the plan was made for), where there is one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from core.layout import RunContext
from trainers.commodel import (
    MODES,
    Link,
    fitted_links,
    measure_costs,
    measure_link,
    measure_loaded,
    predict,
)
from trainers.plots import scaling
from trainers.spec import TrainSpec


def run_plan(
    ctx: RunContext, workers: Sequence[int], bandwidth: float | None, latency: float | None
) -> dict[str, Any]:
    """Measure, predict, write and log the plan; return it as JSON data."""
    shard_dir = ctx.require("shard")
    spec = TrainSpec.from_config(ctx.cfg, shard_dir, ctx.run_dir / "plan")
    print(f"zipfline plan {ctx.run_date}: measuring one worker's step on {shard_dir} …",
          file=sys.stderr, flush=True)  # fmt: skip
    costs, average = measure_costs(spec, workers)
    if bandwidth is None or latency is None:
        print("zipfline plan: measuring gloo between two processes of this machine …",
              file=sys.stderr, flush=True)  # fmt: skip
        p2p, ring = measure_link()
        idle = {"link": p2p.latency_s, "collective_link": ring.latency_s}
        print("zipfline plan: measuring two workers' sync steps and async pushes …",
              file=sys.stderr, flush=True)  # fmt: skip
        costs, p2p, ring = fitted_links(costs, p2p, ring, measure_loaded(spec))
        if latency is not None or bandwidth is not None:  # one given: it holds for both links
            p2p, ring = (Link(latency if latency is not None else m.latency_s,
                              bandwidth if bandwidth is not None else m.bandwidth)
                         for m in (p2p, ring))  # fmt: skip
        source = "measured on this machine (gloo, loopback; latencies fitted to two workers)"
    else:
        p2p = ring = Link(latency, bandwidth)
        source, idle = "given", {}
    rows = []
    for n in workers:
        per_n = dataclasses.replace(costs, average_bytes=average[n])
        for mode in MODES:
            rows.append(dataclasses.asdict(predict(per_n, p2p, mode, n, collective=ring)))
    plan = {
        "run_date": ctx.run_date, "costs": dataclasses.asdict(costs),
        "average_bytes_by_workers": average,
        "link": dataclasses.asdict(p2p) | {"source": source},
        "collective_link": dataclasses.asdict(ring) | {"source": source}, "predictions": rows,
    }  # fmt: skip
    for key, seconds in idle.items():  # what the fit started from: the links with nothing else on
        plan[key]["idle_latency_s"] = seconds
    out = ctx.run_dir / "plan"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    scaling(rows, out / "plan.png")
    plan["logged_to"] = _log(ctx, [out / "plan.json", out / "plan.png"])
    plan["dir"] = str(out)
    return plan


def _log(ctx: RunContext, paths: Sequence[Any]) -> str | None:
    """Log ``paths`` under ``plan/`` of the run date's latest pipeline run; its id, or None."""
    # start-up speed: MLflow only when a plan is logged
    from pipelines.tracking import PARENT_TAG, connect

    experiment = connect(ctx.cfg.tracking)
    # start-up speed: mlflow imports in seconds, after connect() quieted it
    import mlflow

    client = mlflow.tracking.MlflowClient()
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = 'pipeline' and tags.run_date = '{ctx.run_date}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    if not found:
        return None
    for path in paths:
        client.log_artifact(found[0].info.run_id, str(path), "plan")
    return found[0].info.run_id


def format_plan(plan: dict[str, Any]) -> str:
    c, link = plan["costs"], plan["link"]
    ring = plan.get("collective_link", link)
    lines = [
        f"one worker: {c['compute_s'] * 1e3:.2f} ms a step of {c['batch']} rows "
        f"({c['batch'] / c['compute_s']:,.0f} samples/s), {c['cores']} cores; bytes a step: "
        f"sync {c['exchange_bytes']:,.0f}, async push {c['push_bytes']:,.0f}; "
        f"async server {c['server_s'] * 1e3:.2f} ms a push",
        f"async's messages: latency {link['latency_s'] * 1e6:.0f} us, bandwidth "
        f"{link['bandwidth'] / 1e6:,.0f} MB/s; a collective's round: latency "
        f"{ring['latency_s'] * 1e6:.0f} us, bandwidth {ring['bandwidth'] / 1e6:,.0f} MB/s "
        f"({link['source']}); sync's merge of another worker's rows {c['merge_s'] * 1e3:.2f} ms",
        "",
        f"{'workers':>8}{'mode':>11}{'step ms':>10}{'samples/s':>12}{'efficiency':>12}",
    ]
    for r in plan["predictions"]:
        if r["samples_per_s"] != r["samples_per_s"]:  # nan: async needs a server and a worker
            continue
        lines.append(f"{r['workers']:>8}{r['mode']:>11}{r['step_s'] * 1e3:>10.2f}"
                     f"{r['samples_per_s']:>12,.0f}{r['efficiency']:>12.2f}")  # fmt: skip
    where = f"MLflow run {plan['logged_to']}" if plan["logged_to"] else "no MLflow run of that date"
    lines += ["", f"plan.json and plan.png in {plan['dir']} (and {where})"]
    return "\n".join(lines)
