"""A cluster on this machine: ``make cluster-up`` / ``make cluster-down``.

``python -m pipelines.cluster up [--dir DIR]`` starts, all bound to 127.0.0.1:

- a Spark standalone master (port 7077) and 2 workers (1 core and ``--worker-memory`` each, a
  work directory of its own), from the pip package's ``bin/spark-class``;
- a Dask scheduler (port 8786) and 2 workers (1 thread each);
- an MLflow tracking server (port 5000) on sqlite, serving its artifacts from ``DIR``.

Each process runs in its own session with its pid in ``DIR/pids/`` and its output in
``DIR/logs/``; ``up`` returns once every port answers and prints what ``conf/cluster/`` points
at. ``down`` stops them (SIGTERM to each process group, SIGKILL after a grace period). The
driver, executors and Dask workers share this machine's file system, so ``data.root`` needs no
shared mount here.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
SPARK_PORT, SPARK_UI_PORT, DASK_PORT, MLFLOW_PORT = 7077, 8080, 8786, 5000
DEFAULT_DIR = Path("cluster")
START_TIMEOUT_S = 120
STOP_GRACE_S = 10


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    port: int | None  # answers here once up (None: checked by its master instead)


def spark_home() -> Path:
    import pyspark  # start-up speed: only to find the Spark scripts

    return Path(pyspark.__file__).resolve().parent


def services(run_dir: Path, worker_memory: str) -> list[Service]:
    bin_dir = Path(sys.executable).parent
    spark_class = str(spark_home() / "bin" / "spark-class")
    master = f"spark://{HOST}:{SPARK_PORT}"
    out = [
        Service(
            "spark-master",
            [
                spark_class,
                "org.apache.spark.deploy.master.Master",
                "--host",
                HOST,
                "--port",
                str(SPARK_PORT),
                "--webui-port",
                str(SPARK_UI_PORT),
            ],
            SPARK_PORT,
        ),  # fmt: skip
    ]
    for i in (1, 2):
        work = run_dir / f"spark-worker-{i}"
        out.append(Service(f"spark-worker-{i}", [
            spark_class, "org.apache.spark.deploy.worker.Worker", master, "--host", HOST,
            "--cores", "1", "--memory", worker_memory, "--work-dir", str(work),
            "--webui-port", "0",
        ], None))  # fmt: skip
    out.append(Service("dask-scheduler", [str(bin_dir / "dask"), "scheduler", "--host", HOST,
                                          "--port", str(DASK_PORT), "--dashboard-address",
                                          f"{HOST}:0"], DASK_PORT))  # fmt: skip
    for i in (1, 2):
        out.append(Service(f"dask-worker-{i}", [
            str(bin_dir / "dask"), "worker", f"tcp://{HOST}:{DASK_PORT}", "--host", HOST,
            "--nthreads", "1", "--nworkers", "1", "--dashboard-address", f"{HOST}:0",
            "--local-directory", str(run_dir / f"dask-worker-{i}"),
        ], None))  # fmt: skip
    out.append(Service("mlflow", [
        str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(MLFLOW_PORT),
        "--backend-store-uri", f"sqlite:///{run_dir / 'mlflow.db'}",
        "--artifacts-destination", str(run_dir / "mlartifacts"), "--workers", "1",
    ], MLFLOW_PORT))  # fmt: skip
    return out


def environment() -> dict[str, str]:
    """What every process of the cluster runs with: Spark's daemons and web UIs, the executors'
    Python workers and their gloo sockets on loopback; MLflow without its job runner (whose
    consumers would outlive ``down``)."""
    return {**os.environ, "SPARK_LOCAL_IP": HOST, "SPARK_MASTER_HOST": HOST,
            "PYSPARK_PYTHON": sys.executable, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / "pids" / f"{name}.pid"


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None where no such process is: with the
    pid, it names a process that a reused pid cannot pass for."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before it may hold spaces


def _group_alive(pgid: int) -> bool:
    """Any process left in the group (the leader may have gone before its children)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(run_dir: Path) -> dict[str, int]:
    """The services of ``run_dir`` whose process group is still there, by name: a pid file
    names the group's leader and its start time, so a pid the system has since given to
    another process does not count (unless the group itself lives on without its leader)."""
    alive = {}
    for path in sorted((run_dir / "pids").glob("*.pid")):
        pid_text, _, started = path.read_text().partition(" ")
        pid = int(pid_text)
        now = _start_time(pid)
        if now is not None and now != started.strip():
            continue  # the pid is someone else's now
        if _group_alive(pid):
            alive[path.stem] = pid
    return alive


def up(run_dir: Path, worker_memory: str = "2g") -> None:
    run_dir = run_dir.resolve()
    if running(run_dir):
        raise SystemExit(f"cluster: already up in {run_dir} ({', '.join(running(run_dir))}); "
                         "make cluster-down first")  # fmt: skip
    busy = [p for p in (SPARK_PORT, SPARK_UI_PORT, DASK_PORT, MLFLOW_PORT) if _answers(p)]
    if busy:
        raise SystemExit(f"cluster: ports {busy} on {HOST} are taken by something else")
    for sub in ("pids", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    env = environment()
    started = [
        (service, _start(run_dir, service, env)) for service in services(run_dir, worker_memory)
    ]
    _wait_for_workers(run_dir, started)
    print(f"cluster: up in {run_dir} (pids in pids/, logs in logs/)")
    print(f"  spark://{HOST}:{SPARK_PORT}  (UI http://{HOST}:{SPARK_UI_PORT})")
    print(f"  dask   tcp://{HOST}:{DASK_PORT}")
    print(f"  mlflow http://{HOST}:{MLFLOW_PORT}")


def _start(run_dir: Path, service: Service, env: dict[str, str]) -> subprocess.Popen:
    """Start one service in a session of its own, its pid file written; where it has a port,
    return once the port answers."""
    for folder in service.argv:  # the work and local directories
        if folder.startswith(str(run_dir)) and not folder.endswith(".db"):
            Path(folder).mkdir(parents=True, exist_ok=True)
    log = (run_dir / "logs" / f"{service.name}.log").open("wb")  # fresh: read for readiness
    proc = subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=run_dir)  # fmt: skip
    _pid_file(run_dir, service.name).write_text(f"{proc.pid} {_start_time(proc.pid)}")
    if service.port is not None:
        _wait_for(service, proc, run_dir)
    return proc


def stop_service(run_dir: Path, name: str) -> None:
    """Stop one running service (SIGTERM to its group, SIGKILL after the grace period), as
    ``down`` stops them all: for the fault bench, which stops the tracking server mid-run."""
    run_dir = run_dir.resolve()
    pgid = running(run_dir).get(name)
    if pgid is None:
        raise SystemExit(f"cluster: {name} is not running in {run_dir}")
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.2)
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
    _pid_file(run_dir, name).unlink(missing_ok=True)


def start_service(run_dir: Path, name: str, worker_memory: str = "2g") -> None:
    """Start one service of the cluster again (after :func:`stop_service`)."""
    run_dir = run_dir.resolve()
    service = next(s for s in services(run_dir, worker_memory) if s.name == name)
    _start(run_dir, service, environment())


def _wait_for(service: Service, proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(service.port):
        if proc.poll() is not None or time.monotonic() > deadline:
            down(run_dir, quiet=True)
            raise SystemExit(f"cluster: {service.name} did not start; see "
                             f"{run_dir / 'logs' / (service.name + '.log')}")  # fmt: skip
        time.sleep(0.3)


def _wait_for_workers(run_dir: Path, started: list) -> None:
    """Until every Spark and Dask worker says in its log that it registered with its master."""
    deadline = time.monotonic() + START_TIMEOUT_S
    workers = [(s, p) for s, p in started if s.name.startswith(("spark-worker", "dask-worker"))]
    while True:
        pending = []
        for service, proc in workers:
            text = (run_dir / "logs" / f"{service.name}.log").read_text(errors="replace")
            if proc.poll() is not None or time.monotonic() > deadline:
                down(run_dir, quiet=True)
                raise SystemExit(f"cluster: {service.name} did not start; see "
                                 f"{run_dir / 'logs' / (service.name + '.log')}")  # fmt: skip
            if ("Successfully registered with master" not in text
                    and "Registered to:" not in text):  # fmt: skip
                pending.append(service.name)
        if not pending:
            return
        time.sleep(0.3)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def down(run_dir: Path, quiet: bool = False) -> None:
    """SIGTERM to every service's process group, SIGKILL to any group still there after the
    grace period; the pid files go, the logs stay."""
    run_dir = run_dir.resolve()
    alive = running(run_dir)
    for pgid in alive.values():
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while any(_group_alive(g) for g in alive.values()) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.2)
    for pgid in alive.values():
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
    for path in (run_dir / "pids").glob("*.pid"):
        path.unlink()
    if not quiet:
        print(f"cluster: down ({len(alive)} services stopped; logs kept in {run_dir / 'logs'})")


def _reap() -> None:
    """Collect children of this process that have exited (``up`` failing part-way), so that
    they do not linger as zombies that still count as alive."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.cluster", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="the run folder (pids, logs, stores)"
    )
    parser.add_argument("--worker-memory", default="2g", help="memory of each Spark worker")
    args = parser.parse_args(argv)
    if args.action == "up":
        up(args.dir, args.worker_memory)
    elif args.action == "down":
        down(args.dir)
    else:
        alive = running(args.dir.resolve())
        print("\n".join(f"{name} {pid}" for name, pid in alive.items()) or "cluster: not up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
