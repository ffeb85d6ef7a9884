"""Launchers: the same ``Trainer`` under TorchDistributor (local or barrier mode), torchrun, or
torch.multiprocessing on this machine alone (no Spark: the trainer's tests and benchmarks).

Every launcher hands each process a :class:`~trainers.spec.TrainSpec` (pickled, or read from
``train_spec.json`` under torchrun); rank 0's result is read from the spec's output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import socketserver
import sys
import threading
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.config import TrainConfig
from core.errors import StageError
from trainers.spec import TrainSpec
from trainers.trainer import RESULT_FILE, Trainer, select_device


def train_worker(spec: TrainSpec) -> dict[str, Any]:
    """The body of every training process: join the group, train, leave."""
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    _, backend = select_device(
        spec.train.use_gpu, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available()
    )
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    timeout = timedelta(seconds=spec.train.timeout_s)
    store = loopback_store(timeout)
    if store is None:  # torchrun's own store (TorchDistributor, torchrun), or another host
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        result = Trainer(spec).train()
    finally:
        dist.destroy_process_group()
    return result


def loopback_store(timeout: timedelta) -> dist.TCPStore | None:
    """The group's meeting point on 127.0.0.1 alone, where this process group meets on loopback
    and no torchrun serves one (``launch_processes``, reference runs): torch's own store
    listens on every address, so rank 0 binds the socket itself and hands it over. None
    elsewhere (``init_process_group`` then reads the environment as usual)."""
    if os.environ.get("MASTER_ADDR") != "127.0.0.1" or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    port, world = int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) != 0:
        return dist.TCPStore("127.0.0.1", port, world, False, timeout)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return dist.TCPStore("127.0.0.1", port, world, True, timeout, master_listen_fd=sock.detach())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_result(spec: TrainSpec) -> dict[str, Any]:
    """Rank 0's result, from the output folder every launcher shares."""
    result_path = Path(spec.out_dir) / RESULT_FILE
    if not result_path.exists():
        raise StageError(f"training finished without writing {result_path}")
    return json.loads(result_path.read_text())


@contextmanager
def _loopback_env(local_mode: bool):  # noqa: ANN202
    """Local mode stays on 127.0.0.1: gloo picks the loopback interface."""
    if not local_mode:
        yield
        return
    keys = ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "PET_LOCAL_ADDR", "OMP_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    # torchrun (which TorchDistributor's local mode starts with --standalone) otherwise serves its
    # store on this host's fully qualified name and hands that name to the workers as
    # MASTER_ADDR: a non-loopback address wherever the name resolves to one. PET_LOCAL_ADDR is
    # torchrun's --local-addr, read from the environment.
    os.environ["PET_LOCAL_ADDR"] = "127.0.0.1"
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


def _driver_host_log_server():  # noqa: ANN202 (pyspark.ml is imported only when training)
    """pyspark's barrier-mode log server listens on 0.0.0.0 whatever the driver's address; this
    one listens on the address it is given (``spark.driver.host``), and nowhere else."""
    from pyspark.ml.torch import log_communication as logs  # start-up speed: when training

    class DriverHostLogServer(logs.LogStreamingServer):
        def start(self, spark_host_address: str = "") -> None:
            if self.server:
                raise RuntimeError("Cannot start the server twice.")
            host = spark_host_address or "127.0.0.1"
            self.port = self._get_free_port(host)
            ready = threading.Event()

            def serve() -> None:
                with socketserver.ThreadingTCPServer(
                    (host, self.port), logs.WriteLogToStdout
                ) as srv:
                    self.server, srv.is_active = srv, True
                    ready.set()
                    srv.serve_forever(poll_interval=logs._SERVER_POLL_INTERVAL)

            self.serve_thread = threading.Thread(target=serve, daemon=True)
            self.serve_thread.start()
            ready.wait(timeout=30)

    return DriverHostLogServer


def distributor_for(t: TrainConfig):  # noqa: ANN201 (pyspark.ml is imported only here)
    """The run's TorchDistributor: ``train.world_size`` processes, on the driver
    (``train.local_mode``) or as barrier tasks on the executors. With ``train.use_gpu`` on a
    cluster, each task asks for ``spark.task.resource.gpu.amount`` GPUs; Spark hands it
    addresses its workers found with their discovery script, the distributor makes them the
    task's ``CUDA_VISIBLE_DEVICES``, and the worker takes ``cuda:<local rank>`` among them. In
    barrier mode the tasks' output comes back through a log server on the driver, which listens
    on ``spark.driver.host`` only (pyspark's own listens on every address)."""
    from pyspark.ml.torch import distributor  # pyspark.ml: only when training

    if not t.local_mode:  # the tasks stream their output back to a server on the driver
        distributor.LogStreamingServer = _driver_host_log_server()
    return distributor.TorchDistributor(
        num_processes=t.world_size, local_mode=t.local_mode, use_gpu=t.use_gpu
    )


def launch_distributor(spec: TrainSpec) -> dict[str, Any]:
    """Run :func:`train_worker` on ``train.world_size`` processes through Spark's
    TorchDistributor (``train.local_mode``: on the driver, else as barrier tasks; GPUs when
    ``train.use_gpu``) and return rank 0's result."""
    t = spec.train
    distributor = distributor_for(t)
    with _loopback_env(t.local_mode):
        try:
            distributor.run(train_worker, spec)
        except Exception as exc:  # the distributor raises RuntimeError with the output tail
            mode = "local" if t.local_mode else "barrier"
            raise StageError(
                f"training failed: TorchDistributor ({mode} mode, {t.world_size} processes) "
                f"{type(exc).__name__}: {str(exc)[-1500:]} (the processes' output is above; rerun "
                "to resume from the last checkpoint)"
            ) from exc
    return read_result(spec)


def _spawned_worker(rank: int, spec: TrainSpec, port: int) -> None:
    """One process of :func:`launch_processes`: torchrun's environment, then the worker."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(spec.train.world_size)})  # fmt: skip
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train_worker(spec)


def launch_processes(spec: TrainSpec) -> dict[str, Any]:
    """Run :func:`train_worker` on ``train.world_size`` processes of this machine, started by
    torch.multiprocessing (spawn) and meeting on 127.0.0.1, without Spark; return rank 0's
    result. A rank that fails or dies stops the others and raises ``StageError``."""
    try:
        mp.spawn(_spawned_worker, args=(spec, free_port()), nprocs=spec.train.world_size, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        raise StageError(
            f"training failed: {spec.train.world_size} local processes: {str(exc)[-1500:]} "
            "(rerun to resume from the last checkpoint)"
        ) from exc
    return read_result(spec)


def torchrun_main(argv: list[str] | None = None) -> int:
    """``torchrun --nnodes N --nproc-per-node P -m trainers.launch SPEC.json [--out DIR]``: a
    standalone (multi-node) launch of the same worker from the spec the train stage wrote.
    ``--out`` (default: ``torchrun/`` beside the spec) receives the model, the result and the
    checkpoints, so a relaunch with the same ``--out`` resumes."""
    parser = argparse.ArgumentParser(prog="python -m trainers.launch")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    spec = TrainSpec.read(args.spec)
    out = args.out or args.spec.parent / "torchrun"
    spec = dataclasses.replace(spec, out_dir=str(out), checkpoint_dir=str(out / "checkpoints"))
    result = train_worker(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in ("stopped_by", "steps", "time_used_s", "val_accuracy", "sync")
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main())
