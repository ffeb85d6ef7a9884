"""`zipfline retrain`, the cron entry: runs only on something new, one at a time, in cron's bare
environment, with trigger=cron and a line in the log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main
from pipelines.config import TrackingConfig
from pipelines.report import report_data
from pipelines.retrain import retrain_lock

pytestmark = pytest.mark.integration

SMALL = [
    "featurizer.num_buckets=65536", "model.dim=16", "train.time_budget_s=20", "train.epochs=3",
    "spark.master=local[2]", "spark.shuffle_partitions=4", "eval.decompose=false",
    "eval.bootstrap_rounds=50",
]  # fmt: skip


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _write_log(raw: Path, name: str, offset: int) -> None:
    words = {"books": ["novel", "author", "poetry"], "music": ["guitar", "album", "drums"]}
    rows = [{"query": f"{w} {i % 40}", "label": label}
            for i in range(offset, offset + 400) for label, ws in words.items() for w in ws]  # fmt: skip
    pd.DataFrame(rows).to_csv(raw / name, index=False)


def test_retrain_runs_once_per_change_one_at_a_time_even_under_env_i(in_tmp, capsys):
    raw = in_tmp / "logs"
    raw.mkdir()
    _write_log(raw, "day-1.csv", 0)
    args = ["retrain", *_sets([*SMALL, f"data.raw_path={raw}",
                               f"data.root={in_tmp / 'data'}",
                               f"tracking.uri=sqlite:///{in_tmp / 'mlflow.db'}"])]  # fmt: skip
    env = {"PYTHONDONTWRITEBYTECODE": "1"}  # cron: no PATH, no HOME
    zipfline = str(Path(sys.executable).parent / "zipfline")
    first = subprocess.run(["env", "-i", *[f"{k}={v}" for k, v in env.items()], zipfline, *args],
                           cwd=in_tmp, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    tracking = TrackingConfig(uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
    data = report_data(tracking)
    assert data["trigger"] == "cron" and data["status"] == "FINISHED"
    log = (in_tmp / "data" / "retrain.log").read_text().splitlines()
    assert log[-1].endswith("promotion accepted") and data["run_id"] in log[-1]

    assert main(args) == 0  # nothing new: no run
    assert "nothing new since" in capsys.readouterr().out
    assert report_data(tracking)["run_id"] == data["run_id"]

    with retrain_lock(in_tmp / "data"):  # another retrain holds the lock: exit 0, no run
        assert main([*args, "--force"]) == 0
    assert f"another retrain is running (pid {os.getpid()})" in capsys.readouterr().out
    assert report_data(tracking)["run_id"] == data["run_id"]
