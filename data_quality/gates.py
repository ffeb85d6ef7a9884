"""The gate runner: Great Expectations on the stage's Spark frames, then each failure's policy.

After a gated stage (ingest, dedupe, split, shard) has written its output into its temporary
folder, :func:`run_gate` validates the frames of :mod:`data_quality.suites` with Great
Expectations suites, in the file context kept under the data root (``<data.root>/gx``). Then, per
failing expectation: ``fail`` stops the run with one line (gate, expectation, unexpected count,
sample values), ``warn`` logs it, ``quarantine`` moves the failing rows to
``<stage>/quarantine/dq_<frame>/`` with the expectation's name as ``reason`` and rewrites the
output without them, so the stage's counts still reconcile. The validation results (JSON) and
their Data Docs pages land in ``<stage>/dq/`` and become artifacts of the stage's MLflow run,
with metrics ``dq_<gate>_success`` and ``dq_<gate>_unexpected``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import functions as F

from core.atomic import atomic_dir
from core.config import Config
from core.errors import ConfigError, DataError
from data_quality.expectations import Check, unexpected
from data_quality.quarantine import write_quarantine
from data_quality.suites import GATES, Frame, checks_for, frames_for

DQ_DIR = "dq"
FAILED_DIR = "_dq_failed"
SAMPLES = 5
_contexts: dict[str, Any] = {}
_import_lock = threading.Lock()


def preload() -> threading.Thread:
    """Import Great Expectations in the background (it takes seconds) while stages run."""
    # Modules both threads import must be whole before the thread starts: GX imports pyspark.ml,
    # and so do MLflow's model helpers, and a submodule half-imported by the other thread is a
    # "cannot access submodule 'ml' of module 'pyspark'" ImportError.
    import pyspark.ml  # noqa: F401

    thread = threading.Thread(target=_import_gx, daemon=True)
    thread.start()
    return thread


def _import_gx() -> Any:
    with _import_lock:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        os.environ.setdefault("TQDM_DISABLE", "1")  # no "Calculating Metrics" bars
        # start-up speed: Great Expectations imports in seconds (preloaded in a thread)
        import great_expectations as gx

        return gx


def context(root: Path) -> Any:
    """The Great Expectations file context under the data root (made on first use)."""
    key = str(root)
    if key not in _contexts:
        gx = _import_gx()
        root.mkdir(parents=True, exist_ok=True)
        for name in ("great_expectations", "great_expectations.data_context"):
            logging.getLogger(name).setLevel(logging.ERROR)
        ctx = gx.get_context(mode="file", project_root_dir=str(root))
        # start-up speed: Great Expectations, as above
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        _contexts[key] = ctx
    return _contexts[key]


@dataclass
class Outcome:
    """One expectation's result and what its policy did."""

    gate: str
    name: str
    type: str
    policy: str
    success: bool
    unexpected: int = 0
    samples: list[Any] = field(default_factory=list)
    observed: Any = None
    note: str = ""

    def line(self) -> str:
        what = (
            f"{self.unexpected:,} unexpected rows" if self.samples else f"observed {self.observed}"
        )
        sample = f"; e.g. {', '.join(repr(s) for s in self.samples)}" if self.samples else ""
        return f"gate {self.gate}: expectation {self.name} ({self.type}) failed: {what}{sample}"


def _validate(gx_context: Any, name: str, df: Any, expectations: list[Any],
              result_format: str) -> Any:  # fmt: skip
    """Validate ``df`` (a Spark frame, or the pandas summary row of a gate's aggregates) against
    the suite of ``expectations``; its validation result."""
    # start-up speed: Great Expectations, as above
    import great_expectations as gx

    pandas = not hasattr(df, "sparkSession")
    source = (
        gx_context.data_sources.add_or_update_pandas("zipfline_summary")
        if pandas
        else gx_context.data_sources.add_or_update_spark("zipfline")
    )
    try:
        asset = source.get_asset(name)
    except LookupError:
        asset = source.add_dataframe_asset(name)
    try:
        batch = asset.get_batch_definition("whole")
    except (KeyError, LookupError):
        batch = asset.add_batch_definition_whole_dataframe("whole")
    suite = gx_context.suites.add_or_update(
        gx.ExpectationSuite(name=name, expectations=expectations)
    )
    # validated on the batch directly: no stored validation definition or checkpoint that a
    # later version of the suites could leave stale; the results go to the stage folder
    return batch.get_batch(batch_parameters={"dataframe": df}).validate(
        suite, result_format={"result_format": result_format}
    )


def render_docs(validation: Any, target: Path) -> None:
    """The validation result as a Data Docs page (GX's own renderer and page view). The site's
    index is left out on purpose: rebuilding it reads every result ever stored."""
    # start-up speed: Great Expectations' renderer, only for Data Docs
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    document = ValidationResultsPageRenderer().render(validation)
    target.write_text(DefaultJinjaPageView().render(document))


def _column(frame: str, check: Check) -> str:
    return f"{frame}__{check.name}"


def _batched(check: Check, frame: Frame) -> bool:
    """Counted in the gate's one aggregate pass (row-level, its column present)."""
    return check.row_level and check.column in frame.df.columns


def _aggregate(frame_name: str, frame: Frame, checks: list[Check]) -> Any:
    """One Spark pass over the frame: each batched check's unexpected row count (for a
    uniqueness check: the rows beyond each value's first), as a one-row DataFrame."""
    aggs = []
    for check in checks:
        if check.type == "expect_column_values_to_be_unique":
            c = F.col(check.column)
            aggs.append((F.count(c) - F.count_distinct(c)).alias(_column(frame_name, check)))
        else:
            hit = unexpected(check, frame.df)
            aggs.append(F.sum(F.when(hit, 1).otherwise(0)).alias(_column(frame_name, check)))
    return frame.df.agg(*aggs)


def _summary_expectation(check: Check, column: str) -> Any:
    """The expectation on the summary row: the row-level check's unexpected count is 0."""
    # start-up speed: Great Expectations, as above
    from great_expectations.expectations.registry import get_expectation_impl

    impl = get_expectation_impl("expect_column_values_to_be_between")
    meta = {"zipfline_name": check.name, "checks": check.type, "with": check.kwargs}
    return impl(column=column, min_value=0, max_value=0, meta=meta)


def run_gate(cfg: Config, gate: str, out: Path, spark: Any, result: Any) -> list[Outcome]:
    """Validate ``gate`` over the stage output in ``out``, apply each policy, update ``result``
    (a StageResult) in place; raises :class:`DataError` for a ``fail``.

    Row-level expectations are batched: one aggregate pass per frame counts every expectation's
    unexpected rows, and one suite validates those counts together with the facts (Great
    Expectations makes a Spark job per metric, so validating each on the rows costs a pass
    each). Other expectations (schema, types, anything from ``dq.extra`` that is not row-level)
    run directly on their frame."""
    if gate not in GATES:
        raise ConfigError(f"no data quality gate for stage {gate!r}")
    checks = checks_for(gate, cfg)
    frames = frames_for(gate, cfg, out, spark, result)
    gx_context = context(Path(cfg.data.root).expanduser().resolve() / "gx")
    dq_dir = out / DQ_DIR
    dq_dir.mkdir(exist_ok=True)
    outcomes: dict[str, Outcome] = {}
    summary, summary_exp, where = None, [], {}
    direct: dict[str, list[Check]] = {}
    for check in checks:
        frame = frames.get(check.frame)
        if frame is None or (check.frame == "facts" and check.column not in frame.df.columns):
            outcomes[check.name] = Outcome(gate, check.name, check.type, check.policy, True,
                                           note="not computable on this data")  # fmt: skip
            continue
        if check.policy == "quarantine" and frame.path is None:
            raise ConfigError(
                f"dq: {gate}.{check.name} cannot quarantine: the {check.frame} frame's rows "
                "cannot be taken out (use fail or warn)"
            )
        if check.frame == "facts":
            where[check.name] = ("facts", f"facts__{check.column}")
        elif _batched(check, frame):
            where[check.name] = (check.frame, _column(check.frame, check))
        else:
            direct.setdefault(check.frame, []).append(check)
    parts = []
    for frame_name, frame in frames.items():
        mine = [c for c in checks if where.get(c.name, ("",))[0] == frame_name]
        if frame_name == "facts" and mine:
            parts.append(
                frame.df.select(*[F.col(c).alias(f"facts__{c}") for c in frame.df.columns])
            )
        elif mine:
            parts.append(_aggregate(frame_name, frame, mine))
    for part in parts:
        summary = part if summary is None else summary.crossJoin(part)
    validations = {}
    if summary is not None:  # one row of aggregates, computed in one Spark pass per frame
        summary = pd.DataFrame([summary.first().asDict()])
        for check in checks:
            if check.name not in where:
                continue
            frame_name, column = where[check.name]
            if frame_name == "facts":
                kwargs = dict(check.kwargs, column=column)
                summary_exp.append(Check(check.name, check.type, kwargs).expectation())
            else:
                summary_exp.append(_summary_expectation(check, column))
        validations["summary"] = (summary, summary_exp, "BASIC")
    for frame_name, mine in direct.items():
        validations[frame_name] = (frames[frame_name].df, [c.expectation() for c in mine],
                                   cfg.dq.result_format)  # fmt: skip
    for label, (df, expectations, fmt) in validations.items():
        validation = _validate(gx_context, f"zipfline.{gate}.{label}", df, expectations, fmt)
        (dq_dir / f"{gate}.{label}.json").write_text(
            json.dumps(validation.to_json_dict(), indent=2, default=str)
        )
        render_docs(validation, dq_dir / f"{gate}.{label}.html")
        for res in validation.results:
            name = res.expectation_config.meta.get("zipfline_name")
            check = next(c for c in checks if c.name == name)
            outcome = Outcome(gate, name, check.type, check.policy, bool(res.success))
            outcomes[name] = outcome
            if outcome.success:
                continue
            observed = (res.result or {}).get("observed_value")
            if res.exception_info and res.exception_info.get("raised_exception"):
                observed = res.exception_info.get("exception_message")
            outcome.observed = observed
            frame = frames[check.frame]
            if name in where and where[name][0] == "facts":
                outcome.observed = summary.iloc[0][where[name][1]]
                outcome.unexpected = 1
            elif name in where:
                outcome.unexpected = int(summary.iloc[0][where[name][1]])
                bad = frame.df.where(unexpected(check, frame.df)).select(check.column)
                outcome.samples = [r[0] for r in bad.limit(SAMPLES).collect()]
            elif check.type == "expect_table_columns_to_match_set":
                missing = sorted(set(check.kwargs["column_set"]) - set(frame.df.columns))
                outcome.observed = f"missing columns {missing}" if missing else observed
                outcome.unexpected = len(missing) or 1
            else:
                outcome.unexpected = 1
    for frame_name, frame in frames.items():
        _quarantine(gate, frame_name, frame, checks, list(outcomes.values()), out, result)
    ordered = [outcomes[c.name] for c in checks]
    failed = [o for o in ordered if not o.success]
    result.metrics[f"dq_{gate}_success"] = 0.0 if failed else 1.0
    result.metrics[f"dq_{gate}_unexpected"] = float(sum(o.unexpected for o in failed))
    if DQ_DIR not in result.artifacts:
        result.artifacts.append(DQ_DIR)
    (dq_dir / f"{gate}.outcomes.json").write_text(
        json.dumps([o.__dict__ for o in ordered], indent=2, default=str)
    )
    for o in failed:
        if o.policy == "warn":
            print(f"zipfline: warning: {o.line()} (policy warn, the run goes on)",
                  file=sys.stderr, flush=True)  # fmt: skip
            result.tags[f"dq.warn.{gate}.{o.name}"] = str(o.unexpected)
    stops = [o for o in failed if o.policy == "fail"]
    if stops:  # the stage folder goes away: keep its validation results and Data Docs
        kept = out.parent / FAILED_DIR / gate
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(dq_dir, kept)
        more = f"; {len(stops) - 1} more" if len(stops) > 1 else ""
        raise DataError(f"{stops[0].line()}{more} (results in {kept})")
    return ordered


def _quarantine(gate: str, frame_name: str, frame: Frame, checks: list[Check],
                outcomes: list[Outcome], out: Path, result: Any) -> None:  # fmt: skip
    """Move the rows that fail a ``quarantine`` expectation out of the frame's dataset."""
    failing = {o.name for o in outcomes if not o.success and o.policy == "quarantine"}
    chosen = [c for c in checks if c.name in failing and c.frame == frame_name]
    if not chosen or frame.path is None:
        return
    reason = F.lit(None).cast("string")
    for check in reversed(chosen):  # the first failing expectation of a row names it
        reason = F.when(unexpected(check, frame.df), F.lit(check.name)).otherwise(reason)
    tagged = frame.df.withColumn("reason", reason).persist()
    counts = {
        r["reason"]: int(r["count"])
        for r in tagged.where(F.col("reason").isNotNull()).groupBy("reason").count().collect()
    }
    write_quarantine(tagged.where(F.col("reason").isNotNull()), out, gate, part=f"dq_{frame_name}")
    with atomic_dir(out / frame.path) as staging:  # the kept rows replace the dataset
        kept = tagged.where(F.col("reason").isNull()).select(*frame.columns)
        kept.write.mode("overwrite").parquet(str(staging))
    tagged.unpersist()
    moved = sum(counts.values())
    result.rows_out -= moved
    result.rows_quarantined += moved
    for name, n in counts.items():
        result.quarantined_by_reason[name] = result.quarantined_by_reason.get(name, 0) + n
    rows_key = f"rows_{frame.path}"
    if rows_key in result.metrics:
        result.metrics[rows_key] -= moved
    for o in outcomes:
        if o.name in counts:
            o.note = f"{counts[o.name]:,} rows quarantined"
