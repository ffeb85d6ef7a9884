"""``train.mode=shared``: Hogwild! across worker processes on one host.

fastText trains with threads that update one model without locks. Worker processes can do the
same when they run on one machine: the model's weights (and the numba kernel's Adagrad state)
move into one memory mapping that every rank maps, and each rank's kernel writes into it
directly. Nothing is averaged and nothing travels between the ranks; a "meeting" (before an
evaluation or a checkpoint) is only a barrier, so that no rank writes while the weights are read.

The mapping is a file in ``/dev/shm`` (RAM), or in the temp folder where ``/dev/shm`` lacks the
room (a container's default is 64 MB); ``ZIPFLINE_SHARED_DIR`` names another folder. Rank 0
reserves the file's whole size up front (``posix_fallocate``), so a full tmpfs is a fallback
here and never a SIGBUS in the middle of training. Every other rank opens the file rank 0 made
(never creates one) and checks a random token rank 0 wrote at its end: ranks that share a host
name but not the folder (containers on the host's network) find no file or another one, and
then no rank shares. Rank 0 removes the file as soon as every rank has mapped it, also when it
is stopped by SIGTERM in between: the memory lives as long as the processes do.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
DIR_ENV = "ZIPFLINE_SHARED_DIR"  # where the mapping goes instead of /dev/shm or the temp folder
ROOM_MARGIN = 1.10  # free space wanted over the mapping's size
TOKEN_BYTES = 16


def candidate_dirs() -> tuple[Path, ...]:
    """Where the mapping may go, in order: ``$ZIPFLINE_SHARED_DIR`` alone where set, else
    ``/dev/shm`` and the temp folder."""
    if os.environ.get(DIR_ENV):
        return (Path(os.environ[DIR_ENV]),)
    return SHM_DIR, Path(tempfile.gettempdir())


def mapping_dir(nbytes: int, candidates: tuple[Path, ...] | None = None) -> Path | None:
    """The first folder of ``candidates`` (default :func:`candidate_dirs`) with room for
    ``nbytes`` and a margin; None when none has it."""
    for folder in candidates or candidate_dirs():
        try:
            stat = os.statvfs(folder)
        except OSError:
            continue
        if os.access(folder, os.W_OK) and stat.f_bavail * stat.f_frsize >= nbytes * ROOM_MARGIN:
            return folder
    return None


def _create_mapping(
    nbytes: int, folders: tuple[Path, ...] | None
) -> tuple[str | None, bytes | None, str]:
    """Rank 0: a file of ``nbytes`` plus a random token, reserved in full; its path and token,
    or None, None and why not."""
    folder = mapping_dir(nbytes + TOKEN_BYTES, folders)
    if folder is None:
        where = ", ".join(str(f) for f in folders or candidate_dirs())
        return None, None, f"no room for {nbytes / 2**20:.1f} MiB of shared weights in {where}"
    try:
        fd, path = tempfile.mkstemp(prefix="zipfline-weights-", dir=folder)
    except OSError as exc:
        return None, None, f"cannot create a file in {folder}: {exc.strerror}"
    token = secrets.token_bytes(TOKEN_BYTES)
    try:
        reserve = getattr(os, "posix_fallocate", None)  # not on macOS: a sparse file there
        if reserve is not None:
            reserve(fd, 0, nbytes + TOKEN_BYTES)
        else:
            os.ftruncate(fd, nbytes + TOKEN_BYTES)
        os.pwrite(fd, token, nbytes)
    except OSError as exc:
        os.unlink(path)
        return None, None, f"cannot reserve {nbytes / 2**20:.1f} MiB in {folder}: {exc.strerror}"
    finally:
        os.close(fd)
    return path, token, ""


def _token(path: str, nbytes: int) -> bytes | None:
    """The token at the end of ``path``, or None where this rank sees no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)  # never O_CREAT: another rank's file or none
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != nbytes + TOKEN_BYTES:
            return None
        return os.pread(fd, TOKEN_BYTES, nbytes)
    finally:
        os.close(fd)


@contextmanager
def _removed_on_sigterm(path: str | None) -> Iterator[None]:
    """While the file exists under its name, a SIGTERM (the launcher stopping this rank after
    another one failed) removes it before the process ends."""
    if path is None:
        yield
        return

    def remove_and_die(signum: int, frame: object) -> None:
        Path(path).unlink(missing_ok=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    try:
        previous = signal.signal(signal.SIGTERM, remove_and_die)
    except ValueError:  # not the main thread: no handler to install
        previous = None
    try:
        yield
    finally:
        Path(path).unlink(missing_ok=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def share_tensors(tensors: list[torch.Tensor], folders: tuple[Path, ...] | None = None) -> str:
    """Collective: move ``tensors`` (one dtype, on the CPU, equal on every rank) into one
    mapping shared by all ranks, in place (each keeps its identity; its ``.data`` becomes a
    view of the mapping). Returns "" when shared, else why not (the same on every rank; the
    tensors are then left as they were): ranks on more than one host, no room in ``folders``
    (default :func:`candidate_dirs`), or ranks that do not see rank 0's file."""
    world = dist.get_world_size()
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) > 1:
        return f"the workers run on {len(set(hosts))} hosts ({', '.join(sorted(set(hosts)))})"
    dtype = tensors[0].dtype
    numel = sum(t.numel() for t in tensors)
    nbytes = numel * tensors[0].element_size()
    made: list[tuple[str | None, bytes | None, str]] = [(None, None, "")]
    if dist.get_rank() == 0:
        made = [_create_mapping(nbytes, folders)]
    dist.broadcast_object_list(made, src=0)
    path, token, why_not = made[0]
    if path is None:
        return why_not
    with _removed_on_sigterm(path if dist.get_rank() == 0 else None):
        sees = _token(path, nbytes) == token
        seen = torch.tensor([1 if sees else 0])
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
        if not int(seen.item()):
            return f"not every worker sees {path} (a folder of its own on the same host name)"
        mapped = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        dist.barrier()  # every rank has mapped the file: its name can go, the memory stays
    views, offset = [], 0
    for t in tensors:
        views.append(mapped[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    if dist.get_rank() == 0:
        for view, t in zip(views, tensors, strict=True):
            view.copy_(t.detach())
    dist.barrier()  # the mapping holds rank 0's values before any rank uses it
    for view, t in zip(views, tensors, strict=True):
        t.data = view
    return ""
