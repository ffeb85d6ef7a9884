"""`zipfline failures` on planted failures in a real MLflow store: a factor the failures were
planted on is found, one they were planted independently of is not; a failed run records its
error class, stage and host."""

from __future__ import annotations

import json
import socket

import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from core.config import TrackingConfig
from core.errors import DataError
from pipelines.cli import main
from pipelines.failures import failure_analysis
from pipelines.tracking import FAILURE_CLASS, FAILURE_STAGE, PARENT_TAG, Tracker, connect


def _plant(client: MlflowClient, experiment: str, i: int) -> None:
    """Run ``i`` of 72: fp16 runs fail in train in 8 of 12 blocks of six runs, fp32 runs fail in
    ingest in 3 of 12; every host has the same share of each outcome."""
    precision, host, block = ("fp16" if i % 2 else "fp32"), f"node{(i // 2) % 3}", i // 6
    failure = None
    if precision == "fp16" and block % 3:
        failure = ("FloatingPointError", "train")
    elif precision == "fp32" and block % 4 == 0:
        failure = ("DataError", "ingest")
    tags = {PARENT_TAG: "pipeline", "host": host}
    if failure:
        tags |= {FAILURE_CLASS: failure[0], FAILURE_STAGE: failure[1]}
    _ended_run(client, experiment, tags, precision, "FAILED" if failure else "FINISHED")


def _ended_run(
    client: MlflowClient, experiment: str, tags: dict, precision: str, status: str
) -> None:
    """A pipeline run with ``tags`` and the training settings the factors read, ended ``status``."""
    run = client.create_run(experiment, tags=tags)
    params = {"train.precision": precision, "train.mode": "sync", "train.world_size": "2"}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status)


def test_failures_depend_on_the_planted_factor_only(empty_store, capsys):
    tracking = TrackingConfig(uri=empty_store)
    experiment = connect(tracking).experiment_id
    client = MlflowClient(empty_store)
    for i in range(72):
        _plant(client, experiment, i)
    client.create_run(experiment, tags={PARENT_TAG: "pipeline"})  # still running: not counted
    old = client.create_run(experiment, tags={PARENT_TAG: "pipeline"})  # before tagging: apart
    client.set_terminated(old.info.run_id, "FAILED")
    stopped = {PARENT_TAG: "pipeline", "host": "node0", FAILURE_CLASS: "KeyboardInterrupt"}
    _ended_run(client, experiment, stopped, "fp32", "FAILED")  # MLflow's status for a Ctrl-C
    sweep = client.create_run(experiment, tags={PARENT_TAG: "sweep"})  # not a pipeline run
    client.set_terminated(sweep.info.run_id, "FAILED")

    data = failure_analysis(tracking)
    assert data["runs"] == 73 and data["failed"] == 24 + 9 + 1 and data["left_out"] == 1
    assert data["outcomes"] == {"ok": 39, "FloatingPointError": 24, "DataError": 9, "killed": 1}
    tests = {t["factor"]: t for t in data["factors"]}
    assert tests["precision"]["p_value"] < 1e-4
    assert tests["precision"]["table"]["FloatingPointError"] == {"fp16": 24, "fp32": 0}
    assert tests["host"]["p_value"] > 0.9  # the same shares on every host (but one interrupt)
    assert tests["stage"]["p_value"] < 1e-4  # the failed runs only: each class has its stage
    assert "ok" not in tests["stage"]["table"]
    for constant in ("mode", "world_size"):  # one value: nothing to test
        assert tests[constant]["p_value"] is None and "not testable" in tests[constant]["verdict"]

    assert main(["failures", "--set", f"tracking.uri={empty_store}"]) == 0
    printed = capsys.readouterr().out
    assert "73 runs, 34 failed" in printed and "1 older runs left out" in printed
    assert "the outcome depends on precision (p < 0.05)" in printed
    assert "no evidence that the outcome depends on host" in printed
    assert main(["failures", "--json", "--set", f"tracking.uri={empty_store}"]) == 0
    assert json.loads(capsys.readouterr().out)["failed"] == 34


def test_a_failed_run_records_its_error_class_stage_and_host(empty_store):
    tracking = TrackingConfig(uri=empty_store)
    tracker = Tracker(tracking)
    with pytest.raises(DataError):
        with tracker.parent("2026-11-30", "manual", {"train.precision": "fp32"}):
            with tracker.stage("ingest"):
                pass
            with tracker.stage("dedupe"):
                raise DataError("no rows: data.raw_path = /nowhere holds files but no data rows")
    run = MlflowClient(empty_store).get_run(tracker.parent_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_CLASS] == "DataError"
    assert run.data.tags[FAILURE_STAGE] == "dedupe"
    assert run.data.tags["failure.message"].startswith("DataError: no rows")
    assert run.data.tags["host"] == socket.gethostname()
    assert failure_analysis(tracking)["outcomes"] == {"DataError": 1}
