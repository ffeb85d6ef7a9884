"""The pipeline run: the stages of :data:`pipelines.stages.STAGES` in order, each run or reused,
tracked as child runs of one MLflow parent run.

``generate → ingest → dedupe → split → augment → shard → train → evaluate → select``;
``generate`` runs only when ``data.raw_path`` is empty, ``augment`` only when
``augment.enabled``, ``select`` only when ``select.enabled``. A stage is reused only when its
fingerprint (settings, outside inputs, upstream) is the one in its marker; the registry's
verdict is the evaluate stage's hook, so select asks the model that has just earned
``champion`` (docs/architecture.md).

One run of a date at a time: a run holds ``<data.root>/<date>/.run.lock`` from before its first
stage to after its last, and a second run of the same date stops at once with one line (its
stages would otherwise write the same folders). Runs of other dates go on side by side.
"""

from __future__ import annotations

import sys
import time

from core.atomic import Busy, exclusive_lock
from core.errors import StageError
from core.layout import RUN_LOCK, RunContext, StageResult
from pipelines import stages
from pipelines.registry import fetch_champion
from pipelines.stages import PipelineRun, RunSummary
from pipelines.tracking import Tracker, flatten


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
    """Run the stages of ``ctx``'s config for its run date; returns the summary. Raises
    :class:`StageError` at once where another run of the same date is in flight."""
    try:
        with exclusive_lock(ctx.run_dir / RUN_LOCK):
            return _run_locked(ctx, start, stop, trigger)
    except Busy as busy:
        pid = f" (pid {busy.args[0]})" if busy.args and busy.args[0] else ""
        raise StageError(
            f"another run of {ctx.run_date} is in flight{pid} on {ctx.run_dir}; wait for it "
            "to end, then run the same command again (what it finished is reused)"
        ) from None


def _run_locked(ctx: RunContext, start: str | None, stop: str | None, trigger: str) -> RunSummary:
    chosen = stages.select_stages(ctx.cfg, start, stop)
    if ctx.champion is None:
        ctx.champion = fetch_champion
    if ctx.cfg.dq.enabled and any(st.gated for st in chosen):
        from data_quality.gates import preload  # GX takes seconds: only for a gated run

        preload()  # overlap Great Expectations' import with the first stages
    stale = stages.stale_before(ctx, chosen[0].name)
    if stale:
        print(f"zipfline: note: {', '.join(stale)} finished under other settings or inputs; "
              f"this run starts at {chosen[0].name} and builds on them as they are "
              "(run without --from to bring them up to date)", file=sys.stderr)  # fmt: skip
    tracker = Tracker(ctx.cfg.tracking)
    t0 = time.monotonic()
    with tracker.parent(ctx.run_date, trigger, flatten(ctx.cfg.to_dict())) as run_id:
        run = PipelineRun(
            ctx, tracker, RunSummary(run_id, ctx.run_date, tracker.experiment.experiment_id)
        )
        names = [st.name for st in chosen]
        print(f"zipfline run {ctx.run_date}: {' → '.join(names)}  (data under {ctx.run_dir})",
              file=sys.stderr, flush=True)  # fmt: skip
        upstream = stages.upstream_fingerprint(ctx, names[0])
        for i, st in enumerate(chosen, 1):
            fp = stages.fingerprint(ctx, st, upstream)
            reused = not ctx.force and stages.is_current(ctx, st.name, fp)
            with tracker.stage(st.name) as run.child_runs[st.name]:
                if reused:
                    result = ctx.read_result(st.name)
                    _progress(i, len(names), st.name,
                              f"reused (same settings and inputs)  {_describe(result)}")  # fmt: skip
                else:
                    why = "forced" if ctx.force else _why(ctx, st.name)
                    _progress(i, len(names), st.name, f"running ({why}) …")
                    result = stages.run_stage(ctx, st.name, upstream=upstream)
                    _progress(i, len(names), st.name, f"{result.seconds:.1f}s  {_describe(result)}")
                tracker.log_stage(
                    st.name, result, ctx.stage_dir(st.name), skipped=reused, fingerprint=fp,
                    datasets=st.datasets(ctx) if st.datasets else {},
                )  # fmt: skip
                if not reused:
                    for hook in st.after:
                        hook(run, st.name, result)
            run.summary.results[st.name] = result
            if reused:
                run.summary.skipped.append(st.name)
            upstream = fp
        run.summary.seconds = time.monotonic() - t0
        tracker.describe_parent(run.summary)
    return run.summary


def _why(ctx: RunContext, name: str) -> str:
    if not ctx.done(name):
        return "not run yet"
    return "settings or inputs changed"
