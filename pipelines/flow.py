"""The pipeline graph: which stages run, in what order, and how a run is tracked.

``generate → ingest → dedupe → split → augment → shard → train → evaluate → select``;
``generate`` runs only when ``data.raw_path`` is empty, ``augment`` only when
``augment.enabled``, ``select`` only when ``select.enabled``. The registry's verdict comes right
after evaluate, so select asks the model that has just earned ``champion``. Each stage runs
atomically, skips when its marker exists (unless ``--force``), checks that its counts
reconcile, and is logged as a child run of the pipeline's parent MLflow run (DESIGN §1, §7).
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from dataclasses import dataclass, field

from pipelines.config import Config
from pipelines.errors import ConfigError
from pipelines.stage import GATED, RunContext, StageResult, run_atomically
from pipelines.tracking import Tracker

log = logging.getLogger("zipfline")

STAGES = (
    "generate", "ingest", "dedupe", "split", "augment", "shard", "train", "evaluate", "select",
)  # fmt: skip


def _flatten(prefix: str, value: object) -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out |= _flatten(f"{prefix}{k}.", v)
        return out
    return {prefix.rstrip("."): value}


def stages_for(cfg: Config, start: str | None = None, stop: str | None = None) -> list[str]:
    """The stages a run executes, between ``--from`` and ``--to`` inclusive."""
    names = [
        s for s in STAGES
        if (s != "generate" or not cfg.data.raw_path) and (s != "augment" or cfg.augment.enabled)
        and (s != "select" or cfg.select.enabled)
    ]  # fmt: skip
    for flag, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in names:
            raise ConfigError(
                f"{flag} {value}: not a stage of this run (stages: {', '.join(names)})"
            )
    lo = names.index(start) if start else 0
    hi = names.index(stop) if stop else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    return names[lo : hi + 1]


def stage_runner(stage: str):  # noqa: ANN201
    """The ``run(ctx, out)`` of ``jobs/<stage>.py``."""
    return importlib.import_module(f"jobs.{stage}").run


@dataclass
class RunSummary:
    run_id: str
    run_date: str
    results: dict[str, StageResult] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    promotion: dict[str, str] = field(default_factory=dict)


def _progress(i: int, n: int, stage: str, text: str) -> None:
    print(f"[{i}/{n}] {stage:<9} {text}", file=sys.stderr, flush=True)


def _describe(result: StageResult) -> str:
    parts = [f"in {result.rows_in:,}", f"out {result.rows_out:,}"]
    if result.rows_quarantined:
        reasons = ", ".join(f"{k} {v:,}" for k, v in result.quarantined_by_reason.items())
        parts.append(f"quarantined {result.rows_quarantined:,} ({reasons})")
    if result.rows_merged:
        parts.append(f"merged {result.rows_merged:,}")
    return "  ".join(parts)


def run_pipeline(
    ctx: RunContext,
    *,
    start: str | None = None,
    stop: str | None = None,
    trigger: str = "manual",
) -> RunSummary:
    """Run the stages of ``ctx``'s config for its run date; returns the summary."""
    names = stages_for(ctx.cfg, start, stop)
    if ctx.cfg.dq.enabled and any(s in GATED for s in names):
        from data_quality.gates import preload

        preload()  # Great Expectations imports in seconds: overlap it with the first stages
    tracker = Tracker(ctx.cfg.tracking)
    t0 = time.monotonic()
    params = _flatten("", ctx.cfg.to_dict())
    with tracker.parent(ctx.run_date, trigger, params) as run_id:
        summary = RunSummary(run_id=run_id, run_date=ctx.run_date)
        print(f"zipfline run {ctx.run_date}: {' → '.join(names)}  (data under {ctx.run_dir})",
              file=sys.stderr, flush=True)  # fmt: skip
        child_runs: dict[str, str] = {}
        for i, stage in enumerate(names, 1):
            with tracker.stage(stage) as child_runs[stage]:
                skipped = ctx.done(stage) and not ctx.force
                if skipped:
                    result = ctx.read_result(stage)
                    note = "done earlier, skipped (--force redoes it)"
                    if ctx.settings_changed(stage):
                        note = "done earlier UNDER OTHER SETTINGS OR LABELS, skipped (--force redoes it)"
                    _progress(i, len(names), stage, f"{note}  {_describe(result)}")
                else:
                    _progress(i, len(names), stage, "running …")
                    result = run_atomically(ctx, stage, stage_runner(stage))
                    _progress(i, len(names), stage, f"{result.seconds:.1f}s  {_describe(result)}")
                tracker.log_stage(stage, result, ctx.stage_dir(stage), skipped=skipped)
            summary.results[stage] = result
            if skipped:
                summary.skipped.append(stage)
            if stage == "evaluate" and ctx.cfg.registry.enabled and "train" in child_runs:
                summary.promotion = _promote(ctx, tracker, child_runs["train"], summary)
        summary.seconds = time.monotonic() - t0
    return summary


def _promote(ctx: RunContext, tracker: Tracker, train_run: str, summary: RunSummary) -> dict:
    """Register the trained model; ``champion`` moves to it only if it beats the champion."""
    from jobs.evaluate import weighted_error
    from pipelines.registry import promote

    error = summary.results["evaluate"].metrics["test_error_weighted"]
    decision = promote(
        ctx.cfg.registry,
        f"runs:/{train_run}/model",
        error,
        lambda uri: weighted_error(ctx, uri),
        {"run_id": summary.run_id, "run_date": ctx.run_date},
    )
    tracker.mlflow.set_tags(decision.tags())
    verdict = "champion" if decision.accepted else "not promoted"
    print(f"registry: {ctx.cfg.registry.model_name} version {decision.version} {verdict}: "
          f"{decision.reason}", file=sys.stderr, flush=True)  # fmt: skip
    return decision.tags()
