"""`zipfline retrain`, the cron entry: runs only on something new, one at a time, in cron's bare
environment, with trigger=cron and a line in the log; the active-learning loop closed by the
generator's oracle."""

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
    "select.enabled=false",  # round 1 selects; cron's round 2 need not (seconds saved)
]  # fmt: skip
GENERATE = ["generate.num_events=20000", "generate.num_queries=3000",
            "generate.unlabeled_fraction=0.6", "generate.format=csv"]  # fmt: skip


def test_retrain_and_the_generator_oracle_close_the_loop_one_run_at_a_time(
    spark, in_tmp, mlflow_template, capsys
):
    """Round 1 in this process, the generator oracle answering its selection; round 2 by
    `zipfline retrain` under `env -i` (cron), on those labels, doing better; then nothing new,
    then a held lock."""
    raw = in_tmp / "logs"
    assert main(["generate", "--out", str(raw), *sets(*GENERATE)]) == 0
    store = fresh_store(mlflow_template, in_tmp / "mlflow.db")  # tables made: seconds saved
    settings = sets(*SMALL, small_data_spark_conf(), f"data.raw_path={raw}",
                    f"data.root={in_tmp / 'data'}", f"tracking.uri={store}")  # fmt: skip
    tracking = TrackingConfig(uri=f"sqlite:///{in_tmp / 'mlflow.db'}")

    # Round 1: the run a user starts by hand, on this test's warm Spark session (trained by
    # torch.multiprocessing: seconds sooner); the oracle answers what select picked
    oracle = sets("select.enabled=true", "label.oracle=generator", "train.launcher=processes")
    assert main(["run", *settings, *oracle]) == 0
    assert "oracle (generator, sample): imported 300 of 300 label rows" in capsys.readouterr().err
    first = report_data(tracking)
    select = first["stages"]["select"]
    assert select["rows_out"] == select["selected"] == 300 and select["pool_candidate"] > 300

    # Round 2: cron's bare environment (no PATH, no HOME) starts retrain, which sees no
    # watermark yet and runs its budgeted child, launched by TorchDistributor as by default
    args = ["retrain", *settings]
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    zipfline = str(Path(sys.executable).parent / "zipfline")
    cron = ["env", "-i", *[f"{k}={v}" for k, v in env.items()], zipfline, *args]
    proc = subprocess.run(cron, cwd=in_tmp, capture_output=True, text=True, timeout=600)
    # on a failure, the training processes' output is on stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "Skipping registering" not in proc.stderr  # Great Expectations' INFO lines stay quiet
    assert "zipfline: Started local training with 2 processes" in proc.stderr  # TorchDistributor
    second = report_data(tracking)
    assert second["trigger"] == "cron" and second["status"] == "FINISHED"
    assert second["run_id"] != first["run_id"]
    log = (in_tmp / "data" / "retrain.log").read_text().splitlines()
    assert log[-1].endswith("promotion accepted") and second["run_id"] in log[-1]
    assert second["stages"]["ingest"]["skipped"]  # the same raw files: ingest is reused
    assert second["stages"]["dedupe"]["labels_imported"] == 300
    assert second["stages"]["shard"]["rows_in"] > first["stages"]["shard"]["rows_in"]
    assert second["test_error"] < first["test_error"] - 0.01, (
        first["test_error"],
        second["test_error"],
    )
    # the watermark holds what round 2 saw: the oracle's labels included
    new, _, last = something_new(load_config("local", settings[1::2]))
    assert not new and last is not None and last["run_id"] == second["run_id"]
    capsys.readouterr()

    assert main(args) == 0  # nothing new: no run
    assert "nothing new since" in capsys.readouterr().out
    assert report_data(tracking)["run_id"] == second["run_id"]

    with retrain_lock(in_tmp / "data"):  # another retrain holds the lock: exit 0, no run
        assert main([*args, "--force"]) == 0
    assert f"another retrain is running (pid {os.getpid()})" in capsys.readouterr().out
    assert report_data(tracking)["run_id"] == second["run_id"]
