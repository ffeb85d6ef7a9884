"""The gradient exchange of sync mode on CPU: only the embedding rows a batch touched travel.

Each step every rank packs its gradients into one byte buffer: the number of embedding rows its
batch touched, their indices (int32, or int64 for tables of 2³¹ rows or more), their gradient
rows, and the dense layers' gradients. One all-gather hands every rank all buffers; every rank
then sums the same pairs in the same order into the same sparse gradient, so the replicas stay
equal. The buffer has room for ``capacity`` rows; a step with more rows on some rank sends the
rest in a second all-gather, and the room grows for the steps after (every rank sees the same
counts, so every rank decides the same).

Why not DDP's sparse all-reduce, or one collective per tensor: on gloo each collective costs
about a millisecond however small, a few times a fastText-sized step's compute, so the step
pays for one collective, not four (counts, indices, rows, dense layers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

HEADER = 8  # bytes: the row count, int64
GROWTH = 1.25  # room for this many times the largest count seen, after an overflow


def _gather(buffer: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``buffer`` (equal sizes), concatenated in rank order."""
    out = torch.empty(world_size * buffer.numel(), dtype=buffer.dtype)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, buffer)
    return out


class RowExchange:
    """Leaves every rank with the mean of all ranks' gradients of ``model`` (an
    ``NgramClassifier`` with a sparse embedding); one call per step, after ``backward``."""

    def __init__(self, model: torch.nn.Module, world_size: int) -> None:
        self.model = model
        self.world_size = world_size
        self.weight = model.embedding.weight
        self.dense = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
        self.dense_numel = sum(p.numel() for p in self.dense)
        self.index_dtype = torch.int32 if self.weight.shape[0] < 2**31 else torch.int64
        self.capacity = 0  # rows per rank the packed buffer has room for (even: alignment)
        self.overflows = 0  # steps that needed the second all-gather

    @property
    def _row_bytes(self) -> int:
        return self.index_dtype.itemsize + self.weight.shape[1] * self.weight.element_size()

    def _local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's touched rows, their gradients, and the dense gradients (flat)."""
        grad = self.weight.grad
        if grad is None:
            rows = torch.empty(0, dtype=torch.int64)
            values = self.weight.new_zeros((0, self.weight.shape[1]))
        else:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        parts = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
        dense = torch.cat([g.reshape(-1) for g in parts]) if parts else self.weight.new_zeros(0)
        return rows, values, dense

    def _pack(self, rows: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, room: int,
              header: bool) -> torch.Tensor:  # fmt: skip
        """One byte buffer: [count] rows (``room`` of them) values (``room`` rows) [dense]."""
        esize, dim = self.weight.element_size(), self.weight.shape[1]
        isize = self.index_dtype.itemsize
        size = (HEADER if header else 0) + room * (isize + dim * esize)
        size += self.dense_numel * esize if header else 0
        buf = torch.zeros(-(-size // 8) * 8, dtype=torch.uint8)  # 8-aligned for every rank's part
        at = 0
        if header:
            buf[:HEADER].view(torch.int64)[0] = rows.numel()
            at = HEADER
        n = min(rows.numel(), room)
        buf[at : at + room * isize].view(self.index_dtype)[:n] = rows[:n]
        at += room * isize
        buf[at : at + room * dim * esize].view(self.weight.dtype).view(room, dim)[:n] = values[:n]
        at += room * dim * esize
        if header and self.dense_numel:
            buf[at : at + self.dense_numel * esize].view(self.weight.dtype)[:] = dense
        return buf

    def _unpack(self, buf: torch.Tensor, room: int, counts: list[int], header: bool):  # noqa: ANN202
        """The rows and values of every rank's part of the gathered ``buf`` (and the summed
        dense gradients when the buffers carry them)."""
        esize, dim = self.weight.element_size(), self.weight.shape[1]
        isize = self.index_dtype.itemsize
        each = buf.numel() // self.world_size
        rows, values, dense = [], [], None
        for r, n in enumerate(counts):
            part = buf[r * each : (r + 1) * each]
            at = HEADER if header else 0
            rows.append(part[at : at + room * isize].view(self.index_dtype)[:n])
            at += room * isize
            values.append(
                part[at : at + room * dim * esize].view(self.weight.dtype).view(room, dim)[:n]
            )
            at += room * dim * esize
            if header and self.dense_numel:
                mine = part[at : at + self.dense_numel * esize].view(self.weight.dtype)
                dense = mine.clone() if dense is None else dense + mine
        return rows, values, dense

    def __call__(self) -> int:
        """Exchange this step's gradients; the bytes this rank sent."""
        rows, values, dense = self._local()
        room = self.capacity
        buf = self._pack(rows, values, dense, room, header=True)
        gathered = _gather(buf, self.world_size)
        each = buf.numel()
        counts = [int(gathered[r * each : r * each + HEADER].view(torch.int64)[0])
                  for r in range(self.world_size)]  # fmt: skip
        all_rows, all_values, summed = self._unpack(
            gathered, room, [min(n, room) for n in counts], header=True
        )
        sent = buf.numel()
        largest = max(counts)
        if largest > room:  # the rest of the rows, then more room from the next step on
            more = largest - room
            more += more % 2
            extra = self._pack(rows[room:], values[room:], dense, more, header=False)
            rest = _gather(extra, self.world_size)
            more_rows, more_values, _ = self._unpack(
                rest, more, [max(n - room, 0) for n in counts], header=False
            )
            all_rows += more_rows
            all_values += more_values
            sent += extra.numel()
            self.capacity = int(largest * GROWTH) + 1
            self.capacity += self.capacity % 2
            self.overflows += 1
        ids = torch.cat(all_rows).to(torch.int64)
        if ids.numel():
            self.weight.grad = torch.sparse_coo_tensor(
                ids.unsqueeze(0), torch.cat(all_values) / self.world_size, self.weight.shape
            ).coalesce()
        else:
            self.weight.grad = None
        if summed is not None:
            summed /= self.world_size
            offset = 0
            for p in self.dense:
                p.grad = summed[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        return sent
