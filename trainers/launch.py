"""Launchers: the same ``Trainer`` under TorchDistributor (local or barrier mode) or torchrun."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from core.errors import StageError
from trainers.trainer import RESULT_FILE


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The body of every training process: join the group, train, leave."""
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message="Sparse invariant checks")

    from trainers.trainer import Trainer, select_device

    _, backend = select_device(
        spec["train"]["use_gpu"], int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available()
    )
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    dist.init_process_group(backend, timeout=timedelta(seconds=spec["train"]["timeout_s"]))
    try:
        result = Trainer(spec).train()
    finally:
        dist.destroy_process_group()
    return result


@contextmanager
def _loopback_env(local_mode: bool):  # noqa: ANN202
    """Local mode stays on 127.0.0.1: gloo picks the loopback interface."""
    if not local_mode:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "OMP_NUM_THREADS")}
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    # One thread per process unless asked otherwise: the processes share this machine's cores.
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch_distributor(
    spec: dict[str, Any], world_size: int, *, local_mode: bool, use_gpu: bool
) -> dict[str, Any]:
    """Run :func:`train_worker` on ``world_size`` processes through Spark's TorchDistributor and
    return rank 0's result (read from the output folder, which every launcher shares)."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=world_size, local_mode=local_mode, use_gpu=use_gpu)
    with _loopback_env(local_mode):
        try:
            distributor.run(train_worker, spec)
        except Exception as exc:  # the distributor raises RuntimeError with the output tail
            mode = "local" if local_mode else "barrier"
            raise StageError(
                f"training failed: TorchDistributor ({mode} mode, {world_size} processes) "
                f"{type(exc).__name__}: {str(exc)[-1500:]} (the processes' output is above; rerun "
                "to resume from the last checkpoint)"
            ) from exc
    result_path = Path(spec["out_dir"]) / RESULT_FILE
    if not result_path.exists():
        raise StageError(f"training finished without writing {result_path}")
    return json.loads(result_path.read_text())


def torchrun_main(argv: list[str] | None = None) -> int:
    """``torchrun --nnodes N --nproc-per-node P -m trainers.launch SPEC.json [--out DIR]``: a
    standalone (multi-node) launch of the same worker from the spec the train stage wrote.
    ``--out`` (default: ``torchrun/`` beside the spec) receives the model, the result and the
    checkpoints, so a relaunch with the same ``--out`` resumes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainers.launch")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    out = args.out or args.spec.parent / "torchrun"
    spec["out_dir"] = str(out)
    spec["checkpoint_dir"] = str(out / "checkpoints")
    result = train_worker(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {k: result[k] for k in ("stopped_by", "steps", "time_used_s", "val_accuracy")}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main())
