"""The gradient exchange of sync mode on CPU: only the embedding rows a batch touched travel.

Each step every rank packs its gradients into one byte buffer: the number of embedding rows its
batch touched, their indices (int32, or int64 for tables of 2³¹ rows or more), their gradient
rows, and the dense layers' gradients. One all-gather hands every rank all buffers; every rank
then sums the same pairs in the same order into the same sparse gradient, so the replicas stay
equal. The buffer has room for ``capacity`` rows; a step with more rows on some rank sends the
rest in a second all-gather, and the room grows for the steps after (every rank sees the same
counts, so every rank decides the same).

With ``wire_dtype`` (``train.exchange_precision`` fp16 or bf16) the gradient rows and the dense
gradients travel cast to it, half the bytes of fp32, and every rank sums them back in the
model's precision; the buffer is bytes, so bf16 travels on gloo too. No loss scaling: fp16
keeps 11 bits only down to 6e-5 and flushes values under 6e-8 to zero, where bf16 keeps fp32's
range with 8 bits.

Why not DDP's sparse all-reduce, or one collective per tensor: on gloo each collective costs
about a millisecond however small, a few times a fastText-sized step's compute, so the step
pays for one collective, not four (counts, indices, rows, dense layers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainers.model import NgramClassifier, split_like

HEADER = 8  # bytes: the row count, int64
GROWTH = 1.25  # room for this many times the largest count seen, after an overflow


def gather_flat(buffer: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``buffer`` (equal sizes), concatenated in rank order."""
    out = torch.empty(world_size * buffer.numel(), dtype=buffer.dtype)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, buffer)
    return out


class RowExchange:
    """Leaves every rank with the mean of all ranks' gradients of ``model`` (an
    ``NgramClassifier`` with a sparse embedding); one call per step, after ``backward``."""

    def __init__(
        self, model: NgramClassifier, world_size: int, wire_dtype: torch.dtype | None = None
    ) -> None:
        self.model = model
        self.world_size = world_size
        self.weight = model.embedding.weight
        self.wire_dtype = wire_dtype or self.weight.dtype  # the gradients' type in the buffer
        self.wire_size = self.wire_dtype.itemsize
        self.dense = model.dense_parameters()
        self.dense_numel = sum(p.numel() for p in self.dense)
        self.index_dtype = torch.int32 if self.weight.shape[0] < 2**31 else torch.int64
        self.capacity = 0  # rows per rank the packed buffer has room for (even: alignment)
        self.overflows = 0  # steps that needed the second all-gather

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

    def _size(self, room: int, header: bool) -> int:
        """Bytes of one rank's buffer, rounded up to 8 so that every rank's part is aligned."""
        per_row = self.index_dtype.itemsize + self.weight.shape[1] * self.wire_size
        size = room * per_row
        if header:
            size += HEADER + self.dense_numel * self.wire_size
        return -(-size // 8) * 8

    def _regions(self, part: torch.Tensor, room: int, header: bool):  # noqa: ANN202
        """Views of one rank's buffer ``part``: count (or None), indices (``room``), gradient
        rows (``room`` × dim), dense gradients (or None): the layout, in one place."""
        dim, dtype = self.weight.shape[1], self.wire_dtype
        isize, esize = self.index_dtype.itemsize, self.wire_size
        at = HEADER if header else 0
        count = part[:HEADER].view(torch.int64) if header else None
        rows = part[at : at + room * isize].view(self.index_dtype)
        at += room * isize
        values = part[at : at + room * dim * esize].view(dtype).view(room, dim)
        at += room * dim * esize
        dense = part[at : at + self.dense_numel * esize].view(dtype) if header else None
        return count, rows, values, dense

    def _pack(self, rows: torch.Tensor, values: torch.Tensor, dense: torch.Tensor | None,
              room: int) -> torch.Tensor:  # fmt: skip
        """One rank's buffer: with ``dense`` (the first all-gather) the count and the dense
        gradients too; the first ``room`` of ``rows`` and ``values``."""
        header = dense is not None
        buf = torch.zeros(self._size(room, header), dtype=torch.uint8)
        count, row_view, value_view, dense_view = self._regions(buf, room, header)
        n = min(rows.numel(), room)
        row_view[:n] = rows[:n]
        value_view[:n] = values[:n]  # cast to the wire's type where it is another
        if header:
            count[0] = rows.numel()
            dense_view[:] = dense
        return buf

    def _unpack(self, gathered: torch.Tensor, room: int, header: bool):  # noqa: ANN202
        """Every rank's count (or None), rows and values in ``gathered``, and the sum of their
        dense gradients (or None); only the first count of each part's rows are real."""
        each = gathered.numel() // self.world_size
        parts = [self._regions(gathered[r * each : (r + 1) * each], room, header)
                 for r in range(self.world_size)]  # fmt: skip
        counts = [int(c[0]) for c, *_ in parts] if header else None
        dense = None
        if header and self.dense_numel:  # summed in the model's precision
            dense = torch.stack([d for *_, d in parts]).to(self.weight.dtype).sum(0)
        return counts, [(r, v) for _, r, v, _ in parts], dense

    def __call__(self) -> int:
        """Exchange this step's gradients; the bytes this rank sent."""
        rows, values, dense = self._local()
        room = self.capacity
        buf = self._pack(rows, values, dense, room)
        counts, parts, summed = self._unpack(gather_flat(buf, self.world_size), room, header=True)
        all_rows = [r[: min(n, room)] for (r, _), n in zip(parts, counts, strict=True)]
        all_values = [v[: min(n, room)] for (_, v), n in zip(parts, counts, strict=True)]
        sent = buf.numel()
        largest = max(counts)
        if largest > room:  # the rest of the rows, then more room from the next step on
            more = largest - room
            more += more % 2
            extra = self._pack(rows[room:], values[room:], None, more)
            _, rest, _ = self._unpack(gather_flat(extra, self.world_size), more, header=False)
            for (r, v), n in zip(rest, counts, strict=True):
                all_rows.append(r[: max(n - room, 0)])
                all_values.append(v[: max(n - room, 0)])
            sent += extra.numel()
            self.capacity = int(largest * GROWTH) + 1
            self.capacity += self.capacity % 2
            self.overflows += 1
        ids = torch.cat(all_rows).to(torch.int64)
        if ids.numel():
            self.weight.grad = torch.sparse_coo_tensor(
                ids.unsqueeze(0),
                torch.cat(all_values).to(self.weight.dtype) / self.world_size,
                self.weight.shape,
            ).coalesce()
        else:
            self.weight.grad = None
        if summed is not None:
            summed /= self.world_size
            for p, grad in zip(self.dense, split_like(summed, self.dense), strict=True):
                p.grad = grad
        return sent


class ReplicaAverage:
    """Local SGD's average: makes every rank's replica of ``model`` the mean of all. Dense
    layers are averaged whole; of the embedding only the rows some rank touched since the last
    average (the others are equal everywhere already): three all-reduces, the touched flags
    (MAX), those rows and the dense layers. One call per average; it clears ``touched``."""

    def __init__(self, model: NgramClassifier, world_size: int) -> None:
        self.model = model
        self.world_size = world_size
        weight = model.embedding.weight
        # Gathered into a buffer kept between averages: a fresh one of tens of MB costs more in
        # page faults than the copy itself; the mean is taken in place.
        self.buffer = torch.empty(0, dtype=weight.dtype, device=weight.device)

    def __call__(self, touched: torch.Tensor) -> int:
        """Average; the bytes this rank sent."""
        flags = touched.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        rows = flags.nonzero().squeeze(1)
        weight = self.model.embedding.weight
        sent = flags.numel() * flags.element_size()
        with torch.no_grad():
            if len(rows):
                size = len(rows) * weight.shape[1]
                if self.buffer.numel() < size:  # never more than the table itself
                    self.buffer = weight.new_empty(min(int(size * 1.25), weight.numel()))
                values = self.buffer[:size].view(len(rows), weight.shape[1])
                torch.index_select(weight, 0, rows, out=values)
                dist.all_reduce(values)
                values.mul_(1.0 / self.world_size)
                weight.index_copy_(0, rows, values)
                sent += values.numel() * values.element_size()
            dense = self.model.dense_parameters()
            flat = torch.cat([p.reshape(-1) for p in dense])
            dist.all_reduce(flat)
            flat /= self.world_size
            for p, mean in zip(dense, split_like(flat, dense), strict=True):
                p.copy_(mean)
        touched.zero_()
        return sent + flat.numel() * flat.element_size()
