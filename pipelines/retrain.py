"""The pieces of ``zipfline retrain`` (the cron entry): a lock the kernel holds, a budget
enforced on a child process, and a watermark of what the last successful run saw.

The lock is ``fcntl.flock`` on ``<data.root>/.retrain.lock`` (``core.atomic.exclusive_lock``),
held for the whole retrain: the kernel releases it when its owner exits, however it exits, so a
killed run's lock is simply free, and there is no stale lock to detect or take over. The pipeline
run inside takes its run date's own lock as every run does (``pipelines.flow``).

The pipeline run of a retrain is a child process in its own session (its own process group);
over ``retrain.budget_s`` the parent ends the whole group (the child, Spark's JVM and Python
workers, the training processes): SIGTERM, a grace period, then SIGKILL. Nothing is raised
inside the run itself (a signal raised in the middle of a py4j call leaves the JVM in a state
no one can reason about).

The watermark records a fingerprint of the raw inputs (paths, sizes, modification times; or
the generator's settings) and of the labels folder, so a run starts only when something new
arrived.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from core.atomic import exclusive_lock, write_json
from core.config import Config
from core.errors import StageError
from core.hashing import digest, labels_fingerprint, source_fingerprint
from core.layout import data_root

LOCK_FILE = ".retrain.lock"
WATERMARK_FILE = "retrain.watermark.json"
LOG_FILE = "retrain.log"
RESULT_FILE = ".retrain.result.json"
"""What the child run leaves for the parent: run id, test error, promotion verdict, summary."""
GRACE_S = 10.0
"""Seconds between SIGTERM and SIGKILL when a retrain's process group is ended."""


class OverBudget(StageError):
    """The retrain's child run outlived ``retrain.budget_s``; its process group was ended."""

    def __init__(self, budget_s: float) -> None:
        super().__init__(f"retrain: over its budget of retrain.budget_s = {budget_s:g} s")


class RunFailed(StageError):
    """The retrain's child run failed: its one line and its exit code, passed on."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def retrain_lock(root: Path) -> Iterator[Path]:
    """Hold ``<root>/.retrain.lock`` for the block; ``core.atomic.Busy`` if another process
    holds it."""
    with exclusive_lock(root / LOCK_FILE) as path:
        yield path


def _processes() -> dict[int, tuple[int, int, str]] | None:
    """``pid → (ppid, pgid, state)`` of every process, from ``/proc``; None without it."""
    if not Path("/proc/self/stat").exists():  # pragma: no cover - not Linux
        return None
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it has just exited
            continue
        found[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return found


def _strays(pid: int) -> set[int]:
    """The descendants of ``pid`` outside its process group: pyspark's daemon makes a group of
    its own for its workers (and would end them when the JVM goes; this does not wait for it)."""
    procs = _processes() or {}
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return {p for p in found if procs[p][1] != pid}


def _running(pgid: int, strays: set[int]) -> bool:
    """Whether a member of group ``pgid`` or a stray still runs (zombies do not count)."""
    procs = _processes()
    if procs is None:  # pragma: no cover - not Linux: zombies count
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(
        state not in "ZX" and (group == pgid or pid in strays)
        for pid, (_, group, state) in procs.items()
    )


def _signal(pgid: int, strays: set[int], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in strays:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def end_group(proc: subprocess.Popen, grace_s: float | None = None) -> None:
    """End ``proc``'s process group (``proc`` leads it) and the descendants that left it:
    SIGTERM, up to ``grace_s`` seconds (default :data:`GRACE_S`) for them to go, then SIGKILL;
    ``proc`` is reaped."""
    grace_s = GRACE_S if grace_s is None else grace_s
    pgid = proc.pid
    strays = _strays(pgid) if proc.poll() is None else set()  # after it exits: orphans, lost
    if _running(pgid, strays):
        _signal(pgid, strays, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while True:
            proc.poll()  # reap the leader
            if not _running(pgid, strays):
                break
            if time.monotonic() >= deadline:
                _signal(pgid, strays, signal.SIGKILL)
                break
            time.sleep(0.05)
    proc.wait()


class _Stopped(StageError):
    """This process was told to stop (SIGTERM) while its child ran; the child's group is ended."""


def run_with_budget(argv: Sequence[str], budget_s: float, *, grace_s: float | None = None) -> int:
    """Run ``argv`` as a child that makes itself a session (so a process group) of its own
    before it starts (``setsid`` between fork and exec), with this process's stdout and stderr;
    return its exit code. Past ``budget_s`` seconds, end its whole group (:func:`end_group`)
    and raise :class:`OverBudget`. Whatever the child leaves running in its group when it exits
    is ended too, and so is the group when this process is stopped (SIGTERM, Ctrl-C)."""
    previous = None
    if threading.current_thread() is threading.main_thread():

        def stopped(signum: int, frame: object) -> None:
            raise _Stopped(f"retrain: stopped by {signal.Signals(signum).name}")

        previous = signal.signal(signal.SIGTERM, stopped)
    proc = None
    try:
        proc = subprocess.Popen(list(argv), start_new_session=True)
        try:
            return proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            raise OverBudget(budget_s) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the ending below is not interrupted
        try:
            if proc is not None:
                end_group(proc, grace_s)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def fingerprint(cfg: Config) -> dict[str, str]:
    """What a retrain depends on: the raw inputs (or the generator's settings) and the labels."""
    raw = cfg.data.raw_path
    return {
        "raw": source_fingerprint(raw) if raw else digest(cfg.to_dict()["generate"]),
        "labels": labels_fingerprint(data_root(cfg)),
    }


def read_watermark(root: Path) -> dict | None:
    try:
        return json.loads((root / WATERMARK_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_watermark(root: Path, fp: dict[str, str], run_id: str) -> None:
    data = fp | {"run_id": run_id,
                 "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}  # fmt: skip
    write_json(root / WATERMARK_FILE, data)


def something_new(cfg: Config) -> tuple[bool, dict[str, str], dict | None]:
    """Whether the raw inputs or labels changed since the last successful retrain."""
    root = Path(cfg.data.root).expanduser().resolve()
    fp = fingerprint(cfg)
    last = read_watermark(root)
    new = last is None or any(last.get(k) != v for k, v in fp.items())
    return new, fp, last


def log_line(root: Path, text: str) -> None:
    """Append one timestamped line to ``<root>/retrain.log``."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with (root / LOG_FILE).open("a") as fh:
        fh.write(f"{stamp} {text}\n")


def write_result(path: Path, data: dict) -> None:
    """The child run's outcome for the parent, written atomically: ``run_id``, ``test_error``,
    ``promotion``, ``summary``; or ``error`` (for the log), ``message`` and ``exit_code``."""
    write_json(path, data)


def read_result(path: Path) -> dict:
    """What the child run left at ``path``; empty if nothing (it was killed) or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
