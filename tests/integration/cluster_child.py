"""The child process of the barrier-mode test: a ``local-cluster`` Spark of its own, which trains
a spec in barrier mode and then shows where GPU tasks land, on one set of JVMs.

``local-cluster[2,1,1024]`` is a Spark standalone cluster in miniature: a master and two workers
of one core inside the driver's JVM, each worker's executor in a JVM of its own, all on
127.0.0.1. Each worker finds one GPU the way Spark's own tests find them without hardware: a
discovery script that only prints an address (the test's script hands the first worker to ask
``0`` and the second ``1``). Run as ``python -m tests.integration.cluster_child SPEC SCRIPT OUT``;
a test session already has its local Spark driver, and this needs a driver of its own. It prints
the training result as one JSON line and writes each GPU task's view to ``OUT/gpu-<rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

GPU_ADDRESSES = ["0", "1"]


def report_device(out: str) -> str:
    """Inside each GPU task's training process: what it was handed, and the device the
    trainer takes."""
    import torch  # noqa: F401  (the worker's own imports, as train_worker has them)

    from trainers.trainer import select_device

    local_rank = int(os.environ["LOCAL_RANK"])
    # no CUDA here: the selection is asked as it would run on a GPU node
    device, backend = select_device(True, local_rank, cuda_available=True)
    Path(out, f"gpu-{os.environ['RANK']}.json").write_text(json.dumps({
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "local_rank": local_rank,
        "world_size": int(os.environ["WORLD_SIZE"]), "device": str(device), "backend": backend,
        "master_addr": os.environ.get("MASTER_ADDR"),
    }))  # fmt: skip
    return os.environ["RANK"]


def main(spec_path: str, script: str, out: str) -> None:
    from core.config import SparkConfig, TrainConfig
    from core.spark import get_spark
    from tests.conftest import SMALL_DATA_JVM, SMALL_DATA_SPARK_CONF
    from trainers.launch import distributor_for, launch_distributor
    from trainers.spec import TrainSpec

    conf = {
        **SMALL_DATA_SPARK_CONF,  # the driver's JVM starts fast; the executors' the same way
        "spark.executor.extraJavaOptions": SMALL_DATA_JVM,
        "spark.worker.resource.gpu.amount": "1",
        "spark.worker.resource.gpu.discoveryScript": script,
        "spark.executor.resource.gpu.amount": "1",
        "spark.executor.cores": "1",
        "spark.executor.memory": "1g",
        "spark.task.resource.gpu.amount": "1",
    }
    spark = get_spark(SparkConfig(master="local-cluster[2,1,1024]", driver_memory="1g",
                                  app_name="zipfline-barrier-cluster", conf=conf))  # fmt: skip
    try:
        # the spec's own training, in barrier mode on the CPU (its tasks hold a GPU address
        # they do not use: every task of this cluster asks for one)
        print(json.dumps(launch_distributor(TrainSpec.read(spec_path))), flush=True)
        # the same cluster's tasks for a run with train.use_gpu
        train = TrainConfig(world_size=2, use_gpu=True, local_mode=False)
        distributor_for(train).run(report_device, out)
    finally:
        spark.stop()


if __name__ == "__main__":
    main(*sys.argv[1:4])
