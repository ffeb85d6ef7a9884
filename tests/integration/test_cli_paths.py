"""The documented entry points: ``zipfline generate`` and ``spark-submit jobs/<stage>.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main
from tests.conftest import SMALL_DATA_SPARK_CONF, fresh_store

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_generate_then_spark_submit_one_stage(spark, in_tmp, mlflow_template, capsys):
    out = in_tmp / "log"
    assert main(["generate", "--out", str(out), "--events", "3000", "--seed", "11", "--format", "jsonl",
                 "--set", "generate.num_queries=500"]) == 0  # fmt: skip
    assert "wrote 3,000 events" in capsys.readouterr().out
    events = sorted(out.glob("events-*.jsonl"))
    assert events and sum(len(p.read_text().splitlines()) for p in events) == 3000
    truth = pd.read_parquet(out / "_truth" / "queries.parquet")
    assert len(truth) == 500 and {"label_probs", "majority_label", "bayes_error"} <= set(
        truth.columns
    )
    # an existing folder is not overwritten without --force
    assert main(["generate", "--out", str(out), "--events", "10"]) == 2

    store = fresh_store(mlflow_template, in_tmp / "submit.db")  # tables made: seconds saved
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": sys.executable}  # fmt: skip
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("spark-submit")), "--master", "local[1]",
         "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.ui.enabled=false",
         *[a for k, v in SMALL_DATA_SPARK_CONF.items() for a in ("--conf", f"{k}={v}")],
         str(REPO / "jobs" / "ingest.py"), "--run-date", "2026-11-05",
         "--set", f"data.raw_path={out}", "--set", f"data.root={in_tmp / 'data'}",
         "--set", f"tracking.uri={store}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=in_tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = json.loads((in_tmp / "data" / "2026-11-05" / "ingest" / "_SUCCESS").read_text())
    result = marker["result"]
    assert result["rows_in"] == 3000
    assert result["rows_in"] == result["rows_out"] + result["rows_quarantined"]
    assert "ingest" in proc.stdout  # the closing summary
