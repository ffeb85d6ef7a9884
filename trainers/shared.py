"""``train.mode=shared``: Hogwild! across worker processes on one host.

fastText trains with threads that update one model without locks. Worker processes can do the
same when they run on one machine: the model's weights (and the numba kernel's Adagrad state)
move into one memory mapping that every rank maps, and each rank's kernel writes into it
directly. Nothing is averaged and nothing travels between the ranks; a "meeting" (before an
evaluation or a checkpoint) is only a barrier, so that no rank writes while the weights are read.

The mapping is a file in ``/dev/shm`` (RAM), or in the temp folder where ``/dev/shm`` lacks the
room (a container's default is 64 MB). Rank 0 reserves its whole size up front
(``posix_fallocate``), so a full tmpfs is an error here and never a SIGBUS in the middle of
training, and removes the file as soon as every rank has mapped it: the memory lives as long as
the processes do, and a crashed run leaves nothing behind.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
ROOM_MARGIN = 1.10  # free space wanted over the mapping's size


def mapping_dir(nbytes: int, candidates: tuple[Path, ...] | None = None) -> Path | None:
    """The first folder with room for ``nbytes`` (and a margin): ``/dev/shm``, then the temp
    folder; None when neither has it."""
    for folder in candidates or (SHM_DIR, Path(tempfile.gettempdir())):
        try:
            stat = os.statvfs(folder)
        except OSError:
            continue
        if os.access(folder, os.W_OK) and stat.f_bavail * stat.f_frsize >= nbytes * ROOM_MARGIN:
            return folder
    return None


def _create_mapping(nbytes: int, folders: tuple[Path, ...] | None) -> tuple[str | None, str]:
    """Rank 0: a file of ``nbytes`` reserved on disk or tmpfs; its path, or None and why not."""
    folder = mapping_dir(nbytes, folders)
    if folder is None:
        where = ", ".join(str(f) for f in folders or (SHM_DIR, "the temp folder"))
        return None, f"no room for {nbytes / 2**20:.1f} MiB of shared weights in {where}"
    fd, path = tempfile.mkstemp(prefix="zipfline-weights-", dir=folder)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        return None, f"cannot reserve {nbytes / 2**20:.0f} MiB in {folder}: {exc.strerror}"
    os.close(fd)
    return path, ""


def share_tensors(tensors: list[torch.Tensor], folders: tuple[Path, ...] | None = None) -> str:
    """Collective: move ``tensors`` (one dtype, on the CPU, equal on every rank) into one
    mapping shared by all ranks, in place (each keeps its identity; its ``.data`` becomes a
    view of the mapping). Returns "" when shared, else why not (the same on every rank; the
    tensors are then left as they were): ranks on more than one host, or no room in
    ``folders`` (default: ``/dev/shm``, then the temp folder)."""
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) > 1:
        return f"the workers run on {len(set(hosts))} hosts ({', '.join(sorted(set(hosts)))})"
    dtype = tensors[0].dtype
    numel = sum(t.numel() for t in tensors)
    nbytes = numel * tensors[0].element_size()
    made: list[tuple[str | None, str]] = [(None, "")]
    if dist.get_rank() == 0:
        made = [_create_mapping(nbytes, folders)]
    dist.broadcast_object_list(made, src=0)
    path, why_not = made[0]
    if path is None:
        return why_not
    try:
        mapped = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        dist.barrier()  # every rank has mapped the file: its name can go, the memory stays
    finally:
        if dist.get_rank() == 0:
            Path(path).unlink(missing_ok=True)
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
