"""The retrain lock (``flock``, held by the kernel) raced by real processes, a run date's lock
refusing a second run of that date, and the budget enforced on a child process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.atomic import Busy, exclusive_lock
from core.layout import RUN_LOCK
from pipelines.cli import main
from pipelines.retrain import LOCK_FILE, OverBudget, retrain_lock, run_with_budget

# One contender: on each "go N" it takes the lock the way cmd_retrain does; holding it, it
# records round N in the shared file, says "ran" and keeps the lock until told "release";
# refused, it says "busy PID". The test hears the refused one before it lets the holder go, so
# the two attempts always overlap, however the two processes are scheduled.
CONTENDER = """
import sys
from pathlib import Path
from core.atomic import Busy
from pipelines.retrain import retrain_lock

root, record = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    n = line.split()[1]
    try:
        with retrain_lock(root):
            with record.open("a") as fh:
                fh.write(f"{n}\\n")
            print("ran", flush=True)
            sys.stdin.readline()  # "release"
        print("released", flush=True)
    except Busy as busy:
        print(f"busy {busy.args[0]}", flush=True)
"""

HOLDER = """
import sys, time
from pathlib import Path
from pipelines.retrain import retrain_lock

with retrain_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def _reply(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, f"contender {proc.pid} ended: {proc.wait()}"
    return line.strip()


def test_two_retrains_racing_twenty_times_give_exactly_one_run_each_time(tmp_path):
    root, record = tmp_path / "data", tmp_path / "ran.txt"
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(root), str(record)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        assert [_reply(p) for p in procs] == ["ready", "ready"]
        for n in range(20):
            order = procs if n % 2 else procs[::-1]
            for p in order:  # both are waiting on stdin: they wake together
                p.stdin.write(f"go {n}\n")
                p.stdin.flush()
            replies = {p.pid: _reply(p) for p in procs}
            ran = [pid for pid, r in replies.items() if r == "ran"]
            busy = [r for r in replies.values() if r.startswith("busy")]
            assert len(ran) == 1 and len(busy) == 1, (n, replies)
            assert busy[0] in (f"busy {ran[0]}", "busy None")  # the pid is best-effort
            holder = next(p for p in procs if p.pid == ran[0])
            holder.stdin.write("release\n")
            holder.stdin.flush()
            assert _reply(holder) == "released"
        assert record.read_text().split() == [str(n) for n in range(20)]
        assert (root / LOCK_FILE).exists()  # never deleted
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_lock_is_exclusive_and_the_file_stays(tmp_path):
    with retrain_lock(tmp_path) as path:
        assert path == tmp_path / LOCK_FILE
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(Busy) as busy:  # a second open file is a second contender
            with retrain_lock(tmp_path):
                pass
        assert busy.value.args[0] == os.getpid()
    assert (tmp_path / LOCK_FILE).exists()
    with retrain_lock(tmp_path):  # free again
        pass


def test_a_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Busy) as busy:
            with retrain_lock(tmp_path):
                pass
        assert busy.value.args[0] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind
    t0 = time.monotonic()
    with retrain_lock(tmp_path) as path:  # no waiting, no stale-lock logic: the kernel freed it
        assert path.read_text().strip() == str(os.getpid())
    assert time.monotonic() - t0 < 1.0


def test_a_second_run_of_the_same_date_stops_at_once_in_one_line_and_tracks_nothing(
    tmp_path, capsys
):
    """Held by another process in life; here by this one on another descriptor, the same to
    ``flock``. The refused run starts no Spark and makes no MLflow run; another date runs on."""
    root, store = tmp_path / "data", tmp_path / "mlflow.db"
    argv = ["run", "--run-date", "2026-11-01", "--to", "ingest", "--set", f"data.root={root}",
            "--set", f"tracking.uri=sqlite:///{store}"]  # fmt: skip
    with exclusive_lock(root / "2026-11-01" / RUN_LOCK):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"zipfline: error: another run of 2026-11-01 is in flight (pid {os.getpid()}) on "
            f"{root / '2026-11-01'}; wait for it to end, then run the same command again "
            "(what it finished is reused)"
        ]
        assert not store.exists()  # nothing tracked, not even a failed parent run
        assert not (root / "2026-11-01" / "ingest").exists()


# A stand-in for the pipeline run: a child that forks two grandchildren and sleeps past any
# budget: one ignores SIGTERM (it needs the SIGKILL), one makes a process group of its own (as
# pyspark's daemon does for its workers: ending the child's group alone would miss it).
SLEEPER = """
import os, signal, sys, time
pids = [os.getpid()]
for own_group in (False, True):
    pid = os.fork()
    if pid == 0:
        if own_group:
            os.setpgid(0, 0)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
        os._exit(0)
    pids.append(pid)
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(" ".join(map(str, pids)))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def _gone(pid: int, within_s: float = 2.0) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def test_a_child_over_its_budget_is_ended_with_its_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    t0 = time.monotonic()
    with pytest.raises(OverBudget) as over:
        run_with_budget([sys.executable, "-c", SLEEPER, str(pids)], 1.0, grace_s=0.5)
    elapsed = time.monotonic() - t0
    assert str(over.value) == "retrain: over its budget of retrain.budget_s = 1 s"
    assert over.value.exit_code == 1
    child, stubborn, own_group = map(int, pids.read_text().split())
    assert _gone(child) and _gone(stubborn) and _gone(own_group)
    assert 1.4 <= elapsed < 4.0  # budget, then the grace period, then SIGKILL


def test_a_child_within_its_budget_returns_its_exit_code_and_shares_stdout(capfd):
    code = "import sys; print('from the child'); sys.exit(3)"
    assert run_with_budget([sys.executable, "-c", code], 30.0) == 3
    assert "from the child" in capfd.readouterr().out
