"""A rerun answers from its inputs: the generated demo, then the user's own log on the same day,
gives the user's counts in the stage folders, in MLflow and in ``report --json``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from core.config import TrackingConfig
from pipelines.cli import main
from pipelines.report import report_data
from tests.conftest import sets

pytestmark = pytest.mark.integration

SMALL = [
    "generate.num_events=3000", "generate.num_queries=400", "generate.num_labels=4",
    "spark.master=local[2]", "spark.shuffle_partitions=4", "dq.enabled=false",
    "dedupe.near_enabled=false",
]  # fmt: skip


def _run(store: str, *extra: str) -> list[str]:
    return ["run", "--run-date", "2026-11-02", "--to", "split",
            *sets(*SMALL, f"tracking.uri={store}", *extra)]  # fmt: skip


def test_demo_then_own_data_on_the_same_day(spark, in_tmp, empty_store, capsys):
    tracking = TrackingConfig(uri=empty_store)
    assert main(_run(empty_store)) == 0
    demo = report_data(tracking)
    assert demo["stages"]["ingest"]["rows_in"] == 3000

    capsys.readouterr()
    assert main(_run(empty_store)) == 0  # the same data and settings: every stage reused
    err = capsys.readouterr().err
    assert err.count("reused (same settings and inputs)") == 4, err
    again = report_data(tracking)
    assert again["run_id"] != demo["run_id"]
    assert all(s["skipped"] for s in again["stages"].values())
    assert again["stages"]["ingest"]["rows_in"] == 3000

    own = in_tmp / "own"
    own.mkdir()
    rows = [{"query": f"own query {i % 90}", "label": "alpha" if i % 3 else "beta"}
            for i in range(500)] + [{"query": "", "label": "alpha"}]  # fmt: skip
    pd.DataFrame(rows).to_csv(own / "log.csv", index=False)
    capsys.readouterr()
    assert main(_run(empty_store, f"data.raw_path={own}")) == 0
    err = capsys.readouterr().err
    assert "reused" not in err, err
    assert "generate" not in err.split("\n", 1)[0]  # the stage list no longer generates
    mine = report_data(tracking)
    ingest = mine["stages"]["ingest"]
    assert (ingest["rows_in"], ingest["rows_out"], ingest["rows_quarantined"]) == (501, 500, 1)
    assert mine["stages"]["dedupe"]["rows_out"] == 90
    assert mine["config"]["data.raw_path"] == str(own)
    marker = json.loads((in_tmp / "data" / "2026-11-02" / "ingest" / "_SUCCESS").read_text())
    assert marker["result"]["rows_in"] == 501

    # new rows in the same file: ingest and everything after it run again
    pd.DataFrame(rows + [{"query": "one more", "label": "beta"}]).to_csv(
        own / "log.csv", index=False
    )
    capsys.readouterr()
    assert main(_run(empty_store, f"data.raw_path={own}")) == 0
    assert "reused" not in capsys.readouterr().err
    assert report_data(tracking)["stages"]["ingest"]["rows_in"] == 502

    # only split's settings changed: ingest and dedupe are reused, split runs
    capsys.readouterr()
    assert main(_run(empty_store, f"data.raw_path={own}", "split.seed=5")) == 0
    err = capsys.readouterr().err
    assert "ingest    reused" in err and "dedupe    reused" in err
    assert "split     running (settings or inputs changed)" in err
