"""Distributed training for real: 2-process gloo DDP through TorchDistributor (local and barrier
mode) and torchrun, time budgets, precisions, and resume after a killed rank."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import StageError
from core.layout import RunContext
from pipelines.flow import run_pipeline
from tests.conftest import config_for
from trainers.featurizer import Featurizer
from trainers.launch import launch_distributor
from trainers.trainer import FAULT_RANK_ENV, FAULT_STEP_ENV

pytestmark = pytest.mark.integration

DATA = [
    "generate.num_events=8000",
    "generate.num_queries=1500",
    "generate.num_labels=6",
    "model.dim=16",
]


@pytest.fixture(scope="module")
def shards(spark, tmp_path_factory):
    """Shards of a small generated log, made once by the real data stages."""
    root = tmp_path_factory.mktemp("train")
    cfg = config_for(root, *DATA)
    ctx = RunContext(cfg, "2026-11-01", spark=spark)
    run_pipeline(ctx, stop="shard")
    return cfg, ctx.stage_dir("shard")


def _spec(cfg, shard_dir: Path, out: Path, **train) -> dict:
    return {
        "shard_dir": str(shard_dir),
        "out_dir": str(out),
        "checkpoint_dir": str(out / "checkpoints"),
        "train": dataclasses.asdict(cfg.train) | train,
        "model": {"dim": cfg.model.dim, "hidden": list(cfg.model.hidden)},
        "featurizer": Featurizer.from_config(cfg.featurizer).settings(),
    }


def _ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))]


def test_all_ranks_stop_at_the_same_step_under_a_budget(shards, tmp_path):
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, time_budget_s=1.5, epochs=10_000, batch_size=8,
                 tolerance=-1e9, precision="bf16")  # fmt: skip
    result = launch_distributor(spec, 2, local_mode=True, use_gpu=False)
    assert result["stopped_by"] == "budget"
    assert result["precision"] == "bf16" and result["world_size"] == 2
    assert 1.5 <= result["time_used_s"] < 6
    ranks = _ranks(tmp_path)
    assert len(ranks) == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == result["steps"] > 0
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]  # DDP kept replicas equal
    assert 0 <= result["comm_fraction"] <= 1
    assert (tmp_path / "model.pt").exists()


def test_local_sgd_averages_the_replicas(shards, tmp_path):
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, mode="local_sgd", sync_every=7, epochs=3, batch_size=16,
                 tolerance=-1e9)  # fmt: skip
    result = launch_distributor(spec, 2, local_mode=True, use_gpu=False)
    ranks = _ranks(tmp_path)
    assert ranks[0]["steps"] == ranks[1]["steps"] == result["steps"]
    # averaged at the end: both replicas hold the same model, and it learned
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert result["val_accuracy"] > 0.6
    assert 0 < result["comm_fraction"] < 1


def test_resume_after_a_killed_rank(shards, tmp_path, monkeypatch):
    cfg, shard_dir = shards
    spec = _spec(cfg, shard_dir, tmp_path, epochs=3, batch_size=16, checkpoint_every=10,
                 tolerance=-1e9, time_budget_s=60, precision="fp64")  # fmt: skip
    monkeypatch.setenv(FAULT_RANK_ENV, "1")
    monkeypatch.setenv(FAULT_STEP_ENV, "25")
    with pytest.raises(StageError, match="rerun to resume"):
        launch_distributor(spec, 2, local_mode=True, use_gpu=False)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert saved == ["ckpt-10.pt", "ckpt-20.pt"]
    assert not (tmp_path / "model.pt").exists()
    result = launch_distributor(spec, 2, local_mode=True, use_gpu=False)  # the same run again
    assert result["resumed_from_step"] == 20
    assert result["stopped_by"] == "epochs" and result["epochs_run"] == 3
    ranks = _ranks(tmp_path)
    assert ranks[0]["steps"] == ranks[1]["steps"] == result["steps"]


def test_torchrun_launch_of_the_same_trainer(shards, tmp_path):
    cfg, shard_dir = shards
    spec_path = tmp_path / "train_spec.json"
    spec_path.write_text(
        json.dumps(_spec(cfg, shard_dir, tmp_path / "unused", epochs=2, tolerance=-1e9))
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
         "-m", "trainers.launch", str(spec_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["stopped_by"] == "epochs"
    assert (tmp_path / "out" / "model.pt").exists()
    assert len(_ranks(tmp_path / "out")) == 2


@pytest.mark.slow
def test_barrier_mode_on_a_local_cluster(shards, tmp_path):
    """``train.local_mode=false``: the processes are barrier tasks on two executor JVMs of a
    ``local-cluster`` master (a Spark standalone cluster in miniature), in their own driver."""
    cfg, shard_dir = shards
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(
        json.dumps(_spec(cfg, shard_dir, tmp_path / "out", epochs=2, tolerance=-1e9))
    )
    code = (
        "import json, sys\n"
        "from core.config import SparkConfig\n"
        "from core.spark import get_spark\n"
        "from trainers.launch import launch_distributor\n"
        "get_spark(SparkConfig(master='local-cluster[2,1,1024]', driver_memory='1g',"
        " conf={'spark.executor.memory': '1g'}))\n"
        "spec = json.load(open(sys.argv[1]))\n"
        "print(json.dumps(launch_distributor(spec, 2, local_mode=False, use_gpu=False)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(spec_path)], capture_output=True, text=True,
                          timeout=400, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["world_size"] == 2 and result["stopped_by"] == "epochs"
    ranks = _ranks(tmp_path / "out")
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["steps"] == ranks[1]["steps"]
