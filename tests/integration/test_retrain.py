"""`zipfline retrain`, the cron entry: runs only on something new, one at a time, in cron's bare
environment, with trigger=cron and a line in the log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import TrackingConfig, load_config
from pipelines.cli import main
from pipelines.report import report_data
from pipelines.retrain import retrain_lock, something_new
from tests.conftest import fresh_store, sets, small_data_spark_conf

pytestmark = pytest.mark.integration

SMALL = [
    "featurizer.num_buckets=65536", "model.dim=16", "train.time_budget_s=20", "train.epochs=10",
    "spark.master=local[2]", "spark.shuffle_partitions=4", "eval.decompose=false",
    "eval.bootstrap_rounds=50", "select.budget=300",
    "dedupe.near_enabled=false",  # near-duplicates are test_flow's; here they cost a minute
]  # fmt: skip
GENERATE = ["generate.num_events=20000", "generate.num_queries=3000",
            "generate.unlabeled_fraction=0.6", "generate.format=csv"]  # fmt: skip


def test_retrain_and_the_generator_oracle_close_the_loop_one_run_at_a_time(
    spark, in_tmp, mlflow_template, capsys
):
    """Round 1 under `env -i` (cron), then nothing new, then a held lock; the generator oracle
    answers round 1's selection, and round 2 trains on those labels and does better."""
    raw = in_tmp / "logs"
    assert main(["generate", "--out", str(raw), *sets(*GENERATE)]) == 0
    store = fresh_store(mlflow_template, in_tmp / "mlflow.db")  # tables made: seconds saved
    settings = sets(*SMALL, small_data_spark_conf(), f"data.raw_path={raw}",
                    f"data.root={in_tmp / 'data'}", f"tracking.uri={store}")  # fmt: skip
    args = ["retrain", *settings]
    env = {"PYTHONDONTWRITEBYTECODE": "1"}  # cron: no PATH, no HOME
    zipfline = str(Path(sys.executable).parent / "zipfline")
    cron = ["env", "-i", *[f"{k}={v}" for k, v in env.items()], zipfline, *args]
    first = subprocess.run(cron, cwd=in_tmp, capture_output=True, text=True, timeout=600)
    # on a failure, the training processes' output is on stdout
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    assert "Skipping registering" not in first.stderr  # Great Expectations' INFO lines stay quiet
    tracking = TrackingConfig(uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
    data = report_data(tracking)
    assert data["trigger"] == "cron" and data["status"] == "FINISHED"
    log = (in_tmp / "data" / "retrain.log").read_text().splitlines()
    assert log[-1].endswith("promotion accepted") and data["run_id"] in log[-1]
    select = data["stages"]["select"]
    assert select["rows_out"] == select["selected"] == 300 and select["pool_candidate"] > 300
    capsys.readouterr()

    assert main(args) == 0  # nothing new: no run
    assert "nothing new since" in capsys.readouterr().out
    assert report_data(tracking)["run_id"] == data["run_id"]

    with retrain_lock(in_tmp / "data"):  # another retrain holds the lock: exit 0, no run
        assert main([*args, "--force"]) == 0
    assert f"another retrain is running (pid {os.getpid()})" in capsys.readouterr().out
    assert report_data(tracking)["run_id"] == data["run_id"]

    # The oracle answers the champion's selection; the labels are new, so retrain would run again
    oracle = ["run", "--from", "select", "--force", *settings, "--set", "label.oracle=generator"]
    assert main(oracle) == 0
    assert "oracle (generator, sample): imported 300 of 300 label rows" in capsys.readouterr().err
    cfg = load_config("local", settings[1::2])
    new, now, last = something_new(cfg)
    assert new and last is not None and last["run_id"] == data["run_id"]
    assert now["labels"] != last["labels"] and now["raw"] == last["raw"]
    # Round 2 is the run that retrain starts in its child (round 1 covered that child under
    # cron's environment), here in this process on its warm Spark session, trained by
    # torch.multiprocessing: a minute sooner.
    assert main(["run", *settings, "--set", "train.launcher=processes"]) == 0
    second = report_data(tracking)
    assert second["run_id"] != data["run_id"]
    assert second["stages"]["ingest"]["skipped"]  # the same raw files: ingest is reused
    assert second["stages"]["dedupe"]["labels_imported"] == 300
    assert second["stages"]["shard"]["rows_in"] > data["stages"]["shard"]["rows_in"]
    assert second["test_error"] < data["test_error"] - 0.01, (
        data["test_error"],
        second["test_error"],
    )
