"""Faults injected into real runs of ``zipfline run``, each bounded in time, each followed by the
documented recovery, each checked against a clean run of the same settings.

For every fault: the first run either completes or fails with one clear line; the recovery
(usually the same command again) must end with the clean run's counts at every stage, with
``rows_in = rows_out + rows_quarantined + rows_merged`` at every stage, with no partial outputs
left in the run's folder (Spark's ``_temporary``, our ``*.tmp``), and with the same test error
within noise. The faults covered so far:

- ``kill-driver``: SIGKILL to the whole ``zipfline run`` process group while dedupe runs; rerun.
- ``kill-rank``: a training rank kills itself mid-epoch (the trainer's fault hook); rerun
  resumes from the last checkpoint.
- ``flip-shard-byte``: one byte of a finished shard flipped after the manifest was written;
  the rerun refuses the shard naming it, and ``--from shard --force`` rebuilds it.
- ``two-runs``: a second run of the same date started while the first is in dedupe; it stops at
  once naming the first (the date's lock), the first completes, and the second, run again
  once the first is done, reuses its stages.
- ``raw-file-gone``: the first raw file moved away between ingest's listing and its reading
  (ingest's fault hook); ingest stops naming the file and writes nothing; with the file back,
  the same command again.
- ``disk-full``: ``data.root`` on a tmpfs (needs root to mount it; skipped otherwise), which
  another writer fills as training starts; the run stops with one line saying so, with train
  not marked done; the other writer's file removed, the same command again.

On a cluster of this machine (``pipelines.cluster``: Spark standalone, Dask, an MLflow server,
all on 127.0.0.1, started in the work folder for these faults and stopped after):

- ``kill-executor``: SIGKILL to one executor JVM while dedupe runs; Spark retries its tasks on
  the executors left (and the one the worker starts again), and the run completes.
- ``mlflow-restart``: the tracking server stopped while dedupe runs and started again 20 s
  later; MLflow's client retries its calls, and the run completes, its runs whole on the server.
- ``kill-dask-worker``: SIGKILL to one Dask worker while the reference runs go on the scheduler;
  Dask moves its tasks to the other worker (its nanny starts a new one), and the decomposition
  is logged.

    .venv/bin/python bench/faults.py [--events 20000] [--work DIR] [--only NAME ...] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from core.atomic import leftovers
from core.layout import MARKER
from jobs.ingest import FAULT_MOVE_RAW_ENV
from pipelines import cluster

ZIPFLINE = str(Path(sys.executable).parent / "zipfline")
RUN_DATE = "2026-11-01"
RUN_TIMEOUT_S = 600
TEST_ERROR_NOISE = 0.02  # a rerun trains again where the fault hit training: not bit-equal


def settings(root: Path, events: int) -> list[str]:
    small = [
        f"generate.num_events={events}", f"generate.num_queries={max(events // 10, 500)}",
        "generate.num_labels=6", "model.dim=16", "featurizer.num_buckets=65536",
        "train.time_budget_s=30", "train.checkpoint_every=20", "train.batch_size=32",
        "eval.decompose=false", "registry.enabled=false", "select.enabled=false",
        "spark.master=local[2]", "spark.shuffle_partitions=4",
        f"data.root={root / 'data'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
    ]  # fmt: skip
    return [x for s in small for x in ("--set", s)]


def zipfline(args: list[str], env: dict | None = None, timeout: float = RUN_TIMEOUT_S):
    """``zipfline ARGS`` in a session of its own; past ``timeout`` the whole group is killed
    (its JVM and training processes too) and the result says so."""
    proc = subprocess.Popen([ZIPFLINE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\nfaults: timed out after {timeout:.0f}s"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def report(sets: list[str]) -> dict:
    proc = zipfline(["report", "--json", *sets])
    if proc.returncode != 0:
        raise RuntimeError(f"zipfline report failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def partial_outputs(root: Path) -> list[str]:
    """Half-written outputs under the run's folder: our atomic writers' temporary siblings and
    Spark's ``_temporary`` folders."""
    day = root / "data" / RUN_DATE
    found = leftovers(day) + [p for p in day.rglob("_temporary")]
    return sorted(str(p.relative_to(day)) for p in found)


def compare(clean: dict, got: dict) -> dict:
    """The recovered run against the clean one: rows short at the stage that lost the most
    (0: none), stages missing from the report, whether every count is the clean run's, and
    the stages that ran again (the others answered from their outputs: counts read back from
    their markers, which prove less)."""
    stages = got.get("stages", {})
    short = [max(0, c["rows_out"] - stages[n]["rows_out"]) for n, c in clean["stages"].items()
             if n in stages]  # fmt: skip
    keys = ("rows_in", "rows_out", "rows_quarantined", "rows_merged")
    return {
        "rows_lost": max(short, default=None) if stages else None,
        "missing": [n for n in clean["stages"] if n not in stages],
        "same_counts": bool(stages)
        and all(stages.get(n, {}).get(k) == c[k] for n, c in clean["stages"].items() for k in keys),
        "reran": [n for n, s in stages.items() if not s.get("skipped")],
        "test_error": got.get("test_error"),
    }


def watch(args: list[str], when: tuple[str, ...], act, env: dict | None = None):  # noqa: ANN001
    """``zipfline ARGS`` in a session of its own, its output (stdout and stderr together) read
    line by line; at the first line holding every word of ``when``, ``act(proc)`` starts in a
    thread of its own (the output is still read meanwhile). Past ``RUN_TIMEOUT_S`` the group is
    killed. Returns the exit code, the output, and whether ``act`` ran."""
    proc = subprocess.Popen([ZIPFLINE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})},
                            start_new_session=True)  # fmt: skip
    timer = threading.Timer(RUN_TIMEOUT_S, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    acting, lines = None, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if acting is None and all(word in line for word in when):
                acting = threading.Thread(target=act, args=(proc,), daemon=True)
                acting.start()
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if acting is not None:
            acting.join(timeout=120)
    return proc.returncode, "".join(lines), acting is not None


def setting(sets: list[str], key: str) -> str:
    return next(item.split("=", 1)[1] for item in sets if item.startswith(key + "="))


def fault_kill_driver(root: Path, sets: list[str]) -> dict:
    cmd = [ZIPFLINE, "run", "--run-date", RUN_DATE, *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    killed = False
    timer = threading.Timer(RUN_TIMEOUT_S, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in proc.stdout:  # dedupe has started: kill the driver, its JVM, everything
            if "dedupe" in line and "running" in line:
                time.sleep(2.0)
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
    finally:
        timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    dedupe_done = (root / "data" / RUN_DATE / "dedupe" / MARKER).exists()
    if not killed or dedupe_done:
        return {"first": "fault missed: " + ("dedupe had finished" if killed else "no dedupe"),
                "recovered": False}  # fmt: skip
    again = zipfline(["run", "--run-date", RUN_DATE, *sets])
    return {"first": f"killed (SIGKILL, exit {proc.returncode}) during dedupe",
            "recovery": "the same command again", "recovered": again.returncode == 0,
            "left_behind": partial_outputs(root)}  # fmt: skip


def fault_kill_rank(root: Path, sets: list[str]) -> dict:
    hook = {"ZIPFLINE_FAULT_KILL_RANK": "1", "ZIPFLINE_FAULT_KILL_AT_STEP": "45"}
    first = zipfline(["run", "--run-date", RUN_DATE, *sets], env=hook)
    again = zipfline(["run", "--run-date", RUN_DATE, *sets])
    resumed = "resumed from" in again.stdout + again.stderr
    return {"first": "failed: " + last_line(first.stderr) if first.returncode else "completed",
            "recovery": "the same command again" + (" (resumed from a checkpoint)" if resumed
                                                    else " (did not resume)"),
            "recovered": again.returncode == 0, "resumed": resumed}  # fmt: skip


def fault_flip_shard_byte(root: Path, sets: list[str]) -> dict:
    to_shard = zipfline(["run", "--run-date", RUN_DATE, "--to", "shard", *sets])
    if to_shard.returncode:
        return {"first": "setup failed: " + last_line(to_shard.stderr), "recovered": False}
    shard = sorted((root / "data" / RUN_DATE / "shard").rglob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    first = zipfline(["run", "--run-date", RUN_DATE, *sets])
    rebuilt = zipfline(["run", "--run-date", RUN_DATE, "--from", "shard", "--force", *sets])
    # then the plain command: every stage answers from its outputs, and the report has them all
    again = zipfline(["run", "--run-date", RUN_DATE, *sets])
    return {"first": "failed: " + last_line(first.stderr) if first.returncode else "completed",
            "recovery": "--from shard --force, then the same command again",
            "recovered": rebuilt.returncode == 0 and again.returncode == 0,
            "clear": "sha256 does not match the manifest" in first.stderr}  # fmt: skip


def fault_two_runs(root: Path, sets: list[str]) -> dict:
    second: dict = {}

    def start_second(_proc: subprocess.Popen) -> None:
        time.sleep(1.0)
        second["run"] = zipfline(["run", "--run-date", RUN_DATE, *sets])

    code, _, fired = watch(["run", "--run-date", RUN_DATE, *sets], ("dedupe", "running"),
                           start_second)  # fmt: skip
    refused = second.get("run")
    if not fired or refused is None:
        return {"first": "fault missed: the second run did not start", "recovered": False}
    again = zipfline(["run", "--run-date", RUN_DATE, *sets])
    said = last_line(refused.stderr)
    return {"first": f"first run exit {code}; second " + (f"refused: {said}" if refused.returncode
                                                          else "completed as well"),
            "recovery": "the second command again, once the first was done",
            "recovered": code == 0 and again.returncode == 0,
            "clear": refused.returncode == 1 and said.startswith("zipfline: error: another run of")
            }  # fmt: skip


def fault_raw_file_gone(root: Path, sets: list[str]) -> dict:
    raw = Path(setting(sets, "data.raw_path"))
    aside = root / "aside"
    aside.mkdir(parents=True)
    first = zipfline(["run", "--run-date", RUN_DATE, *sets], env={FAULT_MOVE_RAW_ENV: str(aside)})
    moved = sorted(aside.iterdir())
    said = last_line(first.stderr)
    written = (root / "data" / RUN_DATE / "ingest").exists()
    for path in moved:  # put back, as the operator would
        path.rename(raw / path.name)
    again = zipfline(["run", "--run-date", RUN_DATE, *sets])
    return {"first": "failed: " + said if first.returncode else "completed",
            "recovery": "the file put back, then the same command again",
            "recovered": bool(moved) and again.returncode == 0,
            "clear": first.returncode == 1 and "went away between listing and reading" in said
            and not written}  # fmt: skip


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fault_disk_full(root: Path, sets: list[str]) -> dict:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return {"first": "skipped: mounting a tmpfs needs root", "recovered": False,
                "skipped": True}  # fmt: skip
    data = root / "data"
    data.mkdir(parents=True)
    size = 4 * _bytes_under(root.parent / "clean" / "data") + (64 << 20)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(data)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        return {"first": f"skipped: mount failed ({last_line(mounted.stderr)})",
                "recovered": False, "skipped": True}  # fmt: skip
    atexit.register(subprocess.run, ["umount", "-l", str(data)], capture_output=True)
    ballast = data / "ballast"

    def fill(_proc: subprocess.Popen) -> None:  # another writer takes all the room there is
        with open(ballast, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * (1 << 20))

    code, out, fired = watch(["run", "--run-date", RUN_DATE, *sets], ("train", "running"), fill)
    said = last_line(out)
    done = sorted(p.parent.name for p in (data / RUN_DATE).glob(f"*/{MARKER}"))
    left = partial_outputs(root)
    ballast.unlink(missing_ok=True)
    again = zipfline(["run", "--run-date", RUN_DATE, *sets])
    return {"first": f"failed: {said}" if code else "completed (the fault missed)",
            "recovery": "the ballast removed, then the same command again",
            "recovered": fired and code != 0 and again.returncode == 0,
            "clear": "no space left under" in said and "train" not in done,
            "done_after_fault": done, "left_behind": left}  # fmt: skip


CLUSTER_SETS = ["--set", f"spark.master=spark://{cluster.HOST}:{cluster.SPARK_PORT}",
                "--set", f"tracking.uri=http://{cluster.HOST}:{cluster.MLFLOW_PORT}",
                "--set", f"eval.dask_scheduler=tcp://{cluster.HOST}:{cluster.DASK_PORT}"]  # fmt: skip
CLUSTER_ENV = {"PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": cluster.HOST}


def _group_members(pgid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _executors(cluster_dir: Path) -> list[int]:
    """The executor JVMs the cluster's Spark workers started (in their work directories)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "CoarseGrainedExecutorBackend" in text:
            pids.append(int(cmdline.parent.name))
    return sorted(pids)


def fault_kill_executor(root: Path, sets: list[str], cluster_dir: Path) -> dict:
    killed: list[int] = []

    def kill(_proc: subprocess.Popen) -> None:
        time.sleep(2.0)
        pids = _executors(cluster_dir)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    code, out, _ = watch(["run", "--run-date", RUN_DATE, *sets], ("dedupe", "running"), kill,
                         env=CLUSTER_ENV)  # fmt: skip
    if not killed:
        return {"first": "fault missed: no executor to kill", "recovered": False}
    return {"first": f"executor {killed[0]} killed in dedupe; the run "
            + ("completed" if code == 0 else f"failed: {last_line(out)}"),
            "recovery": "none needed (Spark retried the tasks)" if code == 0 else "",
            "recovered": code == 0}  # fmt: skip


def fault_mlflow_restart(root: Path, sets: list[str], cluster_dir: Path) -> dict:
    down_s: list[float] = []

    def restart(_proc: subprocess.Popen) -> None:
        time.sleep(2.0)
        t0 = time.monotonic()
        cluster.stop_service(cluster_dir, "mlflow")
        time.sleep(20.0)
        cluster.start_service(cluster_dir, "mlflow", "1g")
        down_s.append(time.monotonic() - t0)

    code, out, _ = watch(["run", "--run-date", RUN_DATE, *sets], ("dedupe", "running"),
                         restart, env=CLUSTER_ENV)  # fmt: skip
    if not down_s:
        return {"first": "fault missed: the server was not restarted", "recovered": False}
    unfinished = _unfinished_runs(f"http://{cluster.HOST}:{cluster.MLFLOW_PORT}")
    return {"first": f"server down {down_s[0]:.0f}s in dedupe; the run "
            + ("completed" if code == 0 else f"failed: {last_line(out)}"),
            "recovery": "none needed (the client retried)" if code == 0 else "",
            "recovered": code == 0 and not unfinished, "unfinished_runs": unfinished}  # fmt: skip


def _unfinished_runs(uri: str) -> list[str]:
    """Runs the tracking server still has as RUNNING: logging cut off half-way."""
    # start-up speed: MLflow only for this check
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'")]


def fault_kill_dask_worker(root: Path, sets: list[str], cluster_dir: Path) -> dict:
    killed: list[int] = []

    def kill(_proc: subprocess.Popen) -> None:
        time.sleep(3.0)
        pgid = cluster.running(cluster_dir).get("dask-worker-1")
        if pgid is not None:
            members = _group_members(pgid)
            os.killpg(pgid, signal.SIGKILL)  # the worker and its nanny: gone for good
            killed.extend(members)

    decompose = ["--set", "eval.decompose=true", "--set", "eval.reference_budget_s=15"]
    code, out, _ = watch(["run", "--run-date", RUN_DATE, *sets, *decompose],
                         ("reference runs on Dask",), kill, env=CLUSTER_ENV)  # fmt: skip
    cluster.start_service(cluster_dir, "dask-worker-1", "1g")
    if not killed:
        return {"first": "fault missed: no reference runs on Dask", "recovered": False}
    decomposed = "err_approx" in json.dumps(report([*sets, *decompose]))
    return {"first": f"Dask worker killed ({len(killed)} processes) in the reference runs; "
            "the run " + ("completed" if code == 0 else f"failed: {last_line(out)}"),
            "recovery": "none needed (Dask ran its tasks on the other worker)" if code == 0
            else "", "recovered": code == 0, "clear": decomposed}  # fmt: skip


FAULTS = {
    "kill-driver": fault_kill_driver,
    "kill-rank": fault_kill_rank,
    "flip-shard-byte": fault_flip_shard_byte,
    "two-runs": fault_two_runs,
    "raw-file-gone": fault_raw_file_gone,
    "disk-full": fault_disk_full,
    "kill-executor": fault_kill_executor,
    "mlflow-restart": fault_mlflow_restart,
    "kill-dask-worker": fault_kill_dask_worker,
}
ON_CLUSTER = {"kill-executor", "mlflow-restart", "kill-dask-worker"}
"""Each fault by name: given the fault's own folder and settings, it runs, recovers, and says
how (the checks against the clean run are :func:`main`'s)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "zipfline-faults"
    )
    parser.add_argument("--only", nargs="*", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.work.exists() and not (args.work / ".zipfline-faults").exists():
        raise SystemExit(f"{args.work} exists and is not a faults work folder: give another --work")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    (args.work / ".zipfline-faults").touch()
    raw = args.work / "raw"
    gen = zipfline(["generate", "--out", str(raw), "--events", str(args.events),
                    "--set", f"generate.num_queries={max(args.events // 10, 500)}",
                    "--set", "generate.num_labels=6"])  # fmt: skip
    if gen.returncode:
        raise SystemExit(f"generate failed: {gen.stderr[-800:]}")
    clean_root = args.work / "clean"
    sets = settings(clean_root, args.events) + ["--set", f"data.raw_path={raw}"]
    t0 = time.monotonic()
    clean_run = zipfline(["run", "--run-date", RUN_DATE, *sets])
    if clean_run.returncode:
        raise SystemExit(f"the clean run failed: {clean_run.stderr[-1500:]}")
    clean = report(sets)
    print(f"clean run: {time.monotonic() - t0:.0f}s, test_error {clean.get('test_error')}",
          file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    cluster_dir = args.work / "cluster"
    for name in args.only:
        root = args.work / name
        fault_raw = args.work / f"raw-{name}"
        shutil.copytree(raw, fault_raw)
        sets = settings(root, args.events) + ["--set", f"data.raw_path={fault_raw}"]
        t0 = time.monotonic()
        if name in ON_CLUSTER:
            if not cluster.running(cluster_dir):
                print("starting the cluster (pipelines.cluster) …", file=sys.stderr, flush=True)
                with contextlib.redirect_stdout(sys.stderr):  # --json's stdout is the table's
                    cluster.up(cluster_dir, "1g")
                atexit.register(cluster.down, cluster_dir, True)
            sets += CLUSTER_SETS
            t0 = time.monotonic()
            out = FAULTS[name](root, sets, cluster_dir)
        else:
            out = FAULTS[name](root, sets)
        seconds = time.monotonic() - t0
        got = report(sets) if out.get("recovered") else {}
        checks = compare(clean, got) if got else {"rows_lost": None, "missing": [],
                                                   "same_counts": False, "reran": [],
                                                   "test_error": None}  # fmt: skip
        leftovers_now = partial_outputs(root)
        error = checks["test_error"]
        same_model = error is not None and abs(error - clean["test_error"]) <= TEST_ERROR_NOISE
        survived = (bool(out.get("recovered")) and checks["rows_lost"] == 0 and checks[
            "same_counts"] and not checks["missing"] and not leftovers_now and same_model
            and out.get("resumed", True) and out.get("clear", True))  # fmt: skip
        rows.append({"name": name, "survived": None if out.get("skipped") else survived,
                     "rows_lost": checks["rows_lost"],
                     "outcome": out["first"], "recovery": out.get("recovery", ""),
                     "same_counts": checks["same_counts"], "missing": checks["missing"],
                     "reran": checks["reran"], "partial_outputs": leftovers_now,
                     "partial_outputs_after_fault": out.get("left_behind", []),
                     "test_error": error, "clean_test_error": clean["test_error"],
                     "seconds": round(seconds, 1),
                     **{k: out[k] for k in ("clear", "done_after_fault", "unfinished_runs")
                        if k in out}})  # fmt: skip
        print(f"  {name}: survived={survived} ({seconds:.0f}s)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"faults": rows}))
        return
    print(
        f"\n{'fault':<17}{'survived':>9}{'rows lost':>10}{'test err':>9}{'seconds':>8}  outcome → recovery"
    )
    for r in rows:
        err = "-" if r["test_error"] is None else f"{r['test_error']:.4f}"
        lost = "-" if r["rows_lost"] is None else r["rows_lost"]
        print(f"{r['name']:<17}{str(r['survived']):>9}{lost:>10}{err:>9}"
              f"{r['seconds']:>8.0f}  {r['outcome'][:70]} → {r['recovery']}; ran again: "
              f"{', '.join(r['reran']) or 'nothing'}")  # fmt: skip
    print(f"(clean run: test_error {clean['test_error']:.4f})")


if __name__ == "__main__":
    main()
