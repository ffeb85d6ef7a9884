"""Data quality gates: real Great Expectations on real Spark, with planted broken data.

Each test plants one thing a person would have caught and checks that the right gate fails,
warns or quarantines with the right reason, and that the counts still reconcile.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.config import load_config
from core.errors import ConfigError, DataError
from core.layout import RunContext, StageResult
from data_quality.gates import run_gate
from data_quality.suites import zipf_facts
from pipelines.stages import run_stage
from tests.conftest import config_for

pytestmark = pytest.mark.integration


def _stage(tmp_path, name, frames: dict[str, pd.DataFrame]):
    out = tmp_path / name
    for rel, frame in frames.items():
        (out / rel).mkdir(parents=True)
        frame.to_parquet(out / rel / "part-0.parquet", index=False, coerce_timestamps="us")
    return out


def _ingested(n_good: int, n_blank: int = 0) -> pd.DataFrame:
    queries = [f"query {i}" for i in range(n_good)] + ["   "] * n_blank
    return pd.DataFrame(
        {"query": queries, "label": ["a"] * len(queries),
         "ts": pd.to_datetime(["2026-11-01"] * len(queries)), "source_file": "x.csv"}
    )  # fmt: skip


def test_ingest_gate_stops_on_a_missing_column(spark, tmp_path):
    cfg = config_for(tmp_path)
    out = _stage(tmp_path, "ingest", {"rows": _ingested(50).drop(columns=["label"])})
    result = StageResult(rows_in=50, rows_out=50)
    with pytest.raises(
        DataError, match=r"gate ingest: expectation schema .*missing columns \['label'\]"
    ):
        run_gate(cfg, "ingest", out, spark, result)
    outcomes = json.loads((out / "dq" / "ingest.outcomes.json").read_text())
    assert [o["name"] for o in outcomes if not o["success"]] == ["schema"]
    result_json = json.loads((out / "dq" / "ingest.rows.json").read_text())
    assert result_json["success"] is False  # the validation result, as GX wrote it
    assert "<html" in (out / "dq" / "ingest.rows.html").read_text().lower()  # and Data Docs
    assert (tmp_path / "_dq_failed" / "ingest" / "ingest.rows.html").exists()  # kept on failure


def test_forty_percent_empty_queries_stop_the_run_or_warn(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    queries = [f"query {i}" for i in range(60)] + [""] * 40
    pd.DataFrame({"query": queries, "label": "a"}).to_csv(raw / "log.csv", index=False)
    ctx = RunContext(config_for(tmp_path, f"data.raw_path={raw}"), "2026-11-01", spark=spark)
    with pytest.raises(
        DataError, match=r"gate ingest: expectation quarantined_share .*observed 0\.4"
    ):
        run_stage(ctx, "ingest")
    assert not ctx.done("ingest")  # a failed gate leaves no finished stage behind
    warn = config_for(tmp_path, f"data.raw_path={raw}", "dq.policies.ingest.quarantined_share=warn")
    ctx = RunContext(warn, "2026-11-01", spark=spark)
    result = run_stage(ctx, "ingest")
    assert result.metrics["dq_ingest_success"] == 0 and result.metrics["dq_ingest_unexpected"] == 1
    assert result.tags["dq.warn.ingest.quarantined_share"] == "1"
    assert result.quarantined_by_reason == {"empty_query": 40} and result.rows_out == 60


def test_row_level_quarantine_moves_the_failing_rows_with_the_expectation_name(spark, tmp_path):
    cfg = config_for(tmp_path)  # query_not_blank quarantines by default
    out = _stage(tmp_path, "ingest", {"rows": _ingested(70, n_blank=30)})
    result = StageResult(rows_in=100, rows_out=100)
    run_gate(cfg, "ingest", out, spark, result)
    result.check_reconciles("ingest")
    assert result.quarantined_by_reason == {"query_not_blank": 30} and result.rows_out == 70
    kept = pd.read_parquet(out / "rows")
    moved = pd.read_parquet(out / "quarantine" / "dq_rows")
    assert len(kept) == 70 and kept["query"].str.strip().ne("").all()
    assert set(moved["reason"]) == {"query_not_blank"} and len(moved) == 30
    assert set(moved.columns) >= {"query", "label", "ts", "source_file", "reason", "stage"}
    assert result.metrics["dq_ingest_unexpected"] == 30
    # the same expectation with policy fail names its samples
    out = _stage(tmp_path / "again", "ingest", {"rows": _ingested(70, n_blank=30)})
    strict = config_for(tmp_path, "dq.policies.ingest.query_not_blank=fail")
    with pytest.raises(DataError, match=r"query_not_blank .*30 unexpected rows; e\.g\. '   '"):
        run_gate(strict, "ingest", out, spark, StageResult(rows_in=100, rows_out=100))


def _deduped(counts: np.ndarray) -> pd.DataFrame:
    n = len(counts)
    return pd.DataFrame(
        {"cluster_id": np.arange(n), "query": [f"q{i}" for i in range(n)], "count": counts,
         "num_labeled": counts, "majority_label": "a"}
    )  # fmt: skip


def test_dedupe_gate_catches_a_flattened_distribution(spark, tmp_path):
    rng = np.random.default_rng(0)
    zipf = np.maximum(1, (20000 / np.arange(1, 3001) ** 1.05).astype(int))
    exponent, share = zipf_facts(
        [(int(c), int(k)) for c, k in zip(*np.unique(zipf, return_counts=True), strict=True)]
    )
    assert 0.9 < exponent < 1.2 and share > 0.3  # the fit recovers the exponent
    cfg = config_for(tmp_path)
    out = _stage(tmp_path, "zipf", {"rows": _deduped(zipf)})
    result = StageResult(
        rows_in=int(zipf.sum()), rows_out=len(zipf), rows_merged=int(zipf.sum()) - len(zipf)
    )
    run_gate(cfg, "dedupe", out, spark, result)
    assert result.metrics["dq_dedupe_success"] == 1

    flat = rng.integers(3, 9, size=3000)  # every query about as frequent: a broken ingest
    out = _stage(tmp_path, "flat", {"rows": _deduped(flat)})
    result = StageResult(
        rows_in=int(flat.sum()), rows_out=len(flat), rows_merged=int(flat.sum()) - len(flat)
    )
    with pytest.raises(DataError, match=r"gate dedupe: expectation zipf_exponent .*; 1 more"):
        run_gate(cfg, "dedupe", out, spark, result)
    outcomes = {o["name"]: o for o in json.loads((out / "dq" / "dedupe.outcomes.json").read_text())}
    assert not outcomes["top1pct_traffic_share"]["success"]
    assert outcomes["query_unique"]["success"] and outcomes["count_positive"]["success"]


def test_a_test_cluster_leaked_into_train_fails_or_is_quarantined(spark, tmp_path):
    rows = _deduped(np.full(40, 2)).assign(bucket="tail", weight=2.0)
    train, test = rows.iloc[:30].copy(), rows.iloc[30:].copy()
    train.loc[train.index[:2], "cluster_id"] = test["cluster_id"].iloc[0]  # the leak
    frames = {"train": train, "test": test, "validation": rows.iloc[:0], "pool": rows.iloc[:0]}
    metrics = {"rows_train": 30, "rows_test": 10, "rows_validation": 0, "rows_pool": 0}
    cfg = config_for(tmp_path, "data.test_path=/external")  # no fraction check on 40 rows
    out = _stage(tmp_path, "split", frames)
    with pytest.raises(
        DataError, match=r"gate split: expectation no_test_cluster_in_train .*2 unexpected rows"
    ):
        run_gate(
            cfg, "split", out, spark, StageResult(rows_in=40, rows_out=40, metrics=dict(metrics))
        )
    out = _stage(tmp_path / "q", "split", frames)
    cfg = config_for(tmp_path, "data.test_path=/external",
                     "dq.policies.split.no_test_cluster_in_train=quarantine")  # fmt: skip
    result = StageResult(rows_in=40, rows_out=40, metrics=dict(metrics))
    run_gate(cfg, "split", out, spark, result)
    result.check_reconciles("split")
    assert result.quarantined_by_reason == {"no_test_cluster_in_train": 2}
    assert result.metrics["rows_train"] == 28
    kept = pd.read_parquet(out / "train")
    assert len(kept) == 28 and "leaks_test_cluster" not in kept.columns
    assert set(kept["cluster_id"]).isdisjoint(test["cluster_id"])


def test_a_shard_changed_after_its_manifest_fails_the_shard_gate(spark, finished_run):
    """On a copy of the shared run (whose gates all passed, test_flow): one train shard's bytes
    change after the manifest recorded their checksum."""
    run = finished_run
    ctx = RunContext(load_config("local", run.sets()[1::2]), run.run_date, spark=spark)
    shard_dir, result = ctx.stage_dir("shard"), ctx.read_result("shard")
    assert result.metrics["dq_shard_success"] == 1
    # round-robin shards from at most spark.shuffle_partitions (4) input partitions: within a
    # row per partition of each other
    assert result.metrics["shard_rows_max"] - result.metrics["shard_rows_min"] <= 4
    run_gate(ctx.cfg, "shard", shard_dir, spark, result)  # the copy as it was passes
    victim = shard_dir / "train-00001.parquet"
    frame = pd.read_parquet(victim)
    frame["label"] = frame["label"] * 0  # same schema, other bytes
    frame.to_parquet(victim, index=False)
    with pytest.raises(DataError, match=r"gate shard: expectation checksums_match .*observed 1\.0"):
        run_gate(ctx.cfg, "shard", shard_dir, spark, result)


def test_an_expectation_added_in_conf_quarantines_without_python(spark, tmp_path):
    extra = ("dq.extra=[{gate: dedupe, name: count_cap, type: expect_column_values_to_be_between,"
             " kwargs: {column: count, max_value: 3}, policy: quarantine}]")  # fmt: skip
    cfg = config_for(tmp_path, extra)
    counts = np.array([1, 2, 3, 4, 5, 2])
    out = _stage(tmp_path, "dedupe", {"rows": _deduped(counts)})
    result = StageResult(rows_in=17, rows_out=6, rows_merged=11)
    run_gate(cfg, "dedupe", out, spark, result)
    result.check_reconciles("dedupe")
    assert result.quarantined_by_reason == {"count_cap": 2}
    assert sorted(pd.read_parquet(out / "rows")["count"]) == [1, 2, 2, 3]


def test_policies_are_checked_against_what_a_gate_can_do(spark, tmp_path):
    out = _stage(tmp_path, "dedupe", {"rows": _deduped(np.array([1, 2]))})
    result = StageResult(rows_in=3, rows_out=2, rows_merged=1)
    with pytest.raises(ConfigError, match="gate dedupe has no expectation 'nope'"):
        run_gate(config_for(tmp_path, "dq.policies.dedupe.nope=warn"), "dedupe", out, spark, result)
    with pytest.raises(ConfigError, match="cannot quarantine rows: only row-level"):
        run_gate(config_for(tmp_path, "dq.policies.dedupe.zipf_exponent=quarantine"),
                 "dedupe", out, spark, result)  # fmt: skip
    with pytest.raises(ConfigError, match="no such gate"):
        config_for(tmp_path, "dq.policies.train.x=warn")
    bad_type = "dq.extra=[{gate: dedupe, name: x, type: expect_nothing_at_all}]"
    with pytest.raises(ConfigError, match="unknown type 'expect_nothing_at_all'"):
        run_gate(config_for(tmp_path, bad_type), "dedupe", out, spark, result)
