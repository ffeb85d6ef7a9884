"""``zipfline report``: a pipeline run's summary, read back from MLflow (docs/architecture.md,
"Command line")."""

from __future__ import annotations

import json
import math
from typing import Any

from core.config import TrackingConfig
from core.errors import DataError
from pipelines.tracking import COUNT_KEYS, PARENT_TAG, REASON_PREFIX, connect

HEADLINE = (
    "test_error", "test_error_weighted", "test_logloss", "breadth", "acc_head", "acc_torso",
    "acc_tail", "baseline_error", "bayes_error", "err_approx", "err_estim", "err_optim",
    "steps", "step_time_s", "samples_per_s", "time_used_s",
)  # fmt: skip
TOP_TAGS = (
    "run_date", "trigger", "git_sha", "stopped_by", "bayes_known", "top_confusions",
    "promotion", "promotion_reason", "model_version",
)  # fmt: skip


def _stage_entry(run: Any) -> dict[str, Any]:
    metrics = run.data.metrics
    entry: dict[str, Any] = {k: int(metrics.get(k, 0)) for k in COUNT_KEYS}
    entry["quarantined_by_reason"] = {
        k.removeprefix(REASON_PREFIX): int(v)
        for k, v in sorted(metrics.items())
        if k.startswith(REASON_PREFIX)
    }
    for key, value in sorted(metrics.items()):  # the stage's own metrics (clusters, …)
        if key not in entry and not key.startswith(REASON_PREFIX) and key != "stage_seconds":
            entry[key] = int(value) if float(value).is_integer() else value
    entry["seconds"] = metrics.get("stage_seconds")
    entry["skipped"] = run.data.tags.get("skipped") == "true"  # reused: same fingerprint
    entry["fingerprint"] = run.data.tags.get("fingerprint", "")
    entry["status"] = run.info.status
    return entry


def report_data(cfg: TrackingConfig, run_id: str | None = None) -> dict[str, Any]:
    """One JSON-ready object: ``run_id``, ``status``, params, metrics and tags at the top level,
    the flattened config under ``config``, and ``stages`` with each stage's counts."""
    experiment = connect(cfg)
    # start-up speed: mlflow imports in seconds, after connect() quieted it
    import mlflow

    client = mlflow.tracking.MlflowClient()
    if run_id:
        try:
            parent = client.get_run(run_id)
        except Exception as exc:  # MlflowException: RESOURCE_DOES_NOT_EXIST
            raise DataError(f"run {run_id} not found in {cfg.uri}") from exc
    else:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            raise DataError(f"no zipfline runs in experiment {cfg.experiment!r} at {cfg.uri}")
        parent = found[0]
    rid = parent.info.run_id
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{rid}'",
        order_by=["attributes.start_time ASC"],
        max_results=100,
    )
    data: dict[str, Any] = {"run_id": rid, "status": parent.info.status}
    for key in TOP_TAGS:
        if key in parent.data.tags:
            data[key] = parent.data.tags[key]
    data |= {k: v for k, v in parent.data.params.items() if "." not in k}
    data |= dict(parent.data.metrics)
    data["config"] = {k: v for k, v in parent.data.params.items() if "." in k}
    data["missing"] = {  # metrics that could not be computed, with the reason
        k.removeprefix("missing."): v
        for k, v in parent.data.tags.items()
        if k.startswith("missing.")
    }
    data["stages"] = {c.data.tags.get("stage", c.info.run_name): _stage_entry(c) for c in children}
    return data


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def format_report(data: dict[str, Any]) -> str:
    """The human-readable table of :func:`report_data`."""
    lines = [
        f"run {data['run_id']}  {data['status']}  date {data.get('run_date', '?')}  "
        f"trigger {data.get('trigger', '?')}",
        "",
        f"{'stage':<10}{'rows_in':>12}{'rows_out':>12}{'quarantined':>13}{'merged':>12}{'seconds':>9}",
    ]
    for name, s in data["stages"].items():
        secs = "skipped" if s["skipped"] else _fmt(s["seconds"] or 0.0)
        lines.append(
            f"{name:<10}{s['rows_in']:>12,}{s['rows_out']:>12,}{s['rows_quarantined']:>13,}"
            f"{s['rows_merged']:>12,}{secs:>9}"
        )
        if s["quarantined_by_reason"]:
            reasons = ", ".join(f"{k} {v:,}" for k, v in s["quarantined_by_reason"].items())
            lines.append(f"{'':<10}  quarantined: {reasons}")
    shown = [(k, data[k]) for k in HEADLINE if k in data]
    if shown:
        lines += ["", "metrics"]
        lines += [f"  {k:<22}{_fmt(v)}" for k, v in shown]
    for key in ("precision", "world_size", "model_capacity", "n_train", "stopped_by"):
        if key in data:
            lines.append(f"  {key:<22}{data[key]}")
    if "test_error_ci_low" in data:
        lines.append(f"  {'test_error 95% CI':<22}{data['test_error_ci_low']:.4f} … "
                     f"{data['test_error_ci_high']:.4f}")  # fmt: skip
    gates = [(g, s[f"dq_{g}_success"]) for g, s in data["stages"].items() if f"dq_{g}_success" in s]
    if gates:
        lines.append("  data quality gates    " + ", ".join(
            f"{g} {'passed' if ok else 'FAILED ' + str(data['stages'][g][f'dq_{g}_unexpected'])}"
            for g, ok in gates))  # fmt: skip
    for key, why in data.get("missing", {}).items():
        if key.startswith("err_"):
            lines.append(f"  {key:<22}missing: {why}")
    if "top_confusions" in data:
        lines.append(f"  {'most confused':<22}{data['top_confusions']}")
    sel = data["stages"].get("select")
    if sel and "selected" in sel:
        lines.append(f"  {'to label':<22}{sel['selected']} of {sel.get('pool_candidate', 0)} "
                     f"candidates (confident {sel.get('confident', 0)}, same cluster "
                     f"{sel.get('same_cluster', 0)}, class cap {sel.get('class_cap', 0)})")  # fmt: skip
    if "promotion" in data:
        lines.append(f"  {'registry':<22}version {data.get('model_version')} {data['promotion']}: "
                     f"{data.get('promotion_reason', '')}")  # fmt: skip
    return "\n".join(lines)


def print_report(cfg: TrackingConfig, run_id: str | None, as_json: bool) -> None:
    data = report_data(cfg, run_id)
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else format_report(data))
