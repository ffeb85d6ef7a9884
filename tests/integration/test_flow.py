"""The whole flow, end to end: real Spark, real MLflow (sqlite), real 2-process DDP (gloo).

The generated flow is the session's shared run (``tests/conftest.py``: every stage, augment
on, run once by the command line); the reruns work on a copy of it.
"""

from __future__ import annotations

import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.report import report_data
from pipelines.stages import NAMES as STAGES
from querylog.neardup import pair_scores
from tests.conftest import SHARED_SMALL, sets
from trainers.data import read_split
from trainers.launch import free_port
from trainers.serving import Predictor

pytestmark = pytest.mark.integration


def _runs(client: MlflowClient, data: dict, filter_string: str) -> list:
    experiment = client.get_run(data["run_id"]).info.experiment_id
    return client.search_runs([experiment], filter_string)


def test_generated_flow_end_to_end(shared_run):
    run = shared_run  # `zipfline run` of the generated log, every stage (read only)
    assert "MLflow run" in run.out and "make ui" in run.out
    assert "[8/9] evaluate" in run.err and "[9/9] select" in run.err  # progress lines

    data = report_data(run.tracking)
    assert data["status"] == "FINISHED" and data["trigger"] == "manual"
    assert list(data["stages"]) == list(STAGES)
    for name, stage in data["stages"].items():
        assert (
            stage["rows_in"] == stage["rows_out"] + stage["rows_quarantined"] + stage["rows_merged"]
        ), name
        assert sum(stage["quarantined_by_reason"].values()) == stage["rows_quarantined"], name
    assert data["stages"]["generate"]["rows_out"] == 6000
    ingest = data["stages"]["ingest"]
    assert {"empty_query", "too_long"} <= set(ingest["quarantined_by_reason"])
    assert data["stages"]["dedupe"]["clusters"] < data["stages"]["dedupe"]["rows_out"]  # near-dups
    # the planted near-duplicates are found, and little else is merged
    run_dir = run.run_dir
    rows = pd.read_parquet(run_dir / "dedupe" / "rows").set_index("query")
    truth = pd.read_parquet(run_dir / "generate" / "_truth" / "queries.parquet").set_index("query")
    precision, recall = pair_scores(rows["cluster_id"], truth["group"])
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    # no near-duplicate cluster is split between training and test
    train = pd.read_parquet(run_dir / "split" / "train")
    test = pd.read_parquet(run_dir / "split" / "test")
    assert set(train["cluster_id"]).isdisjoint(test["cluster_id"])
    assert data["stages"]["dedupe"]["rows_in"] == ingest["rows_out"]
    augmented = pd.read_parquet(run_dir / "augment" / "train")
    assert data["stages"]["augment"]["rows_augmented"] == augmented["aug_of"].notna().sum() > 0
    assert data["stages"]["shard"]["rows_in"] == len(augmented) + len(
        pd.read_parquet(run_dir / "split" / "validation")
    )  # the shards are made from the augmented training rows

    for key in ("test_error", "test_error_weighted", "test_logloss", "breadth", "acc_tail",
                "bayes_error", "steps", "step_time_s", "samples_per_s", "time_used_s"):  # fmt: skip
        assert key in data, key
    for bucket in ("head", "torso"):  # a bucket the small test split lacks is missing, with why
        assert (f"acc_{bucket}" in data) == (data[f"n_test_{bucket}"] > 0)
        assert (f"acc_{bucket}" in data["missing"]) == (data[f"n_test_{bucket}"] == 0)
    for key in ("precision", "world_size", "mode", "batch_size", "lr", "model_capacity",
                "n_train", "time_budget_s", "tolerance", "seed"):  # fmt: skip
        assert key in data, key
    assert data["world_size"] == "2" and data["precision"] == "fp32"
    assert data["stopped_by"] in {"budget", "converged", "epochs"}
    assert data["bayes_known"] == "true"
    # accuracy well above the majority-class rate, and no better than the Bayes error allows
    assert data["test_error"] < data["baseline_error"] - 0.3
    assert data["test_error"] >= data["bayes_error"] - 0.05

    # the model in MLflow predicts from raw text exactly as the trainer saw the shards
    client = MlflowClient(run.tracking.uri)
    train_run = next(iter(_runs(client, data, "tags.stage = 'train'")))
    for gate in ("ingest", "dedupe", "split", "shard"):  # every gate passes on clean data
        assert data["stages"][gate][f"dq_{gate}_success"] == 1, gate
        assert data["stages"][gate][f"dq_{gate}_unexpected"] == 0, gate
    ingest_run = next(iter(_runs(client, data, "tags.stage = 'ingest'")))
    logged = {a.path for a in client.list_artifacts(ingest_run.info.run_id, "dq")}
    assert {"dq/ingest.rows.json", "dq/ingest.rows.html", "dq/ingest.summary.json"} <= logged
    mlflow.set_tracking_uri(run.tracking.uri)
    served = mlflow.pyfunc.load_model(f"runs:/{train_run.info.run_id}/model")
    shard_dir = run_dir / "shard"
    queries = pd.read_parquet(shard_dir / "validation-00000.parquet")["query"].tolist()
    raw = [q.upper() + "  " for q in queries]  # raw text, as a user would send it
    from_text = np.vstack(served.predict(pd.DataFrame({"query": raw}))["probabilities"])
    predictor = Predictor.from_file(run_dir / "train" / "model.pt")
    # TorchDistributor's processes met on the loopback address, not on this host's name
    ranks = [
        json.loads(p.read_text()) for p in sorted((run_dir / "train" / "ranks").glob("*.json"))
    ]
    assert [r["master_addr"] for r in ranks] == ["127.0.0.1", "127.0.0.1"]
    val = read_split(shard_dir, "validation", 0, 1)
    ids, offsets, _, _ = val.batch(np.arange(len(queries)))
    with torch.no_grad():
        from_shards = torch.softmax(predictor.model(ids, offsets), 1).numpy()
    assert np.allclose(from_text, from_shards, atol=1e-6)

    # the error decomposition: every term is there or missing with its reason, and they add up
    for term in ("err_approx", "err_estim", "err_optim"):
        assert (term in data) != (term in data["missing"]), term
    assert "err_optim" in data  # the converged reference run always gives the optimization term
    if "err_approx" in data:
        total = data["err_approx"] + data["err_estim"] + data["err_optim"]
        assert total == pytest.approx(data["test_error"] - data["bayes_error"], abs=1e-9)
    cache = list((run.root / "_reference_cache").glob("*.json"))
    assert len(cache) == 1 and len(json.loads(cache[0].read_text())) == 4

    _check_the_mlflow_ui(data, run.tracking.uri)

    # the first model becomes the champion
    assert data["promotion"] == "accepted" and data["promotion_reason"] == "no champion yet"
    champion = client.get_model_version_by_alias("zipfline", "champion")
    assert str(champion.version) == data["model_version"] == "1"
    assert data["test_error_ci_low"] <= data["test_error"] <= data["test_error_ci_high"]
    assert "→" in data["top_confusions"]


def test_reruns_of_the_flow_redo_what_changed_and_reuse_the_rest(finished_run, capsys):
    """On a copy of the shared run: the registry's verdict on the same model again, the
    cached reference runs, the trade-off sweep on its shards, reuse by fingerprint, report."""
    run = finished_run
    data = report_data(run.tracking)  # the shared run, from the copy's store
    client = MlflowClient(run.tracking.uri)

    # registry settings are evaluate's: it runs again (train reused) and registers the model
    # again; the same model does not beat the champion by the margin
    capsys.readouterr()
    assert main(run.argv("registry.margin=1")) == 0
    assert "[7/9] train     reused (same settings and inputs)" in capsys.readouterr().err
    again = report_data(run.tracking)
    assert again["promotion"] == "rejected" and again["model_version"] == "2"
    assert "does not beat the champion's" in again["promotion_reason"]
    assert str(client.get_model_version_by_alias("zipfline", "champion").version) == "1"
    assert client.get_model_version("zipfline", "2").tags["promotion"] == "rejected"

    # a stage whose settings changed runs again, and so does every stage after it; evaluating
    # again reuses the cached reference runs
    capsys.readouterr()
    changed = ("eval.breadth_recall=0.5", "registry.enabled=false")
    assert main(run.argv(*changed)) == 0
    err = capsys.readouterr().err
    assert "[7/9] train     reused (same settings and inputs)" in err
    assert "[8/9] evaluate  running (settings or inputs changed)" in err
    assert "[9/9] select    running (settings or inputs changed)" in err
    assert "reference runs from cache" in err
    assert report_data(run.tracking)["err_optim"] == pytest.approx(data["err_optim"])

    eval_run = _runs(client, data, "tags.stage = 'evaluate'")[0]
    plots = {a.path for a in client.list_artifacts(eval_run.info.run_id, "plots")}
    assert "plots/accuracy_by_bucket.png" in plots and "plots/learning_curve.png" in plots

    # the trade-off sweep on the same shards: a tiny grid on a real Dask LocalCluster
    capsys.readouterr()
    grid = ["sweep.budgets_s=[0.5, 2]", "sweep.fractions=[0.5, 1.0]", "sweep.dims=[8]",
            "sweep.precisions=[fp32]"]  # fmt: skip
    assert main(["sweep", "--run-date", run.run_date, *run.sets(*grid)]) == 0
    printed = capsys.readouterr().out
    assert "best configuration per budget:" in printed and "     2 s: n=" in printed
    sweep_run = _runs(client, data, "tags.`zipfline.kind` = 'sweep'")[0]
    points = client.search_runs([sweep_run.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{sweep_run.info.run_id}'")  # fmt: skip
    assert len(points) == 4 and all("test_error" in p.data.metrics for p in points)
    assert {p.data.params["time_budget_s"] for p in points} == {"0.5", "2.0"}
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} >= {
        "tradeoff.png",
        "sweep.json",
    }

    # the α-β plan on the same shards, with the network given: a table, its files, and the
    # files in the run date's latest pipeline run
    capsys.readouterr()
    assert main(["plan", "--run-date", run.run_date, "--workers", "1,2,4", "--bandwidth", "1e8",
                 "--latency", "1e-4", *run.sets()]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "one worker:" in printed and "local_sgd" in printed and "async" in printed
    plan = json.loads((run.run_dir / "plan" / "plan.json").read_text())
    assert plan["link"] == {"latency_s": 1e-4, "bandwidth": 1e8, "source": "given"}
    assert [(p["workers"], p["mode"]) for p in plan["predictions"]] == [
        (n, m) for n in (1, 2, 4) for m in ("sync", "local_sgd", "async")
    ]
    assert plan["costs"]["compute_s"] > 0 and plan["costs"]["exchange_bytes"] > 0
    latest = report_data(run.tracking)["run_id"]  # the run date's latest pipeline run
    assert f"MLflow run {latest}" in printed
    logged = {a.path for a in client.list_artifacts(latest, "plan")}
    assert logged == {"plan/plan.json", "plan/plan.png"}
    # the bandwidth given, the latencies measured: idle, then fitted to two workers computing
    assert main(["plan", "--run-date", run.run_date, "--workers", "1,2", "--bandwidth", "1e8",
                 *run.sets()]) == 0  # fmt: skip
    assert "latencies fitted to two workers" in capsys.readouterr().out
    plan = json.loads((run.run_dir / "plan" / "plan.json").read_text())
    for link in (plan["link"], plan["collective_link"]):
        assert link["bandwidth"] == 1e8 and link["latency_s"] >= link["idle_latency_s"] > 0
    assert plan["costs"]["loaded_compute_s"] > 0 and plan["costs"]["average_s"] >= 0
    with pytest.raises(SystemExit) as usage:  # a bad count: argparse's usage error
        main(["plan", "--workers", "0,2", *run.sets()])
    assert usage.value.code == 2 and "worker counts such as 1,2,4,8,16" in capsys.readouterr().err

    # a rerun with the same settings and inputs reuses every stage and is tracked as a new run
    assert main(run.argv(*changed)) == 0
    rerun = report_data(run.tracking)
    assert rerun["run_id"] != data["run_id"]
    assert all(s["skipped"] for s in rerun["stages"].values())
    capsys.readouterr()
    tracking = sets(f"tracking.uri={run.tracking.uri}")
    assert main(["report", "--json", *tracking]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run_id"] == rerun["run_id"] and "stages" in printed
    assert main(["report", data["run_id"], *tracking]) == 0
    assert "dedupe" in capsys.readouterr().out


def test_user_csv_folder_flow(spark, in_tmp, empty_store, capsys):
    """A folder of CSV files with query,label that zipfline did not generate."""
    rng = random.Random(5)
    topics = {
        "books": ["novel", "author", "paperback", "isbn", "library", "poetry", "chapter"],
        "music": ["guitar", "album", "lyrics", "concert", "band", "vinyl", "drums"],
        "travel": ["flight", "hotel", "beach", "visa", "airport", "cruise", "hostel"],
    }
    raw = in_tmp / "logs"
    raw.mkdir()
    for part in range(3):
        rows = []
        for _ in range(700):
            label = rng.choice(list(topics))
            words = rng.sample(topics[label], 2) + [
                rng.choice(["cheap", "best", "near me", "", "2026"])
            ]
            rows.append({"query": " ".join(words).strip(), "label": label})
        rows.append({"query": "", "label": "books"})
        pd.DataFrame(rows).to_csv(raw / f"part-{part}.csv", index=False)
    tracking = [f"tracking.uri={empty_store}", f"data.root={in_tmp / 'data'}"]
    # --budget: the training setup measured within 8 s, no epoch cap; the processes started by
    # torch.multiprocessing (the shared run covers TorchDistributor's launch)
    argv = ["run", "--run-date", "2026-11-02", "--budget", "8",
            *sets(*SHARED_SMALL, *tracking, f"data.raw_path={raw}", "train.epochs=null",
                  "train.launcher=processes")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[train] auto: train.batch_size = " in err and "Chebyshev" in err
    assert main(["report", "--json", *sets(*tracking)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stopped_by"] in ("budget", "converged")  # never by epochs without a cap
    assert float(data["time_budget_s"]) == 8.0
    client = MlflowClient(empty_store)
    train_run = next(iter(_runs(client, data, "tags.stage = 'train'")))
    params = train_run.data.params
    assert params["auto.batch_size"] == params["batch_size"]
    assert float(params["auto.lr.lambda_max"]) > 0 and float(params["auto.batch_size.sigma2"]) > 0
    assert params["auto.precision"] in ("fp32", "bf16")
    # two numba workers: the mode from the kernel's measured pace (8 s are room enough here to
    # converge, so the replicas are averaged), and that mode is what ran
    assert float(params["auto.mode.kernel_samples_per_s"]) > 0
    assert params["auto.mode"] == params["mode"] == "local_sgd" and params["sync"] == "average"
    assert "auto_plan.json" in {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert "generate" not in data["stages"]
    assert data["stages"]["ingest"]["rows_in"] == 2103
    assert data["stages"]["ingest"]["quarantined_by_reason"] == {"empty_query": 3}
    # no truth: the best reference run stands in for the Bayes risk, tagged bayes_known=false
    assert data["bayes_known"] == "false"
    if "err_approx" in data:
        assert data["bayes_error"] <= data["test_error"] + data["err_optim"] + 1e-9
        total = data["err_approx"] + data["err_estim"] + data["err_optim"]
        assert total == pytest.approx(data["test_error"] - data["bayes_error"], abs=1e-9)
    else:
        assert "bayes_error" not in data and "err_approx" in data["missing"]
    assert data["test_error"] < 0.2


def _check_the_mlflow_ui(data: dict, store: str) -> None:
    """Start the MLflow UI on 127.0.0.1 as `make ui` does (without MLflow's job runner and its
    seven queue consumers, which serve jobs this check does not use) and read the run through
    its REST API: its metrics (stage counts, gates, the decomposition), tags and artifacts; then
    its pages in headless Chromium."""
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "ui", "--backend-store-uri", store, "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def get(path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(base + path)
        if body is not None:  # runs/search is a POST
            request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 90
        while True:  # bounded: the server is up within the deadline or the test fails
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 90 s"
                time.sleep(0.5)
        run = get(f"/api/2.0/mlflow/runs/get?run_id={data['run_id']}")["run"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert metrics["test_error"] == pytest.approx(data["test_error"])
        assert tags["promotion"] in {"accepted", "rejected"} and tags["run_date"] == "2026-11-01"
        assert metrics["err_optim"] == pytest.approx(data["err_optim"])
        assert any(k.startswith("system/") for k in metrics)  # system metrics are on
        children = get("/api/2.0/mlflow/runs/search",
                       {"experiment_ids": [run["info"]["experiment_id"]],
                        "filter": "tags.stage = 'ingest'"})["runs"]  # fmt: skip
        child = next(c for c in children if any(
            t["key"] == "mlflow.parentRunId" and t["value"] == data["run_id"]
            for t in c["data"]["tags"]))  # fmt: skip
        child_metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert child_metrics["dq_ingest_success"] == 1 and child_metrics["rows_in"] > 0
        listed = get(f"/api/2.0/mlflow/artifacts/list?run_id={child['info']['run_id']}&path=dq")
        assert any(f["path"].endswith("ingest.rows.html") for f in listed["files"])
        _check_the_pages_in_chromium(base, run["info"]["experiment_id"], data)
    finally:
        server.terminate()
        server.wait(timeout=30)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
"""Debian's chromium (`.ci/run` installs it where it can), for the UI's pages as a user sees them."""


def _rendered_text(url: str, profile: Path) -> str:
    """The text of ``url``'s page once its scripts have run, from headless Chromium with a new
    profile (no remembered view) and nothing but loopback traffic."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-2000:]
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", proc.stdout)))


def _check_the_pages_in_chromium(base: str, experiment_id: str, data: dict) -> None:
    """The links zipfline prints, opened in headless Chromium: the experiment opens on its
    training runs (not MLflow's GenAI overview) and lists the run; the run page shows the run's
    description, its datasets, its tags and its metrics."""
    if CHROMIUM is None:
        warnings.warn("the MLflow UI's pages were not checked: no chromium (apt-get install "
                      "chromium)", stacklevel=2)  # fmt: skip
        return
    with tempfile.TemporaryDirectory(prefix="zipfline-chromium-") as profile:
        view = "workflowType=machine_learning"
        experiment = _rendered_text(f"{base}/#/experiments/{experiment_id}?{view}", Path(profile))
        # the runs list, not the GenAI overview (its Usage tab), with the run and its datasets
        assert "zipfline 2026-11-01" in experiment and "Usage" not in experiment
        for name in ("train shards (", "validation shards (", "test split ("):
            assert name in experiment, name
        page = _rendered_text(
            f"{base}/#/experiments/{experiment_id}/runs/{data['run_id']}?{view}", Path(profile)
        )
    assert "Description Pipeline run 2026-11-01" in page  # the description, first on the page
    assert f"test_error {data['test_error']:.4f}" in page
    assert "Datasets train shards (" in page and "+2" in page  # the other two behind "+2"
    assert "promotion : accepted" in page and "bayes_known : true" in page  # tags
    assert "err_optim" in page and "Parameters" in page
