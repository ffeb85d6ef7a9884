"""The one atomic-write helper: write beside the target, then rename over it.

A reader sees the old target or the new one, never half of one: a file is written to a
temporary sibling and moved with ``os.replace``; a folder is built in a temporary sibling and
renamed into place, the old folder moved aside first and removed after. A failure leaves the
target as it was and removes the temporary copy. Temporary names start with ``.`` so that the
readers of a folder (``core.layout.data_files``) never list them.

It also holds the one lock helper, :func:`exclusive_lock`: ``fcntl.flock`` on a file, which the
kernel releases when its owner exits, however it exits (a killed run leaves no stale lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def clear_stale(target: Path) -> None:
    """Remove temporary siblings of ``target`` that a killed writer left behind."""
    if target.parent.is_dir():
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(True)


def leftovers(root: Path) -> list[Path]:
    """Temporary siblings anywhere under ``root`` (``.<name>.tmp-…``, ``.<name>.old-…``): what a
    killed writer leaves until the next write of the same target clears it."""
    return sorted(p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing what was there."""
    if target.exists():
        old = _sibling(target, "old")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on a clean exit it replaces
    ``target``; on an error it is removed and ``target`` stays as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "w") -> Iterator[Any]:
    """Yield a file object writing a temporary sibling; on a clean exit (flushed and synced) it
    replaces ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for writers that take a path (``torch.save``,
    ``DataFrame.to_parquet``); on a clean exit it replaces ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_file(target) as fh:
        fh.write(text)


def write_json(target: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``target`` atomically."""
    write_text(target, json.dumps(data, indent=2, sort_keys=True))


class Busy(Exception):
    """Another process holds the lock; the argument is its pid, or None where unreadable."""


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[Path]:
    """Hold ``path`` locked (``fcntl.flock``) for the block; :class:`Busy` at once if another
    process holds it. The file is never deleted (a deleted and re-created lock file would be a
    second lock); it holds its owner's pid, written after locking, for messages only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner(fd)
        os.close(fd)
        raise Busy(owner) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # free: no pid to show
        os.close(fd)  # releases the lock; the file stays


def _owner(fd: int) -> int | None:
    """The pid written in a lock file, best-effort (the owner may not have written it yet)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
