"""Sync mode's gradient exchange: two real gloo processes end with the mean of both ranks'
gradients, row for row, whether the rows fit the packed buffer or overflow it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.exchange import RowExchange
from trainers.model import ModelSpec, NgramClassifier

SPEC = ModelSpec(num_buckets=500, dim=6, hidden=(5,), num_classes=3)
# (ids per rank, offsets) of successive steps: the first overflows the empty buffer, the second
# touches more rows than the room made after it, the third fits; rank 1's last batch shares
# rows with rank 0's and one of its bags is empty.
STEPS = [
    ([[1, 2, 3, 4], [5, 6, 7]], [[0, 2], [0, 1]]),
    ([list(range(10, 40)), list(range(100, 111))], [[0, 10, 20], [0, 5]]),
    ([[10, 11, 12], [12, 13, 10, 499]], [[0, 1], [0, 2, 2]]),
]


def _model(dtype: torch.dtype) -> NgramClassifier:
    torch.manual_seed(3)
    return NgramClassifier(SPEC, sparse=True).to(dtype=dtype)


def _grads(model: NgramClassifier, ids: list[int], offsets: list[int]) -> dict[str, torch.Tensor]:
    """Dense gradients of the model's loss on one batch (labels: row index mod classes)."""
    model.zero_grad(set_to_none=True)
    logits = model(torch.tensor(ids), torch.tensor(offsets))
    labels = torch.arange(len(offsets)) % SPEC.num_classes
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for n, p in model.named_parameters()}  # fmt: skip


def _rank(rank: int, store_path: str, dtype: torch.dtype, out: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        model = _model(dtype)
        exchange = RowExchange(model, 2)
        worst = 0.0
        for ids, offsets in STEPS:
            expected = [_grads(_model(dtype), ids[r], offsets[r]) for r in (0, 1)]
            _grads(model, ids[rank], offsets[rank])
            sent = exchange()
            assert sent > 0
            for name, p in model.named_parameters():
                got = p.grad.to_dense() if p.grad.is_sparse else p.grad
                want = (expected[0][name] + expected[1][name]) / 2
                worst = max(worst, float((got - want).abs().max()))
        torch.save({"worst": worst, "overflows": exchange.overflows,
                    "capacity": exchange.capacity}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, dtype: torch.dtype) -> list[dict]:
    outs = [str(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    mp.spawn(_exchange_main, args=(str(tmp_path / "store"), dtype, outs), nprocs=2, join=True)
    return [torch.load(o) for o in outs]


def _exchange_main(rank: int, store_path: str, dtype: torch.dtype, outs: list[str]) -> None:
    _rank(rank, store_path, dtype, outs[rank])


def test_both_ranks_end_with_the_mean_gradient_through_overflow_and_fit(tmp_path):
    results = _run(tmp_path, torch.float32)
    for result in results:
        assert result["worst"] < 1e-6
        # step 1 (empty room) and step 2 (more rows than 1.25x step 1's) overflow, step 3 fits
        assert result["overflows"] == 2
    assert results[0]["capacity"] == results[1]["capacity"] >= 30


def test_fp64_gradients_travel_exactly(tmp_path):
    results = _run(tmp_path, torch.float64)
    assert all(r["worst"] < 1e-12 for r in results)


def _listeners(port: int) -> list[str]:
    """The local addresses (hex, as the kernel lists them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def test_the_meeting_point_listens_on_loopback_only(monkeypatch):
    """torch's own TCPStore listens on every address; the launchers' store on 127.0.0.1."""
    from datetime import timedelta

    from trainers.launch import free_port, loopback_store

    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    store = loopback_store(timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert _listeners(port) == ["0100007F"]  # 127.0.0.1, and nothing else
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # under torchrun: its own store
    assert loopback_store(timedelta(seconds=10)) is None
