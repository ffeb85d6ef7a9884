"""The pieces of ``zipfline retrain`` (the cron entry): a lock that a killed run cannot leave
behind for good, and a watermark of what the last successful run saw.

The lock is a file under the data root holding its owner's pid, created with ``O_EXCL``. A
second retrain finds it and exits 0 while the owner lives; a lock whose pid is gone (a killed
run) is taken over, never waited on. The watermark records a fingerprint of the raw inputs
(paths, sizes, modification times; or the generator's settings) and of the labels folder, so
a run starts only when something new arrived.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.config import Config
from core.hashing import digest, labels_fingerprint, source_fingerprint
from core.layout import data_root

LOCK_FILE = ".retrain.lock"
WATERMARK_FILE = "retrain.watermark.json"
LOG_FILE = "retrain.log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@dataclass
class Lock:
    path: Path
    took_over: int | None = None  # the pid of a dead owner whose lock was taken over


class Busy(Exception):
    """Another retrain holds the lock; its pid is the argument."""


@contextlib.contextmanager
def retrain_lock(root: Path) -> Iterator[Lock]:
    """Hold ``<root>/.retrain.lock`` for the block; :class:`Busy` if a live process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    took_over = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                raise Busy(owner) from None
            took_over = owner or None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:  # pragma: no cover - three races lost in a row
        raise Busy(0)
    try:
        yield Lock(path, took_over)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()


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
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{WATERMARK_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(root / WATERMARK_FILE)


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
