"""GPU scheduling without a GPU, the way Spark's own tests do it: a fake discovery script.

A ``local-cluster`` Spark (a standalone master and one worker with 2 cores inside the driver's
JVM, its executor in a JVM of its own, all on 127.0.0.1) whose worker finds two GPUs through a script that only prints their addresses. The train
stage's TorchDistributor with ``train.use_gpu`` runs two barrier tasks there; each asks for one
GPU, gets its own, and the training process the distributor starts sees only that one, which
the trainer's device selection then takes. Runs in a child process: a test session already has
its local Spark driver, and this needs a driver of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = ["0", "1"]


def _report_device(out: str) -> str:
    """Inside each training process: what it was handed, and the device the trainer takes."""
    import torch  # noqa: F401  (the worker's own imports, as train_worker has them)

    from trainers.trainer import select_device

    local_rank = int(os.environ["LOCAL_RANK"])
    # no CUDA here: the selection is asked as it would run on a GPU node
    device, backend = select_device(True, local_rank, cuda_available=True)
    Path(out, f"rank-{os.environ['RANK']}.json").write_text(json.dumps({
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "local_rank": local_rank,
        "world_size": int(os.environ["WORLD_SIZE"]), "device": str(device), "backend": backend,
        "master_addr": os.environ.get("MASTER_ADDR"),
    }))  # fmt: skip
    return os.environ["RANK"]


def main(script: str, out: str) -> None:
    from core.config import SparkConfig, TrainConfig
    from core.spark import get_spark
    from tests.conftest import SMALL_DATA_JVM
    from trainers.launch import distributor_for

    conf = {
        "spark.worker.resource.gpu.amount": str(len(ADDRESSES)),
        "spark.worker.resource.gpu.discoveryScript": script,
        "spark.executor.resource.gpu.amount": str(len(ADDRESSES)),
        "spark.executor.cores": "2",
        "spark.executor.memory": "512m",
        "spark.task.resource.gpu.amount": "1",
        # JVMs that start fast (the work is a few RPCs)
        "spark.driver.extraJavaOptions": SMALL_DATA_JVM,
        "spark.executor.extraJavaOptions": SMALL_DATA_JVM,
    }
    spark = get_spark(SparkConfig(master="local-cluster[1,2,1024]", driver_memory="512m",
                                  app_name="zipfline-gpu-scheduling", conf=conf))  # fmt: skip
    try:
        train = TrainConfig(world_size=2, use_gpu=True, local_mode=False)
        distributor_for(train).run(_report_device, out)
    finally:
        spark.stop()


def test_barrier_tasks_each_get_their_own_gpu(tmp_path):
    script = tmp_path / "discover_gpus.sh"
    script.write_text(f"#!/bin/sh\necho '{json.dumps({'name': 'gpu', 'addresses': ADDRESSES})}'\n")
    script.chmod(0o755)
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # set, it would win over the tasks' own GPUs
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_gpu_scheduling", str(script), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    assert len(ranks) == 2 and {r["world_size"] for r in ranks} == {2}
    # each task was handed one of the discovered GPUs, and not the same one
    assert sorted(r["visible"] for r in ranks) == ADDRESSES
    # one process per task: local rank 0, so the trainer takes the only device it sees, NCCL
    assert {(r["local_rank"], r["device"], r["backend"]) for r in ranks} == {(0, "cuda:0", "nccl")}
    assert {r["master_addr"] for r in ranks} == {"127.0.0.1"}


if __name__ == "__main__":
    main(*sys.argv[1:3])
